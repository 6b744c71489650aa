"""Thumbnails read back from the shards by provenance (one pass per shard), reused from an earlier
report when the shard, position, key and size are unchanged; placeholders for what cannot be read."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.files import read_json
from engine.report.config import IMPORTED
from engine.report.rows import Rows
from engine.runtime import EngineError, available_cores, progress

_logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- thumbnails
@dataclass
class Thumbnails:
    """Per row either a thumbnail path relative to the report folder or a placeholder reason."""

    paths: dict = field(default_factory=dict)  # row -> "thumbs/00000/000012.jpg"
    problems: dict = field(default_factory=dict)  # row -> (kind, detail): ("shard missing", "NAME")
    reused: int = 0  # taken from the previous report, not re-read


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


def _shard_thumbnails(
    url: str, rows: np.ndarray, positions: np.ndarray, keys, out: Path, folder: str, size: int, tick
) -> list[tuple[int, str | None, tuple[str, str] | None]]:
    """Read one shard once and write the thumbnails of `rows` at `positions` (sorted):
    [(row, relative path or None, (kind, detail) of the problem or None)]. Placeholders are
    grouped by kind, so the kind never names a key; the detail does."""
    from engine.reader import decode_image, read_samples

    name = _shard_name(url)
    if url.startswith(IMPORTED):
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
            found[row] = (None, ("key mismatch", f"{name}: found {sample.get('__key__')}, expected {keys[row]}"[:200]))
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
THUMB_FORMAT = "jpeg-q85-lanczos-1"  # how thumbnails are drawn: a change redraws them all


def _previous_thumbnails(previous: Path | None, size: int) -> dict:
    """The previous report's thumbnail index (folder -> {url, fingerprint, keys}) when it was
    made at the same size and format; {} otherwise, and for anything misshapen."""
    if previous is None:
        return {}
    try:
        index = read_json(previous / THUMB_INDEX)
    except ValueError:
        return {}
    if not (
        isinstance(index, dict)
        and index.get("size") == size
        and index.get("format") == THUMB_FORMAT
        and isinstance(index.get("shards"), dict)
    ):
        return {}
    return {
        folder: entry
        for folder, entry in index["shards"].items()
        if isinstance(entry, dict) and isinstance(entry.get("keys"), dict)
    }


def _thumb_fingerprints(urls: list[str]) -> dict:
    """url -> what must be unchanged for a thumbnail to be reused: `reader.shard_fingerprints`
    (size and edges; size and ETag on object stores) plus, for local files, mtime and inode, so
    an image replaced in the middle of a tar of the same size is redrawn."""
    from engine.reader import shard_fingerprints

    out = shard_fingerprints(urls)
    for url, fingerprint in out.items():
        if fingerprint is not None and os.path.isfile(url):  # object stores: the ETag already says it
            st = os.stat(url)
            out[url] = f"{fingerprint}:{st.st_mtime_ns}:{st.st_ino}"
    return out


def _link(source: Path, target: Path) -> bool:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)  # same parent folder as the stage: a hard link, no copy
    except OSError:
        try:
            shutil.copyfile(source, target)
        except OSError:
            return False
    return True


def write_thumbnails(
    rows: np.ndarray,
    data: Rows,
    out: Path,
    *,
    size: int,
    workers: int | None = None,
    show_progress: bool | None = None,
    previous: Path | None = None,
) -> Thumbnails:
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
    urls = sorted({data.urls[shard[g[0]]] for g in groups if not data.urls[shard[g[0]]].startswith(IMPORTED)})
    fingerprints = _thumb_fingerprints(urls) if urls else {}
    before = _previous_thumbnails(previous, size)
    todo = []
    for g in groups:
        url, folder = data.urls[shard[g[0]]], f"{shard[g[0]]:05d}"
        old = before.get(folder, {})
        same_file = (
            old.get("url") == url and fingerprints.get(url) is not None and old.get("fingerprint") == fingerprints[url]
        )
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
            futures = [
                pool.submit(
                    _shard_thumbnails,
                    data.urls[shard[g[0]]],
                    rows[g],
                    position[g],
                    data.keys,
                    out,
                    f"{shard[g[0]]:05d}",
                    size,
                    tick,
                )
                for g in todo
            ]
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
