"""`engine report`: a static HTML report of what a selection rejected, opened from disk.

The output folder::

    index.html               summary, per-class bar chart (SVG), confusable-class heatmap (SVG), class table
    index-2.html ...         the next `classes_per_page` classes (chart + table), when there are more
    classes/0000.html ...    one page per class: its rejected rows, most suspicious first, with neighbours
    thumbs/SSSSS/PPPPPP.jpg  JPEG thumbnails, one per shown row (shard index / position in the shard)
    report.json              the summary returned by `write_report`
    .engine-report           marker: only a folder carrying it may be replaced by a rerun

A rerun builds the new report in a hidden folder next to the output folder (same parent) and
swaps it in only when complete: the earlier folder is renamed away, the new one renamed in,
the earlier one deleted (files in it that are not the report's own move over). A failure at any
point (bad device, unreadable cache, a crash while writing thumbnails) leaves the earlier
report as it was.

Self-contained: inline CSS, SVG charts drawn here, no script, no fonts, no network. Thumbnails
are small JPEG files rather than data URIs, so each page stays a few kB of text and the browser
decodes only the images of the page it opens. A row whose image cannot be read back (shard
moved or deleted, shard unreadable, sample missing, key mismatch, decode error, imported
features) is drawn as a visible placeholder naming the reason, counted and logged.

Scale rule (C classes): every list page (index.html, index-2.html, ...) shows at most
`classes_per_page` classes (default 100) sorted by rejected share, most rejected first; the
heatmap shows at most 30 classes (those of the most similar class pairs); a class page shows at
most `per_class` rejected rows with `neighbours` neighbours each, so it loads at most
per_class x (1 + neighbours) thumbnails. Thumbnails are read in one pass per needed shard.

The most suspicious rejected rows of a class are those with the lowest mean (over the
classifiers) normalised given-label log-probability (`<classifier>/loss_score` of the selection).
"""
from __future__ import annotations

import functools
import html
import json
import logging
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from engine.cache import Cache
from engine.files import read_json
from engine.outputs import FolderSwap
from engine.results import GROUPS, Diagnostics, Neighbors, Selection
from engine.runtime import EngineError, Timer, available_cores, progress, resolve_device

_logger = logging.getLogger(__name__)

MARKER = ".engine-report"
MAX_HEATMAP_CLASSES = 30
_OUTPUTS = ("index.html", "index-*.html", "classes", "thumbs", "report.json")
_IMPORTED = "import:"
_QUERY_BLOCK = 4096


@dataclass(frozen=True)
class ReportConfig:
    """per_class: rejected rows shown per class page; thumb: thumbnail size in px (longer side);
    neighbours: nearest neighbours per shown row (0: none); heatmap_classes: classes in the
    similarity heatmap (2-30); classes_per_page: classes per list page; workers: threads
    reading shards (None: up to 4)."""

    per_class: int = 24
    thumb: int = 96
    neighbours: int = 5
    heatmap_classes: int = 20
    classes_per_page: int = 100
    workers: int | None = None

    def __post_init__(self):
        limits = {"per_class": (1, 10_000), "thumb": (16, 512), "neighbours": (0, 50),
                  "heatmap_classes": (2, MAX_HEATMAP_CLASSES), "classes_per_page": (1, 10_000), "workers": (1, 64)}
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if value is None and name == "workers":
                continue
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not low <= value <= high:
                raise EngineError(f"{name.replace('_', '-')}: got {value!r}, expected an integer in [{low}, {high}]")
            object.__setattr__(self, name, int(value))  # numpy integers would not serialise to JSON


# ---------------------------------------------------------------- what is read from the cache
@dataclass
class _Rows:
    """Row arrays (N,) of the cache and its selection; names (C,); urls of the shards."""

    keys: np.ndarray
    labels: np.ndarray
    true: np.ndarray | None
    shard: np.ndarray
    position: np.ndarray
    selected: np.ndarray
    suspicion: np.ndarray                 # lower = more suspicious
    predictions: dict                     # classifier -> (N,) int
    confidences: dict                     # classifier -> (N,) float
    consistency: dict                     # classifier -> (N,) float, when the criterion ran
    passes: dict                          # "classifier/criterion" -> (N,) bool
    attrs: dict
    names: list
    urls: list


def _class_names(cache: Cache, labels: np.ndarray, predictions: dict) -> list[str]:
    """The cache's class names, extended with "class k" up to the largest label or prediction."""
    names = list(cache.class_names or [])
    top = max([int(labels.max()) if labels.size else -1] + [int(p.max()) for p in predictions.values() if p.size])
    return names + [f"class {k}" for k in range(len(names), top + 1)]


def _read_rows(cache: Cache) -> _Rows:
    stored = Selection.read(cache)  # one-line error naming `engine select` when absent or stale
    classifiers = stored.classifiers
    if stored.clean_score is not None:
        suspicion = stored.clean_score.astype(np.float32)
    elif classifiers:
        suspicion = np.mean([c.loss_score.astype(np.float32) for c in classifiers.values()], axis=0)
    else:
        suspicion = -stored.noise_score.astype(np.float32)
    predictions = {name: c.prediction.astype(np.int64) for name, c in classifiers.items()}
    labels = cache.labels().astype(np.int64)
    shard, position = cache.provenance()
    return _Rows(keys=cache.keys(), labels=labels, true=cache.true_labels(), shard=shard.astype(np.int64),
                 position=position.astype(np.int64), selected=stored.selected, suspicion=suspicion,
                 predictions=predictions, confidences={name: c.confidence for name, c in classifiers.items()},
                 consistency={pair.split("/")[0]: p.score for pair, p in stored.pairs.items()
                              if pair.endswith("/consistency")},
                 passes={pair: p.passed for pair, p in stored.pairs.items()},
                 attrs=stored.attrs, names=_class_names(cache, labels, predictions),
                 urls=[s["url"] for s in cache.manifest.get("shards", [])])


# ---------------------------------------------------------------- per-class figures and ranking
def class_stats(labels, selected, num_classes: int, true_labels=None) -> dict[str, np.ndarray]:
    """Per class (C,) int64: labelled, selected, rejected; float64 rejected_share (0 for empty
    classes); with true_labels (N,) also wrong (given != true) and wrong_selected.
    labels (N,) int, -1 = unlabelled; selected (N,) bool."""
    labels, selected = np.asarray(labels), np.asarray(selected, dtype=bool)
    labelled = labels >= 0
    count = lambda mask: np.bincount(labels[mask], minlength=num_classes).astype(np.int64)  # noqa: E731
    stats = {"labelled": count(labelled), "selected": count(labelled & selected)}
    stats["rejected"] = stats["labelled"] - stats["selected"]
    stats["rejected_share"] = stats["rejected"] / np.maximum(stats["labelled"], 1)
    if true_labels is not None:
        true_labels = np.asarray(true_labels)
        wrong = labelled & (true_labels >= 0) & (labels != true_labels)
        stats["wrong"], stats["wrong_selected"] = count(wrong), count(wrong & selected)
    return stats


def class_order(stats: dict) -> np.ndarray:
    """Class indices by rejected share (highest first), classes without rows last, ties by index."""
    c = len(stats["labelled"])
    return np.lexsort((np.arange(c), -stats["rejected_share"], stats["labelled"] == 0))


def rank_rejected(labels, selected, suspicion, *, per_class: int) -> np.ndarray:
    """Rows (M,) int64 not selected and labelled, grouped by label (ascending), within a label the
    lowest `suspicion` (N,) first (ties by row), at most `per_class` per label."""
    labels = np.asarray(labels)
    candidates = np.flatnonzero(~np.asarray(selected, dtype=bool) & (labels >= 0))
    order = np.lexsort((candidates, np.asarray(suspicion, np.float64)[candidates], labels[candidates]))
    ranked = candidates[order]
    ranked_labels = labels[ranked]
    first = np.searchsorted(ranked_labels, ranked_labels, side="left")
    return ranked[np.arange(len(ranked)) - first < per_class]


# ---------------------------------------------------------------- neighbours
def _without_self(similarities: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M, k+1) search results of `rows (M,)` -> (M, k) without the row itself (else the last)."""
    is_self = ids == rows[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    keep = ~is_self
    m, k1 = ids.shape
    return similarities[keep].reshape(m, k1 - 1), ids[keep].reshape(m, k1 - 1)


def find_neighbours(cache: Cache, rows: np.ndarray, k: int, *, device: str = "auto", features=None
                    ) -> tuple[np.ndarray, np.ndarray, str]:
    """k nearest neighbours of `rows (M,)`: (similarities (M, k) float32, ids (M, k) int64, source).

    The cache's `knn/` group when it is current and has at least k neighbours (checked on the
    keys and a few sampled rows, without loading the features); else a search of the cache's
    FAISS index (built and stored when missing or stale) for just these rows.
    `features`: a callable returning the cache's (N, D) features (to share one load), or None."""
    from engine import index as ix
    from engine.stages import load_cached_index

    rows = np.asarray(rows, dtype=np.int64)
    if k == 0 or rows.size == 0:
        return np.zeros((rows.size, 0), np.float32), np.zeros((rows.size, 0), np.int64), "none"
    stored = Neighbors.current(cache, k=k, at_least=True)
    if stored is not None:
        sims = stored.similarities.get_orthogonal_selection((rows, slice(0, k)))
        ids = stored.ids.get_orthogonal_selection((rows, slice(0, k)))
        return np.asarray(sims, np.float32), np.asarray(ids, np.int64), f"knn group (k={stored.k})"
    if cache.has_group(Neighbors.NAME):
        _logger.info("the cache's knn/ group is stale or has k < %d; searching the index", k)
    features = (features or cache.load_features)()
    index = load_cached_index(cache, features, device=device)
    out_sims, out_ids = [], []
    for start in range(0, rows.size, _QUERY_BLOCK):
        block = rows[start:start + _QUERY_BLOCK]
        sims, ids = ix.search_index(index, features[block].astype(np.float32), k=k + 1)
        sims, ids = _without_self(sims, ids, block)
        out_sims.append(sims)
        out_ids.append(ids)
    return np.concatenate(out_sims), np.concatenate(out_ids), f"{index.info.kind} index"


# ---------------------------------------------------------------- thumbnails
@dataclass
class Thumbnails:
    """Per row either a thumbnail path relative to the report folder or a placeholder reason."""

    paths: dict = field(default_factory=dict)      # row -> "thumbs/00000/000012.jpg"
    problems: dict = field(default_factory=dict)   # row -> (kind, detail): ("shard missing", "NAME")
    reused: int = 0                                # taken from the previous report, not re-read


def reason_text(problem: tuple[str, str]) -> str:
    """("cannot decode", "KEY (SHARD): error") -> "cannot decode: KEY (SHARD): error"."""
    kind, detail = problem
    return f"{kind}: {detail}" if detail else kind


def _shard_name(url: str) -> str:
    return os.path.basename(url.rstrip("/")) or url


def _resize(image, size: int):
    from PIL import Image

    w, h = image.size
    scale = size / max(w, h)
    target = (max(1, round(w * scale)), max(1, round(h * scale)))
    if scale < 1:
        image.thumbnail(target, Image.LANCZOS, reducing_gap=2.0)
        return image
    return image.resize(target, Image.BICUBIC)


def _shard_thumbnails(url: str, rows: np.ndarray, positions: np.ndarray, keys, out: Path, folder: str,
                      size: int, tick) -> list[tuple[int, str | None, tuple[str, str] | None]]:
    """Read one shard once and write the thumbnails of `rows` at `positions` (sorted):
    [(row, relative path or None, (kind, detail) of the problem or None)]. Placeholders are
    grouped by kind, so the kind never names a key; the detail does."""
    from engine.reader import decode_image, read_samples

    name = _shard_name(url)
    if url.startswith(_IMPORTED):
        tick(len(rows))
        return [(int(r), None, ("no image", f"imported features ({name})")) for r in rows]
    row_at = dict(zip(positions.tolist(), rows.tolist()))
    found: dict[int, tuple] = {}
    samples = read_samples(url, positions)
    end_reason = ("sample missing from shard", name)
    while True:
        try:
            position, sample = next(samples)
        except StopIteration:
            break
        except EngineError:
            end_reason = ("shard missing", name)
            break
        except ValueError as err:
            end_reason = ("shard unreadable", name)
            _logger.warning("%s", err)
            break
        row = row_at[position]
        if sample.get("__key__") != keys[row]:  # the shard was rewritten since it was embedded
            found[row] = (None, ("key mismatch", f"{name}: found {sample.get('__key__')}, expected {keys[row]}"
                                 [:200]))
            _logger.warning("%s at position %d", reason_text(found[row][1]), position)
        else:
            try:
                image = _resize(decode_image(sample), size)
            except ValueError as err:
                found[row] = (None, ("cannot decode", f"{keys[row]} ({name}): {err}"[:200]))
                _logger.warning("%s (%s)", reason_text(found[row][1]), url)
            else:
                relative = f"thumbs/{folder}/{position:06d}.jpg"
                (out / relative).parent.mkdir(parents=True, exist_ok=True)
                image.save(out / relative, format="JPEG", quality=85)
                found[row] = (relative, None)
        tick(1)
    missing = len(rows) - len(found)
    if missing:
        tick(missing)
        _logger.warning("%d thumbnails of %s replaced by placeholders (%s)", missing, url, reason_text(end_reason))
    return [(int(r), *found.get(int(r), (None, end_reason))) for r in rows]


THUMB_INDEX = "thumbs/index.json"
THUMB_FORMAT = "jpeg-q85-lanczos-1"   # how thumbnails are drawn: a change redraws them all


def _previous_thumbnails(previous: Path | None, size: int) -> dict:
    """The previous report's thumbnail index (folder -> {url, fingerprint, keys}) when it was
    made at the same size and format; {} otherwise, and for anything misshapen."""
    if previous is None:
        return {}
    try:
        index = read_json(previous / THUMB_INDEX)
    except ValueError:
        return {}
    if not (isinstance(index, dict) and index.get("size") == size and index.get("format") == THUMB_FORMAT
            and isinstance(index.get("shards"), dict)):
        return {}
    return {folder: entry for folder, entry in index["shards"].items()
            if isinstance(entry, dict) and isinstance(entry.get("keys"), dict)}


def _thumb_fingerprints(urls: list[str]) -> dict:
    """url -> what must be unchanged for a thumbnail to be reused: `reader.shard_fingerprints`
    (size and edges; size and ETag on object stores) plus, for local files, mtime and inode, so
    an image replaced in the middle of a tar of the same size is redrawn."""
    from engine.reader import shard_fingerprints

    out = shard_fingerprints(urls)
    for url, fingerprint in out.items():
        if fingerprint is not None and os.path.isfile(url):   # object stores: the ETag already says it
            st = os.stat(url)
            out[url] = f"{fingerprint}:{st.st_mtime_ns}:{st.st_ino}"
    return out


def _link(source: Path, target: Path) -> bool:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)   # same parent folder as the stage: a hard link, no copy
    except OSError:
        try:
            shutil.copyfile(source, target)
        except OSError:
            return False
    return True


def write_thumbnails(rows: np.ndarray, data: _Rows, out: Path, *, size: int, workers: int | None = None,
                     show_progress: bool | None = None, previous: Path | None = None) -> Thumbnails:
    """Thumbnails of `rows (M,)` under out/thumbs/, each needed shard read once (threads over shards).

    With `previous` (the earlier report folder), a thumbnail made there at the same size from
    the same shard file (url and fingerprint, see `reader.shard_fingerprints`) at the same
    position with the same key is linked instead of re-read; a shard is read only for the rest.
    `thumbs/index.json` records what this run wrote, for the next."""
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    result = Thumbnails()
    shard, position = data.shard[rows], data.position[rows]
    known = (shard >= 0) & (shard < len(data.urls))
    for row in rows[~known]:
        result.problems[int(row)] = ("no image", "row has no shard")
    rows, shard, position = rows[known], shard[known], position[known]
    order = np.lexsort((position, shard))
    rows, shard, position = rows[order], shard[order], position[order]
    starts = np.flatnonzero(np.r_[True, shard[1:] != shard[:-1]]) if rows.size else np.zeros(0, np.int64)
    groups = np.split(np.arange(rows.size), starts[1:])
    groups = [g for g in groups if g.size]
    urls = sorted({data.urls[shard[g[0]]] for g in groups if not data.urls[shard[g[0]]].startswith(_IMPORTED)})
    fingerprints = _thumb_fingerprints(urls) if urls else {}
    before = _previous_thumbnails(previous, size)
    todo = []
    for g in groups:
        url, folder = data.urls[shard[g[0]]], f"{shard[g[0]]:05d}"
        old = before.get(folder, {})
        same_file = (old.get("url") == url and fingerprints.get(url) is not None
                     and old.get("fingerprint") == fingerprints[url])
        keep = np.zeros(g.size, bool)
        if same_file:
            old_keys = old.get("keys", {})
            for i, (row, pos) in enumerate(zip(rows[g].tolist(), position[g].tolist())):
                relative = f"thumbs/{folder}/{pos:06d}.jpg"
                if old_keys.get(str(pos)) == data.keys[row] and _link(previous / relative, out / relative):
                    result.paths[row] = relative
                    keep[i] = True
        result.reused += int(keep.sum())
        if not keep.all():
            todo.append(g[~keep])
    lock = threading.Lock()
    disable = None if show_progress is None else not show_progress
    with progress(total=int(rows.size), desc="report thumbnails", unit="img", disable=disable) as bar:
        bar.update(result.reused)

        def tick(n: int) -> None:
            with lock:
                bar.update(n)

        workers = workers or min(4, available_cores())
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_shard_thumbnails, data.urls[shard[g[0]]], rows[g], position[g], data.keys, out,
                                   f"{shard[g[0]]:05d}", size, tick) for g in todo]
            for future in futures:
                for row, path, problem in future.result():
                    if path is not None:
                        result.paths[row] = path
                    else:
                        result.problems[row] = problem
    index: dict = {}
    for row, relative in result.paths.items():
        folder = relative.split("/")[1]
        url = data.urls[int(data.shard[row])]
        entry = index.setdefault(folder, {"url": url, "fingerprint": fingerprints.get(url), "keys": {}})
        entry["keys"][str(int(data.position[row]))] = data.keys[row]
    (out / THUMB_INDEX).parent.mkdir(parents=True, exist_ok=True)
    (out / THUMB_INDEX).write_text(json.dumps({"size": size, "format": THUMB_FORMAT, "shards": index}))
    return result


# ---------------------------------------------------------------- class similarity
@dataclass
class Confusable:
    """The heatmap's classes (K,), their similarity (K, K), its source and the top pairs."""

    classes: list
    similarity: np.ndarray
    source: str
    pairs: list


def confusable_classes(cache: Cache, data: _Rows, max_classes: int, *, features=None) -> Confusable | None:
    """Classes of the most similar pairs (text prompt centroids when the cache has text features,
    else image centroids), at most `max_classes`; None with fewer than 2 classes. `features`: as
    in `find_neighbours`."""
    from engine import index as ix

    c = len(data.names)
    if c < 2:
        return None
    sim, source = None, ""
    if cache.has_text():
        text, mask = cache.text_features()
        if text.shape[0] == c:
            sim, source = ix.text_class_similarity(text, mask), "text: class prompt centroids"
    if sim is None and cache.has_group(Diagnostics.NAME):
        stored = Diagnostics.read(cache).image_similarity
        if stored.shape == (c, c):
            sim, source = stored, "image: class centroids of the features"
    if sim is None:
        sim = ix.image_class_similarity((features or cache.load_features)(), data.labels, c)
        source = "image: class centroids of the features"
    pairs = ix.top_confusable_pairs(sim, top=min(c * (c - 1) // 2, 8 * max_classes))
    classes: list[int] = []
    for a, b, _ in pairs:
        for k in (a, b):
            if k not in classes and len(classes) < max_classes:
                classes.append(k)
    return Confusable(classes=classes, similarity=np.asarray(sim)[np.ix_(classes, classes)], source=source,
                      pairs=pairs[:10])


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
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="icon" href="data:,"><title>{esc(title)}</title><style>{_CSS}</style></head>\n'
            f"<body>\n{body}\n</body></html>\n")


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "n/a"


def _footer(config: ReportConfig) -> str:
    return (f"<footer>Made by <code>engine report</code>. Scale rule: list pages show at most "
            f"{config.classes_per_page} classes each, sorted by rejected share (most rejected first); the heatmap "
            f"shows at most {MAX_HEATMAP_CLASSES} classes; each class page shows at most {config.per_class} "
            f"rejected samples (lowest mean normalised given-label log-probability first) with "
            f"{config.neighbours} nearest neighbours each, so it loads at most "
            f"{config.per_class * (1 + config.neighbours)} thumbnails ({config.thumb} px JPEG files in "
            f"<code>thumbs/</code>). Static: no script, no network.</footer>")


def placeholder_svg(problem: tuple[str, str], size: int) -> str:
    """A visible grey box naming why an image is missing: the kind, then the detail (inline SVG;
    the reason in full as title)."""
    head, tail = problem
    reason = reason_text(problem)
    chars = max(4, size // 6)
    tail = tail if len(tail) <= chars else tail[:chars - 1] + "\u2026"
    font = max(7, size // 9)
    lines = f'<text x="{size / 2}" y="{size / 2 - 2}" text-anchor="middle" font-size="{font}" fill="#b3261e">' \
            f"{esc(head)}</text>"
    if tail and size >= 64:
        lines += (f'<text x="{size / 2}" y="{size / 2 + font + 2}" text-anchor="middle" font-size="{font}" '
                  f'fill="#59636e">{esc(tail)}</text>')
    return (f'<svg class="ph" data-reason="{esc(reason)}" width="{size}" height="{size}" '
            f'viewBox="0 0 {size} {size}" role="img" aria-label="{esc(reason)}"><title>{esc(reason)}</title>'
            f'<rect x="1" y="1" width="{size - 2}" height="{size - 2}" fill="#f1f1f1" stroke="#b3261e" '
            f'stroke-dasharray="4 3"/>{lines}</svg>')


def bar_chart(classes, stats: dict, names: list, *, scale_max: int, href) -> str:
    """Horizontal stacked bars (selected, rejected) for `classes`, one row each, linked to `href(c)`."""
    row, bar_h, left, width = 17, 12, 190, 520
    height = 30 + row * len(classes)
    parts = [f'<svg class="chart bars" width="{left + width + 150}" height="{height}" role="img" '
             f'aria-label="selected and rejected samples per class">',
             '<rect x="190" y="4" width="12" height="12" class="legend" fill="#5aa469"/>'
             '<text x="206" y="14" class="lbl">selected</text>'
             '<rect x="270" y="4" width="12" height="12" class="legend" fill="#e07b39"/>'
             '<text x="286" y="14" class="lbl">rejected</text>']
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
            f"({_pct(rej, n)})</text>")
    parts.append("</svg>")
    return "".join(parts)


def _short(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[:chars - 1] + "\u2026"


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
    width = max(size + margin // 2, margin + 260)   # rotated column labels reach right of the grid
    parts = [f'<svg class="chart heatmap" width="{width}" height="{size + 30}" role="img" '
             'aria-label="class similarity heatmap">']
    for i, c in enumerate(conf.classes):
        middle, label = margin + i * cell + cell // 2 + 4, esc(_short(names[c], 26))
        parts.append(f'<a href="{href(c)}"><text class="lbl row-label" x="{margin - 5}" y="{middle}" '
                     f'text-anchor="end">{label}</text></a><a href="{href(c)}"><text class="lbl col-label" '
                     f'transform="translate({middle},{margin - 5}) rotate(-60)">{label}</text></a>')
    for i, a in enumerate(conf.classes):
        for j, b in enumerate(conf.classes):
            v = sim[i, j]
            fill = "#d0d4da" if i == j or not np.isfinite(v) else _colour((v - lo) / (hi - lo) if hi > lo else 1.0)
            parts.append(f'<rect class="cell" x="{margin + j * cell}" y="{margin + i * cell}" '
                         f'width="{cell - 1}" height="{cell - 1}" fill="{fill}"><title>{esc(names[a])} / '
                         f"{esc(names[b])}: {v:.3f}</title></rect>")
    y = margin + k * cell + 14
    for s in range(10):
        parts.append(f'<rect x="{margin + s * 12}" y="{y}" width="12" height="10" fill="{_colour(s / 9)}"/>')
    parts.append(f'<text class="num" x="{margin - 4}" y="{y + 9}" text-anchor="end">{lo:.2f}</text>'
                 f'<text class="num" x="{margin + 124}" y="{y + 9}">{hi:.2f} cosine similarity</text></svg>')
    return "".join(parts)


def _name(names: list, k: int) -> str:
    return names[k] if 0 <= k < len(names) else ("unlabelled" if k < 0 else f"class {k}")


def _stat(key: str, label: str, value, extra: str = "") -> str:
    return (f'<tr data-stat="{esc(key)}"><th>{esc(label)}</th><td class="v">{esc(str(value))}</td>'
            f'<td class="l muted">{esc(extra)}</td></tr>')


def _selection_rows(data: _Rows) -> list[str]:
    n = len(data.labels)
    counts = dict(data.attrs.get("counts") or {})
    counts.setdefault("final", int(data.selected.sum()))
    config = data.attrs.get("config") or {}
    out = []
    if config:
        out.append(_stat("config", "selection", ", ".join(config.get("classifiers", [])) + " x " +
                         ", ".join(config.get("criteria", [])),
                         f"theta_cons {config.get('theta_cons')}, theta_gmm {config.get('theta_gmm')}"))
    for key, value in counts.items():
        label = {"intersection": "all tests passed", "filled": "filled in (empty classes)",
                 "final": "selected (final)"}.get(key, f"passes {key}")
        out.append(_stat(f"counts.{key}", label, int(value), _pct(value, n) + " of rows"))
    out.append(_stat("rejected", "rejected (labelled, not selected)",
                     int(((data.labels >= 0) & ~data.selected).sum()),
                     _pct(((data.labels >= 0) & ~data.selected).sum(), n) + " of rows"))
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
            out.append(_stat(f"seconds.{group}", f"{group} (s)",
                             ", ".join(f"{k} {float(v):.2f}" for k, v in seconds.items())))
    out.append(_stat("seconds.report", "report (s)", ", ".join(f"{k} {v:.2f}" for k, v in report_seconds.items())))
    return out


def _summary_html(cache: Cache, data: _Rows, info: dict) -> str:
    from engine.models import describe

    n = len(data.labels)
    labelled = int((data.labels >= 0).sum())
    head = [_stat("rows", "rows", n), _stat("labelled", "labelled", labelled, f"{n - labelled} unlabelled"),
            _stat("classes", "classes", len(data.names)),
            _stat("model", "model", _short(describe(cache.identity), 40), cache.manifest.get("precision") or ""),
            _stat("shards", "shards", len(data.urls), f"{cache.manifest.get('bad_samples', 0)} bad samples at embed"),
            _stat("thumbnails", "thumbnails", info["thumbnails"], f"{info['thumb']} px JPEG in thumbs/"),
            _stat("placeholders", "placeholders", info["placeholders"],
                  "; ".join(f"{k}: {v}" for k, v in info["placeholder_reasons"].items())),
            _stat("neighbours", "neighbours", info["neighbours"], info["neighbour_source"])]
    return ('<div class="cols"><table class="kv summary">' + "".join(head) + "</table>"
            '<table class="kv selection">' + "".join(_selection_rows(data)) + "</table>"
            '<table class="kv timings">' + "".join(_timing_rows(cache, info["seconds"])) + "</table></div>")


def _tiles(data: _Rows, info: dict) -> str:
    """The headline figures as large numbers."""
    n = len(data.labels)
    kept = int(data.selected.sum())
    rejected = int(((data.labels >= 0) & ~data.selected).sum())
    tiles = [("rows", f"{n}", f"rows, {len(data.names)} classes"),
             ("selected", f"{kept}", f"selected ({_pct(kept, n)})"),
             ("rejected", f"{rejected}", f"rejected ({_pct(rejected, n)})")]
    metrics = data.attrs.get("metrics") or {}
    for key, label in (("precision", "precision"), ("recall", "recall"), ("f1", "F1")):
        if key in metrics:
            tiles.append((key, f"{metrics[key]:.3f}", f"{label} vs true labels"))
    tiles.append(("placeholders", f"{info['placeholders']}", "images not found" if info["placeholders"]
                  else "all images found"))
    warn = lambda key: " warn" if key == "placeholders" and info["placeholders"] else ""  # noqa: E731
    return '<div class="tiles">' + "".join(
        f'<div class="tile{warn(key)}" data-tile="{key}"><b>{esc(value)}</b><span>{esc(text)}</span></div>'
        for key, value, text in tiles) + "</div>"


def _class_table(classes, stats: dict, names: list, href) -> str:
    truth = "wrong" in stats
    head = ('<tr><th>#</th><th class="l">class</th><th>labelled</th><th>selected</th><th>rejected</th>'
            "<th>rejected share</th>" + ("<th>wrong labels</th><th>wrong among selected</th>" if truth else "")
            + "</tr>")
    rows = []
    for c in classes:
        cells = "".join(f'<td data-col="{k}">{int(stats[k][c])}</td>' for k in ("labelled", "selected", "rejected"))
        cells += f'<td data-col="rejected_share">{_pct(stats["rejected"][c], stats["labelled"][c])}</td>'
        if truth:
            cells += "".join(f'<td data-col="{k}">{int(stats[k][c])}</td>' for k in ("wrong", "wrong_selected"))
        rows.append(f'<tr data-class="{c}"><td>{c}</td><td class="l"><a href="{href(c)}">{esc(names[c])}</a>'
                    f"</td>{cells}</tr>")
    return f'<table class="classes">{head}{"".join(rows)}</table>'


def _list_name(page: int) -> str:
    return "index.html" if page == 0 else f"index-{page + 1}.html"


def _pager(page: int, pages: int, first: int, last: int, total: int) -> str:
    links = " ".join(f"<b>{p + 1}</b>" if p == page else f'<a href="{_list_name(p)}">{p + 1}</a>'
                     for p in range(pages))
    return f'<nav class="pager">classes {first}-{last} of {total}, most rejected share first; pages: {links}</nav>'


def _class_file(c: int, num_classes: int) -> str:
    return f"classes/{c:0{max(4, len(str(num_classes - 1)))}d}.html"


def _list_pages(cache: Cache, data: _Rows, stats: dict, conf: Confusable | None, info: dict,
                config: ReportConfig) -> dict[str, str]:
    """index.html (summary, chart, heatmap, table) and index-2.html ... (chart, table)."""
    c = len(data.names)
    order = class_order(stats)
    per = config.classes_per_page
    pages = max(1, -(-c // per))
    href = lambda k: _class_file(k, c)  # noqa: E731
    scale = int(stats["labelled"].max()) if c else 1
    title = f"engine report: {cache.path}"
    out = {}
    for page in range(pages):
        chunk = order[page * per:(page + 1) * per]
        pager = _pager(page, pages, page * per + 1, page * per + len(chunk), c)
        body = [f'<h1>{esc(title)}</h1><p class="sub">What the selection rejected, per class: '
                f"{len(data.labels)} rows, {c} classes; click a class for its rejected samples.</p>"]
        if page == 0:
            body.append(_tiles(data, info))
        body.append(f"<h2>Selected vs rejected per class</h2>{pager}"
                    + bar_chart(chunk, stats, data.names, scale_max=scale, href=href))
        if page == 0:
            body.append(_heatmap_section(conf, data.names, href))
            body.append("<h2>Summary</h2>" + _summary_html(cache, data, info))
        body.append("<h2>Classes</h2>" + _class_table(chunk, stats, data.names, href) + pager)
        body.append(_footer(config))
        out[_list_name(page)] = _page(title if page == 0 else f"{title} (page {page + 1})", "\n".join(body))
    return out


def _heatmap_section(conf: Confusable | None, names: list, href) -> str:
    if conf is None:
        return '<h2>Confusable classes</h2><p class="muted">Fewer than two classes.</p>'
    pairs = "".join(f'<tr><td class="l"><a href="{href(a)}">{esc(names[a])}</a></td><td class="l">'
                    f'<a href="{href(b)}">{esc(names[b])}</a></td><td>{v:.3f}</td></tr>' for a, b, v in conf.pairs)
    return (f'<h2>Confusable classes</h2><p class="sub">Cosine similarity of {esc(conf.source)}; the '
            f'{len(conf.classes)} classes of the most similar pairs.</p><div class="cols">'
            + heatmap(conf, names, href=href)
            + '<table class="pairs"><tr><th class="l">class</th><th class="l">class</th><th>similarity</th>'
            + f"</tr>{pairs}</table></div>")


def _image(row: int, thumbs: Thumbnails, size: int, alt: str) -> str:
    path = thumbs.paths.get(row)
    if path is None:
        return placeholder_svg(thumbs.problems.get(row, ("no image", "")), size)
    return f'<img src="../{path}" width="{size}" height="{size}" alt="{esc(alt)}" title="{esc(alt)}">'


def _card(row: int, sims: np.ndarray, ids: np.ndarray, data: _Rows, thumbs: Thumbnails, size: int) -> str:
    names, label, key = data.names, int(data.labels[row]), str(data.keys[row])
    lines = [f'<div class="key" title="{esc(key)}">{esc(key)}</div>',
             f"<div>given: <b>{esc(_name(names, label))}</b></div>"]
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
    neighbours = []
    for s, i in zip(sims.tolist(), ids.tolist()):
        if i < 0:
            continue
        other = int(data.labels[i])
        neighbours.append(
            f'<li class="nb" data-row="{i}" data-sim="{s:.4f}">{_image(i, thumbs, 56, str(data.keys[i]))}'
            f'<span class="{"same" if other == label else "other"}">{esc(_name(names, other))}</span>'
            f"<span>{s:.3f}</span></li>")
    nbs = f'<ol class="nbs">{"".join(neighbours)}</ol>' if neighbours else ""
    return (f'<figure class="sample" data-row="{row}" data-key="{esc(key)}"><div class="main">'
            f"{_image(row, thumbs, size, key)}<figcaption>{''.join(lines)}</figcaption></div>{nbs}</figure>")


def _class_page(c: int, rows: np.ndarray, sims: np.ndarray, ids: np.ndarray, data: _Rows, stats: dict,
                thumbs: Thumbnails, config: ReportConfig) -> str:
    names, total = data.names, len(data.names)
    nav = ['<a href="../index.html">index</a>']
    if c > 0:
        nav.append(f'<a href="../{_class_file(c - 1, total)}">previous class</a>')
    if c + 1 < total:
        nav.append(f'<a href="../{_class_file(c + 1, total)}">next class</a>')
    n, kept, rej = (int(stats[k][c]) for k in ("labelled", "selected", "rejected"))
    facts = f"{n} labelled, {kept} selected, {rej} rejected ({_pct(rej, n)})"
    if "wrong" in stats:
        facts += (f"; true labels: {int(stats['wrong'][c])} wrongly labelled, "
                  f"{int(stats['wrong'][c] - stats['wrong_selected'][c])} of them rejected")
    cards = "".join(_card(int(r), sims[i], ids[i], data, thumbs, config.thumb) for i, r in enumerate(rows))
    gallery = (f'<div class="grid">{cards}</div>' if cards
               else '<p class="muted">No rejected samples in this class.</p>')
    body = (f'<nav>{" ".join(nav)}</nav><h1>class {c}: {esc(_name(names, c))}</h1><p class="sub">{facts}</p>'
            f"<h2>Rejected samples: {len(rows)} of {rej} shown, most suspicious first</h2>{gallery}"
            + _footer(config))
    return _page(f"{_name(names, c)} - engine report", body)


# ---------------------------------------------------------------- the report
def _placeholder_summary(thumbs: Thumbnails) -> tuple[dict, list]:
    reasons: dict[str, int] = {}
    missing = set()
    for kind, detail in thumbs.problems.values():
        reasons[kind] = reasons.get(kind, 0) + 1
        if kind == "shard missing":
            missing.add(detail)
    return reasons, sorted(missing)


def report_folder(out: Path) -> FolderSwap:
    """The report's output folder: marked by MARKER, replaced whole (`engine.outputs.FolderSwap`)."""
    return FolderSwap(Path(out), command="report", marker=MARKER, outputs=_OUTPUTS)


def write_report(cache_path: str, out_dir: str, config: ReportConfig | None = None, *, device: str = "auto",
                 show_progress: bool | None = None) -> dict:
    """Write the HTML report of the cache's selection into `out_dir`; returns a summary.

    The report is built in a hidden folder next to `out_dir` and swapped in when complete, so a
    failure leaves an earlier report there untouched.

    Memory: the cache's row columns and selection, plus the features (N x D float16) when
    neighbours or image-centroid similarities have to be computed."""
    config = config or ReportConfig()
    started, timer = time.perf_counter(), Timer()
    out = Path(out_dir)
    folder = report_folder(out)
    for line in folder.recover():   # a run killed mid-way (SIGKILL, power) leaves hidden folders
        _logger.warning("report: %s", line)
    folder.check()
    resolve_device(device)   # `--device cuda` without CUDA fails here, before any work
    cache = Cache(cache_path)
    with timer("load"):
        data = _read_rows(cache)
    stage = folder.stage(("classes",))   # built here, swapped in at the end: a failure leaves the earlier report
    try:
        summary = _write(cache, cache_path, data, stage, out, config, device, show_progress, timer, started)
        folder.swap_in(stage)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        folder.release()
    return summary


def _write(cache: Cache, cache_path: str, data: _Rows, stage: Path, out: Path, config: ReportConfig, device: str,
           show_progress: bool | None, timer: Timer, started: float) -> dict:
    """The report's files, written into `stage`; paths in the summary name `out`."""
    num_classes = len(data.names)
    stats = class_stats(data.labels, data.selected, num_classes, data.true)
    shown = rank_rejected(data.labels, data.selected, data.suspicion, per_class=config.per_class)
    k = min(config.neighbours, max(0, cache.num_rows - 1))
    features = functools.cache(cache.load_features)   # read at most once, only when needed
    with timer("neighbours"):
        sims, ids, source = find_neighbours(cache, shown, k, device=device, features=features)
    with timer("thumbnails"):
        thumbs = write_thumbnails(np.concatenate([shown, ids[ids >= 0]]), data, stage, size=config.thumb,
                                  workers=config.workers, show_progress=show_progress,
                                  previous=out if (out / MARKER).is_file() else None)
    with timer("similarity"):
        conf = confusable_classes(cache, data, min(config.heatmap_classes, num_classes), features=features)
    reasons, missing = _placeholder_summary(thumbs)
    info = {"thumbnails": len(thumbs.paths), "thumb": config.thumb, "placeholders": len(thumbs.problems),
            "placeholder_reasons": reasons, "neighbours": k, "neighbour_source": source,
            "seconds": timer.rounded(2)}
    with timer("pages"):
        pages = _list_pages(cache, data, stats, conf, info, config)
        bounds = np.searchsorted(data.labels[shown], np.arange(num_classes + 1))
        for c in range(num_classes):
            part = slice(bounds[c], bounds[c + 1])
            pages[_class_file(c, num_classes)] = _class_page(c, shown[part], sims[part], ids[part], data, stats,
                                                             thumbs, config)
        for name, text in pages.items():
            (stage / name).write_text(text, encoding="utf-8")
    summary = {"cache": cache_path, "out": str(out), "index": str(out / "index.html"), "pages": len(pages),
               "list_pages": len(pages) - num_classes, "class_pages": num_classes, "classes": num_classes,
               "rows": len(data.labels), "selected": int(data.selected.sum()),
               "rejected": int(stats["rejected"].sum()), "shown": int(shown.size),
               "thumbnails": info["thumbnails"], "thumbnails_reused": thumbs.reused,
               "placeholders": info["placeholders"],
               "placeholder_reasons": reasons, "missing_shards": missing,
               "neighbours": {"k": k, "source": source},
               "heatmap": None if conf is None else {"classes": len(conf.classes), "source": conf.source},
               "config": asdict(config),
               "seconds": {**timer.rounded(), "total": round(time.perf_counter() - started, 3)}}
    (stage / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def summary_lines(s: dict):
    """The short stdout summary of `write_report`."""
    yield (f"report: {s['index']} ({s['list_pages']} list page{'s' * (s['list_pages'] != 1)}, "
           f"{s['class_pages']} class pages)")
    yield (f"  shown {s['shown']} of {s['rejected']} rejected samples, {s['neighbours']['k']} neighbours each "
           f"({s['neighbours']['source']}); {s['thumbnails']} thumbnails"
           + (f" ({s['thumbnails_reused']} from the previous report)" if s.get("thumbnails_reused") else "")
           + f", {s['placeholders']} placeholders"
           + (f" (shards missing: {', '.join(s['missing_shards'][:3])})" if s["missing_shards"] else ""))
    yield f"  in {s['seconds']['total']:.2f} s"
