"""Render a page of an `engine report` to PNG in headless Chromium (for the README screenshot).

    python scripts/screenshot_report.py demo-run/report/index.html docs/report.png
    python scripts/screenshot_report.py demo-run/report/classes/0003.html docs/report-class.png --height 700

Uses the CDP client of the tests (tests/browser.py). Fails when the page logs an error (a
missing thumbnail, an exception), so a broken report never becomes a screenshot.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="an HTML file of the report (index.html, classes/0000.html, ...)")
    parser.add_argument("out", type=Path, help="PNG to write")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--full-page", action="store_true", help="the whole page, not just the viewport")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds for each browser step")
    args = parser.parse_args(argv)
    if not args.page.is_file():
        parser.error(f"page: {args.page} is not a file")
    sys.path.insert(0, str(ROOT / "tests"))
    from browser import Browser, BrowserError

    try:
        with Browser(timeout=args.timeout) as browser:
            browser.navigate(args.page.resolve().as_uri())
            errors = browser.errors()
            if errors:
                print(f"screenshot_report: error: {args.page} logged: {errors[0]}", file=sys.stderr)
                return 1
            args.out.parent.mkdir(parents=True, exist_ok=True)
            data = browser.screenshot(args.out, width=args.width, height=args.height, full_page=args.full_page)
    except BrowserError as err:
        print(f"screenshot_report: error: {err}", file=sys.stderr)
        return 1
    print(f"{args.out}: {len(data)} bytes, {args.width} px wide")
    return 0


if __name__ == "__main__":
    sys.exit(main())
