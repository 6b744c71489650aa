"""A small Chrome DevTools Protocol client for tests and scripts: one headless Chromium, one page.

    with Browser() as browser:
        browser.navigate("file:///tmp/report/index.html")
        assert not browser.errors()
        browser.evaluate("document.images.length")
        browser.screenshot("page.png", width=1200, height=900)

Every wait has a deadline (`timeout` seconds): a hang raises `BrowserError` instead of
blocking. `close()` (also on leaving the `with` block) kills Chromium's whole process group
and removes the temporary profile.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request

import websocket

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class BrowserError(RuntimeError):
    """Chromium did not start, answer, or load in time, or a CDP call failed."""


def find_chromium() -> str | None:
    """$CHROMIUM when set, else the first of CANDIDATES on PATH (Debian: /usr/bin/chromium)."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env if os.path.isfile(env) and os.access(env, os.X_OK) else None
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


class Browser:
    """Headless Chromium attached over CDP to its first page target, with Runtime/Log/Page enabled."""

    def __init__(self, binary: str | None = None, *, timeout: float = 30.0):
        binary = binary or find_chromium()
        if binary is None:
            raise BrowserError(f"no Chromium found (tried $CHROMIUM and {', '.join(CANDIDATES)})")
        self.timeout = timeout
        self.events: list[dict] = []
        self._next_id = 0
        self._ws = None
        self._profile = tempfile.mkdtemp(prefix="engine-cdp-")
        self._stderr: queue.Queue = queue.Queue()
        self._proc = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--remote-debugging-port=0",
                f"--user-data-dir={self._profile}",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--hide-scrollbars",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )  # its own process group: close() kills every child with it
        threading.Thread(target=self._drain, daemon=True).start()
        try:
            endpoint = self._devtools_url()
            self._ws = websocket.create_connection(self._page_target(endpoint), timeout=timeout, suppress_origin=True)
            for domain in ("Runtime", "Log", "Page"):
                self.call(f"{domain}.enable")
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ start-up
    def _drain(self) -> None:
        for line in iter(self._proc.stderr.readline, b""):
            self._stderr.put(line.decode(errors="replace"))
        self._stderr.put(None)

    def _devtools_url(self) -> str:
        deadline = time.monotonic() + self.timeout
        seen = []
        while time.monotonic() < deadline:
            try:
                line = self._stderr.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                raise BrowserError("Chromium exited before listening: " + "".join(seen[-5:]).strip())
            seen.append(line)
            if "DevTools listening on " in line:
                return line.split("DevTools listening on ", 1)[1].strip()
        raise BrowserError(f"Chromium printed no DevTools URL within {self.timeout} s")

    def _page_target(self, endpoint: str) -> str:
        host = endpoint.split("//", 1)[1].split("/", 1)[0]
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://{host}/json/list", timeout=self.timeout) as reply:
                targets = json.load(reply)
            pages = [t for t in targets if t.get("type") == "page" and t.get("webSocketDebuggerUrl")]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
            time.sleep(0.1)
        raise BrowserError(f"no page target at {host} within {self.timeout} s")

    # ------------------------------------------------------------ protocol
    def _receive(self, deadline: float) -> dict:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BrowserError(f"no answer from Chromium within {self.timeout} s")
        self._ws.settimeout(remaining)
        try:
            return json.loads(self._ws.recv())
        except websocket.WebSocketTimeoutException:
            raise BrowserError(f"no answer from Chromium within {self.timeout} s") from None

    def call(self, method: str, params: dict | None = None) -> dict:
        """Send one command and return its result; events arriving meanwhile go to `events`."""
        self._next_id += 1
        ident = self._next_id
        self._ws.send(json.dumps({"id": ident, "method": method, "params": params or {}}))
        deadline = time.monotonic() + self.timeout
        while True:
            message = self._receive(deadline)
            if message.get("id") == ident:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def wait_for(self, event: str) -> dict:
        """The first `event` among those received so far or arriving before the deadline."""
        deadline = time.monotonic() + self.timeout
        for message in self.events:
            if message["method"] == event:
                return message
        while True:
            message = self._receive(deadline)
            if "method" in message:
                self.events.append(message)
                if message["method"] == event:
                    return message

    # ------------------------------------------------------------ page
    def navigate(self, url: str) -> None:
        """Load `url` and wait for its load event (images included); clears `events` first."""
        self.events.clear()
        result = self.call("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"navigate {url}: {result['errorText']}")
        self.wait_for("Page.loadEventFired")
        self.call("Runtime.evaluate", {"expression": "1"})  # let late console messages arrive

    def evaluate(self, expression: str):
        """The JSON value of a JavaScript expression in the page; its exception raises BrowserError."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"evaluate {expression!r}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def errors(self) -> list[str]:
        """Exceptions, console.error/assert calls and error log entries (failed loads) seen since navigate."""
        found = []
        for message in self.events:
            method, params = message["method"], message.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                found.append(f"exception: {details.get('text')} {details.get('exception', {}).get('description', '')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                found.append(f"log: {entry.get('text')} {entry.get('url', '')}".strip())
        return found

    def screenshot(self, path, *, width: int = 1200, height: int = 900, full_page: bool = False) -> bytes:
        """A PNG of the page at a `width` x `height` viewport (the whole page with `full_page`)."""
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        params = {"format": "png"}
        if full_page:
            size = self.call("Page.getLayoutMetrics")["cssContentSize"]
            params.update(
                captureBeyondViewport=True,
                clip={"x": 0, "y": 0, "width": width, "scale": 1, "height": max(height, int(size["height"]))},
            )
        data = base64.b64decode(self.call("Page.captureScreenshot", params)["data"])
        with open(path, "wb") as handle:
            handle.write(data)
        return data

    # ------------------------------------------------------------ shutdown
    def close(self) -> None:
        """Close the connection, kill Chromium's process group, remove the profile. Idempotent."""
        if self._ws is not None:
            try:
                self._ws.close(timeout=1)
            except Exception:
                pass
            self._ws = None
        if self._proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(signal.SIGKILL)  # whatever of its group is left (renderers, zygote)
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._proc.stderr.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self._proc.pid, sig)  # the group Popen(start_new_session=True) made for it
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
