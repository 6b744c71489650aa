"""The report's pages: inline CSS, SVG bar chart and heatmap, list pages, class pages with cards."""

from __future__ import annotations

import html
import logging

import numpy as np

from engine.cache import Cache
from engine.report.config import MAX_HEATMAP_CLASSES, ReportConfig
from engine.report.rows import Confusable, Rows, class_order
from engine.report.thumbnails import Thumbnails, reason_text
from engine.results import GROUPS

_logger = logging.getLogger(__name__)

# ---------------------------------------------------------------- HTML pieces
esc = html.escape

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1f2328;
background:#f6f7f9;margin:0 auto;max-width:1240px;padding:14px 24px}
h1{font-size:21px;margin:6px 0 2px}
h2{font-size:16px;margin:26px 0 8px;padding-bottom:3px;border-bottom:1px solid #d8dbe0}
a{color:#0b57d0;text-decoration:none}a:hover{text-decoration:underline}
.sub{color:#59636e;margin:0 0 8px}nav{margin:6px 0}nav a{margin-right:10px}
table{border-collapse:collapse;background:#fff}th,td{padding:3px 9px;border-bottom:1px solid #eceef1;text-align:right}
th{background:#eef0f3;font-weight:600}th.l,td.l{text-align:left}
.cols{display:flex;flex-wrap:wrap;gap:28px;align-items:flex-start}
.kv th{text-align:left;background:none;font-weight:500;color:#59636e}.kv td{text-align:left}
.bad{color:#b3261e}.good{color:#1a7f37}.muted{color:#8b949e}
svg text{font-family:inherit}svg .lbl{font-size:11px;fill:#1f2328}svg .num{font-size:10px;fill:#59636e}
.bar-selected{fill:#5aa469}.bar-rejected{fill:#e07b39}
.tiles{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0 4px}
.tile{background:#fff;border:1px solid #d8dbe0;border-radius:6px;padding:8px 14px;min-width:110px}
.tile b{display:block;font-size:22px;font-weight:600}.tile span{color:#59636e;font-size:12px}
.tile.warn{border-color:#b3261e}.tile.warn b{color:#b3261e}
.grid{display:flex;flex-wrap:wrap;gap:12px}
figure.sample{margin:0;padding:8px;background:#fff;border:1px solid #d8dbe0;border-radius:6px;width:360px}
.main{display:flex;gap:9px}.main img,.main svg{flex:none;border-radius:3px}
.main img,li.nb img{object-fit:contain;background:#e9ebef}
figcaption{font-size:12px;overflow:hidden}figcaption div{white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.key{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:11px;color:#59636e}
ol.nbs{display:flex;gap:5px;list-style:none;padding:0;margin:8px 0 0}
li.nb{width:58px;font-size:10px;text-align:center;line-height:1.25}
li.nb span{display:block;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
li.nb img,li.nb svg{width:56px;height:56px;border-radius:3px}
.same{color:#1a7f37}.other{color:#b3261e}
footer{margin:30px 0 10px;color:#59636e;font-size:12px;border-top:1px solid #d8dbe0;padding-top:8px}
"""


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>{esc(title)}</title><style>{_CSS}</style></head>\n'
        f"<body>\n{body}\n</body></html>\n"
    )


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "n/a"


def _footer(config: ReportConfig) -> str:
    return (
        f"<footer>Made by <code>engine report</code>. Scale rule: list pages show at most "
        f"{config.classes_per_page} classes each, sorted by rejected share (most rejected first); the heatmap "
        f"shows at most {MAX_HEATMAP_CLASSES} classes; each class page shows at most {config.per_class} "
        f"rejected samples (lowest mean normalised given-label log-probability first) with "
        f"{config.neighbors} nearest neighbors each, so it loads at most "
        f"{config.per_class * (1 + config.neighbors)} thumbnails ({config.thumb} px JPEG files in "
        f"<code>thumbs/</code>). Static: no script, no network.</footer>"
    )


def placeholder_svg(problem: tuple[str, str], size: int) -> str:
    """A visible grey box naming why an image is missing: the kind, then the detail (inline SVG;
    the reason in full as title)."""
    head, tail = problem
    reason = reason_text(problem)
    chars = max(4, size // 6)
    tail = tail if len(tail) <= chars else tail[: chars - 1] + "\u2026"
    font = max(7, size // 9)
    lines = (
        f'<text x="{size / 2}" y="{size / 2 - 2}" text-anchor="middle" font-size="{font}" fill="#b3261e">'
        f"{esc(head)}</text>"
    )
    if tail and size >= 64:
        lines += (
            f'<text x="{size / 2}" y="{size / 2 + font + 2}" text-anchor="middle" font-size="{font}" '
            f'fill="#59636e">{esc(tail)}</text>'
        )
    return (
        f'<svg class="ph" data-reason="{esc(reason)}" width="{size}" height="{size}" '
        f'viewBox="0 0 {size} {size}" role="img" aria-label="{esc(reason)}"><title>{esc(reason)}</title>'
        f'<rect x="1" y="1" width="{size - 2}" height="{size - 2}" fill="#f1f1f1" stroke="#b3261e" '
        f'stroke-dasharray="4 3"/>{lines}</svg>'
    )


def bar_chart(classes, stats: dict, names: list, *, scale_max: int, href) -> str:
    """Horizontal stacked bars (selected, rejected) for `classes`, one row each, linked to `href(c)`."""
    row, bar_h, left, width = 17, 12, 190, 520
    height = 30 + row * len(classes)
    parts = [
        f'<svg class="chart bars" width="{left + width + 150}" height="{height}" role="img" '
        f'aria-label="selected and rejected samples per class">',
        '<rect x="190" y="4" width="12" height="12" class="legend" fill="#5aa469"/>'
        '<text x="206" y="14" class="lbl">selected</text>'
        '<rect x="270" y="4" width="12" height="12" class="legend" fill="#e07b39"/>'
        '<text x="286" y="14" class="lbl">rejected</text>',
    ]
    unit = width / max(1, scale_max)
    for i, c in enumerate(classes):
        y = 26 + i * row
        kept, rej, n = int(stats["selected"][c]), int(stats["rejected"][c]), int(stats["labelled"][c])
        parts.append(
            f'<a href="{href(c)}"><text x="{left - 6}" y="{y + 10}" text-anchor="end" class="lbl">'
            f"{esc(_short(names[c], 30))}</text>"
            f'<rect class="bar-selected" x="{left}" y="{y}" width="{kept * unit:.1f}" height="{bar_h}">'
            f"<title>{esc(names[c])}: {kept} selected</title></rect>"
            f'<rect class="bar-rejected" x="{left + kept * unit:.1f}" y="{y}" width="{rej * unit:.1f}" '
            f'height="{bar_h}"><title>{esc(names[c])}: {rej} rejected</title></rect></a>'
            f'<text x="{left + n * unit + 6:.1f}" y="{y + 10}" class="num">{rej}/{n} rejected '
            f"({_pct(rej, n)})</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _short(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: chars - 1] + "\u2026"


def _colour(t: float) -> str:
    """t in [0, 1] -> a light-to-dark blue."""
    low, high = np.array([241, 246, 252]), np.array([8, 48, 107])
    r, g, b = (low + (high - low) * min(1.0, max(0.0, t))).round().astype(int)
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap(conf: Confusable, names: list, *, href) -> str:
    """K x K cells of class similarity with the class names on both axes (SVG)."""
    k = len(conf.classes)
    cell = int(min(36, max(16, 540 // max(1, k))))
    margin = int(min(170, 12 + 6.2 * max(len(_short(names[c], 26)) for c in conf.classes)))
    sim = np.asarray(conf.similarity, dtype=np.float64)
    off = sim[~np.eye(k, dtype=bool)]
    off = off[np.isfinite(off)]
    lo, hi = (float(off.min()), float(off.max())) if off.size else (0.0, 1.0)
    size = margin + k * cell + 10
    width = max(size + margin // 2, margin + 260)  # rotated column labels reach right of the grid
    parts = [
        f'<svg class="chart heatmap" width="{width}" height="{size + 30}" role="img" '
        'aria-label="class similarity heatmap">'
    ]
    for i, c in enumerate(conf.classes):
        middle, label = margin + i * cell + cell // 2 + 4, esc(_short(names[c], 26))
        parts.append(
            f'<a href="{href(c)}"><text class="lbl row-label" x="{margin - 5}" y="{middle}" '
            f'text-anchor="end">{label}</text></a><a href="{href(c)}"><text class="lbl col-label" '
            f'transform="translate({middle},{margin - 5}) rotate(-60)">{label}</text></a>'
        )
    for i, a in enumerate(conf.classes):
        for j, b in enumerate(conf.classes):
            v = sim[i, j]
            fill = "#d0d4da" if i == j or not np.isfinite(v) else _colour((v - lo) / (hi - lo) if hi > lo else 1.0)
            parts.append(
                f'<rect class="cell" x="{margin + j * cell}" y="{margin + i * cell}" '
                f'width="{cell - 1}" height="{cell - 1}" fill="{fill}"><title>{esc(names[a])} / '
                f"{esc(names[b])}: {v:.3f}</title></rect>"
            )
    y = margin + k * cell + 14
    for s in range(10):
        parts.append(f'<rect x="{margin + s * 12}" y="{y}" width="12" height="10" fill="{_colour(s / 9)}"/>')
    parts.append(
        f'<text class="num" x="{margin - 4}" y="{y + 9}" text-anchor="end">{lo:.2f}</text>'
        f'<text class="num" x="{margin + 124}" y="{y + 9}">{hi:.2f} cosine similarity</text></svg>'
    )
    return "".join(parts)


def _name(names: list, k: int) -> str:
    return names[k] if 0 <= k < len(names) else ("unlabelled" if k < 0 else f"class {k}")


def _stat(key: str, label: str, value, extra: str = "") -> str:
    return (
        f'<tr data-stat="{esc(key)}"><th>{esc(label)}</th><td class="v">{esc(str(value))}</td>'
        f'<td class="l muted">{esc(extra)}</td></tr>'
    )


def _selection_rows(data: Rows) -> list[str]:
    n = len(data.labels)
    counts = dict(data.attrs.get("counts") or {})
    counts.setdefault("final", int(data.selected.sum()))
    config = data.attrs.get("config") or {}
    out = []
    if config:
        out.append(
            _stat(
                "config",
                "selection",
                ", ".join(config.get("classifiers", [])) + " x " + ", ".join(config.get("criteria", [])),
                f"theta_cons {config.get('theta_cons')}, theta_gmm {config.get('theta_gmm')}",
            )
        )
    for key, value in counts.items():
        label = {
            "intersection": "all tests passed",
            "filled": "filled in (empty classes)",
            "final": "selected (final)",
        }.get(key, f"passes {key}")
        out.append(_stat(f"counts.{key}", label, int(value), _pct(value, n) + " of rows"))
    out.append(
        _stat(
            "rejected",
            "rejected (labelled, not selected)",
            int(((data.labels >= 0) & ~data.selected).sum()),
            _pct(((data.labels >= 0) & ~data.selected).sum(), n) + " of rows",
        )
    )
    metrics = data.attrs.get("metrics") or {}
    for key in ("precision", "recall", "f1", "noise_rate"):
        if key in metrics:
            label = {"f1": "F1", "noise_rate": "label noise (true labels)"}.get(key, key)
            out.append(_stat(f"metrics.{key}", label, f"{metrics[key]:.3f}", "vs true labels"))
    for name, acc in (metrics.get("accuracy") or {}).items():
        out.append(_stat(f"metrics.accuracy.{name}", f"{name} accuracy", f"{acc:.3f}", "vs true labels"))
    return out


def _timing_rows(cache: Cache, report_seconds: dict) -> list[str]:
    out = []
    for group in (kind.NAME for kind in GROUPS):
        if not cache.has_group(group):
            continue
        seconds = dict(cache.open_group(group).attrs).get("seconds")
        if isinstance(seconds, dict) and seconds:
            out.append(
                _stat(f"seconds.{group}", f"{group} (s)", ", ".join(f"{k} {float(v):.2f}" for k, v in seconds.items()))
            )
    out.append(_stat("seconds.report", "report (s)", ", ".join(f"{k} {v:.2f}" for k, v in report_seconds.items())))
    return out


def _summary_html(cache: Cache, data: Rows, info: dict) -> str:
    from engine.models import describe

    n = len(data.labels)
    labelled = int((data.labels >= 0).sum())
    head = [
        _stat("rows", "rows", n),
        _stat("labelled", "labelled", labelled, f"{n - labelled} unlabelled"),
        _stat("classes", "classes", len(data.names)),
        _stat("model", "model", _short(describe(cache.identity), 40), cache.manifest.get("precision") or ""),
        _stat("shards", "shards", len(data.urls), f"{cache.manifest.get('bad_samples', 0)} bad samples at embed"),
        _stat("thumbnails", "thumbnails", info["thumbnails"], f"{info['thumb']} px JPEG in thumbs/"),
        _stat(
            "placeholders",
            "placeholders",
            info["placeholders"],
            "; ".join(f"{k}: {v}" for k, v in info["placeholder_reasons"].items()),
        ),
        _stat("neighbors", "neighbors", info["neighbors"], info["neighbor_source"]),
    ]
    return (
        '<div class="cols"><table class="kv summary">' + "".join(head) + "</table>"
        '<table class="kv selection">' + "".join(_selection_rows(data)) + "</table>"
        '<table class="kv timings">' + "".join(_timing_rows(cache, info["seconds"])) + "</table></div>"
    )


def _tiles(data: Rows, info: dict) -> str:
    """The headline figures as large numbers."""
    n = len(data.labels)
    kept = int(data.selected.sum())
    rejected = int(((data.labels >= 0) & ~data.selected).sum())
    tiles = [
        ("rows", f"{n}", f"rows, {len(data.names)} classes"),
        ("selected", f"{kept}", f"selected ({_pct(kept, n)})"),
        ("rejected", f"{rejected}", f"rejected ({_pct(rejected, n)})"),
    ]
    metrics = data.attrs.get("metrics") or {}
    for key, label in (("precision", "precision"), ("recall", "recall"), ("f1", "F1")):
        if key in metrics:
            tiles.append((key, f"{metrics[key]:.3f}", f"{label} vs true labels"))
    tiles.append(
        ("placeholders", f"{info['placeholders']}", "images not found" if info["placeholders"] else "all images found")
    )
    warn = lambda key: " warn" if key == "placeholders" and info["placeholders"] else ""  # noqa: E731
    return (
        '<div class="tiles">'
        + "".join(
            f'<div class="tile{warn(key)}" data-tile="{key}"><b>{esc(value)}</b><span>{esc(text)}</span></div>'
            for key, value, text in tiles
        )
        + "</div>"
    )


def _class_table(classes, stats: dict, names: list, href) -> str:
    truth = "wrong" in stats
    head = (
        '<tr><th>#</th><th class="l">class</th><th>labelled</th><th>selected</th><th>rejected</th>'
        "<th>rejected share</th>" + ("<th>wrong labels</th><th>wrong among selected</th>" if truth else "") + "</tr>"
    )
    rows = []
    for c in classes:
        cells = "".join(f'<td data-col="{k}">{int(stats[k][c])}</td>' for k in ("labelled", "selected", "rejected"))
        cells += f'<td data-col="rejected_share">{_pct(stats["rejected"][c], stats["labelled"][c])}</td>'
        if truth:
            cells += "".join(f'<td data-col="{k}">{int(stats[k][c])}</td>' for k in ("wrong", "wrong_selected"))
        rows.append(
            f'<tr data-class="{c}"><td>{c}</td><td class="l"><a href="{href(c)}">{esc(names[c])}</a></td>{cells}</tr>'
        )
    return f'<table class="classes">{head}{"".join(rows)}</table>'


def _list_name(page: int) -> str:
    return "index.html" if page == 0 else f"index-{page + 1}.html"


def _pager(page: int, pages: int, first: int, last: int, total: int) -> str:
    links = " ".join(f"<b>{p + 1}</b>" if p == page else f'<a href="{_list_name(p)}">{p + 1}</a>' for p in range(pages))
    return f'<nav class="pager">classes {first}-{last} of {total}, most rejected share first; pages: {links}</nav>'


def class_file(c: int, num_classes: int) -> str:
    return f"classes/{c:0{max(4, len(str(num_classes - 1)))}d}.html"


def list_pages(
    cache: Cache, data: Rows, stats: dict, conf: Confusable | None, info: dict, config: ReportConfig
) -> dict[str, str]:
    """index.html (summary, chart, heatmap, table) and index-2.html ... (chart, table)."""
    c = len(data.names)
    order = class_order(stats)
    per = config.classes_per_page
    pages = max(1, -(-c // per))
    href = lambda k: class_file(k, c)  # noqa: E731
    scale = int(stats["labelled"].max()) if c else 1
    title = f"engine report: {cache.path}"
    out = {}
    for page in range(pages):
        chunk = order[page * per : (page + 1) * per]
        pager = _pager(page, pages, page * per + 1, page * per + len(chunk), c)
        body = [
            f'<h1>{esc(title)}</h1><p class="sub">What the selection rejected, per class: '
            f"{len(data.labels)} rows, {c} classes; click a class for its rejected samples.</p>"
        ]
        if page == 0:
            body.append(_tiles(data, info))
        body.append(
            f"<h2>Selected vs rejected per class</h2>{pager}"
            + bar_chart(chunk, stats, data.names, scale_max=scale, href=href)
        )
        if page == 0:
            body.append(_noise_section(data, href))
            body.append(_heatmap_section(conf, data.names, href))
            body.append("<h2>Summary</h2>" + _summary_html(cache, data, info))
        body.append("<h2>Classes</h2>" + _class_table(chunk, stats, data.names, href) + pager)
        body.append(_footer(config))
        out[_list_name(page)] = _page(title if page == 0 else f"{title} (page {page + 1})", "\n".join(body))
    return out


NOISE_PAIRS = 20  # swapped pairs listed in the noise section (the heatmap takes their classes, up to 30)


def noise_structure(noise: dict, labels: np.ndarray, num_classes: int) -> tuple[list, np.ndarray]:
    """The top swapped pairs [(given, true, count, share of the given class)] by count, and the
    (C,) estimated noise rate of each class, from the robust selection's sparse estimate."""
    given, true, count = (np.asarray(noise[k]) for k in ("given", "true", "count"))
    sizes = np.bincount(labels[labels >= 0], minlength=num_classes).astype(np.float64)
    off = given != true
    rates = np.bincount(given[off], weights=count[off], minlength=num_classes) / np.maximum(sizes, 1)
    order = np.argsort(-count[off], kind="stable")[:NOISE_PAIRS]
    g, t, n = given[off][order], true[off][order], count[off][order]
    pairs = [(int(a), int(b), float(c), float(c / max(sizes[a], 1))) for a, b, c in zip(g, t, n)]
    return pairs, rates


def _noise_section(data: Rows, href) -> str:
    """Robust mode: the estimated 'given label -> true class' structure as a heatmap and a table."""
    if not data.noise or not len(data.noise["given"]):
        return ""
    c = len(data.names)
    pairs, rates = noise_structure(data.noise, data.labels, c)
    if not pairs:
        return '<h2>Estimated label noise</h2><p class="muted">No label is estimated to belong to another class.</p>'
    classes: list[int] = []
    for a, b, _, _ in pairs:
        for k in (a, b):
            if k not in classes and len(classes) < MAX_HEATMAP_CLASSES:
                classes.append(k)
    share = np.zeros((len(classes), len(classes)))
    index = {k: i for i, k in enumerate(classes)}
    given, true, count = (np.asarray(data.noise[k]) for k in ("given", "true", "count"))
    sizes = np.bincount(data.labels[data.labels >= 0], minlength=c)
    for a, b, n in zip(given, true, count):
        if a in index and b in index:
            share[index[a], index[b]] = n / max(sizes[a], 1)
    grid = Confusable(classes=classes, similarity=share, source="the robust selection's estimate", pairs=[])
    rows = "".join(
        f'<tr><td class="l"><a href="{href(a)}">{esc(data.names[a])}</a></td><td class="l">'
        f'<a href="{href(b)}">{esc(data.names[b])}</a></td><td>{n:.0f}</td><td>{s:.1%}</td></tr>'
        for a, b, n, s in pairs
    )
    overall = float((given != true) @ count) / max(int((data.labels >= 0).sum()), 1)
    worst = np.argsort(-rates, kind="stable")[:5]
    return (
        f'<h2>Estimated label noise</h2><p class="sub">Estimated from label-independent evidence: about '
        f"{overall:.1%} of the labels belong to another class; noisiest classes: "
        + ", ".join(f'<a href="{href(k)}">{esc(data.names[k])}</a> {rates[k]:.0%}' for k in worst)
        + ". Row: the given label, column: the class the images look like; a cell is the share of the "
        'given class.</p><div class="cols">'
        + heatmap(grid, data.names, href=href)
        + '<table class="pairs noise"><tr><th class="l">given label</th><th class="l">looks like</th>'
        + f"<th>samples</th><th>of the class</th></tr>{rows}</table></div>"
    )


def _heatmap_section(conf: Confusable | None, names: list, href) -> str:
    if conf is None:
        return '<h2>Confusable classes</h2><p class="muted">Fewer than two classes.</p>'
    pairs = "".join(
        f'<tr><td class="l"><a href="{href(a)}">{esc(names[a])}</a></td><td class="l">'
        f'<a href="{href(b)}">{esc(names[b])}</a></td><td>{v:.3f}</td></tr>'
        for a, b, v in conf.pairs
    )
    return (
        f'<h2>Confusable classes</h2><p class="sub">Cosine similarity of {esc(conf.source)}; the '
        f'{len(conf.classes)} classes of the most similar pairs.</p><div class="cols">'
        + heatmap(conf, names, href=href)
        + '<table class="pairs"><tr><th class="l">class</th><th class="l">class</th><th>similarity</th>'
        + f"</tr>{pairs}</table></div>"
    )


def _image(row: int, thumbs: Thumbnails, size: int, alt: str) -> str:
    path = thumbs.paths.get(row)
    if path is None:
        return placeholder_svg(thumbs.problems.get(row, ("no image", "")), size)
    return f'<img src="../{path}" width="{size}" height="{size}" alt="{esc(alt)}" title="{esc(alt)}">'


def _card(row: int, sims: np.ndarray, ids: np.ndarray, data: Rows, thumbs: Thumbnails, size: int) -> str:
    names, label, key = data.names, int(data.labels[row]), str(data.keys[row])
    lines = [
        f'<div class="key" title="{esc(key)}">{esc(key)}</div>',
        f"<div>given: <b>{esc(_name(names, label))}</b></div>",
    ]
    if data.true is not None and data.true[row] >= 0:
        t = int(data.true[row])
        lines.append(f'<div class="{"good" if t == label else "bad"}">true: {esc(_name(names, t))}</div>')
    for clf, pred in data.predictions.items():
        p = int(pred[row])
        conf = data.confidences.get(clf)
        text = f"{clf}: {_name(names, p)}" + (f" ({conf[row]:.2f})" if conf is not None else "")
        agree = "same" if p == label else "other"
        lines.append(f'<div class="pred {agree}" title="{esc(text)}">{esc(text)}</div>')
    if data.consistency:
        text = "P(given)/max: " + ", ".join(f"{clf} {v[row]:.2f}" for clf, v in data.consistency.items())
        lines.append(f'<div class="muted" title="{esc(text)}">{esc(text)}</div>')
    failed = ", ".join(pair for pair, mask in data.passes.items() if not mask[row])
    if failed:
        lines.append(f'<div class="muted" title="{esc(failed)}">fails: {esc(failed)}</div>')
    neighbors = []
    for s, i in zip(sims.tolist(), ids.tolist()):
        if i < 0:
            continue
        other = int(data.labels[i])
        neighbors.append(
            f'<li class="nb" data-row="{i}" data-sim="{s:.4f}">{_image(i, thumbs, 56, str(data.keys[i]))}'
            f'<span class="{"same" if other == label else "other"}">{esc(_name(names, other))}</span>'
            f"<span>{s:.3f}</span></li>"
        )
    nbs = f'<ol class="nbs">{"".join(neighbors)}</ol>' if neighbors else ""
    return (
        f'<figure class="sample" data-row="{row}" data-key="{esc(key)}"><div class="main">'
        f"{_image(row, thumbs, size, key)}<figcaption>{''.join(lines)}</figcaption></div>{nbs}</figure>"
    )


def class_page(
    c: int,
    rows: np.ndarray,
    sims: np.ndarray,
    ids: np.ndarray,
    data: Rows,
    stats: dict,
    thumbs: Thumbnails,
    config: ReportConfig,
) -> str:
    names, total = data.names, len(data.names)
    nav = ['<a href="../index.html">index</a>']
    if c > 0:
        nav.append(f'<a href="../{class_file(c - 1, total)}">previous class</a>')
    if c + 1 < total:
        nav.append(f'<a href="../{class_file(c + 1, total)}">next class</a>')
    n, kept, rej = (int(stats[k][c]) for k in ("labelled", "selected", "rejected"))
    facts = f"{n} labelled, {kept} selected, {rej} rejected ({_pct(rej, n)})"
    if "wrong" in stats:
        facts += (
            f"; true labels: {int(stats['wrong'][c])} wrongly labelled, "
            f"{int(stats['wrong'][c] - stats['wrong_selected'][c])} of them rejected"
        )
    cards = "".join(_card(int(r), sims[i], ids[i], data, thumbs, config.thumb) for i, r in enumerate(rows))
    gallery = f'<div class="grid">{cards}</div>' if cards else '<p class="muted">No rejected samples in this class.</p>'
    body = (
        f'<nav>{" ".join(nav)}</nav><h1>class {c}: {esc(_name(names, c))}</h1><p class="sub">{facts}</p>'
        f"<h2>Rejected samples: {len(rows)} of {rej} shown, most suspicious first</h2>{gallery}" + _footer(config)
    )
    return _page(f"{_name(names, c)} - engine report", body)
