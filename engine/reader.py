"""Streaming WebDataset reader: shard specs → sorted shard list → per-shard decoded batches.

Shards are the unit of work and of commit: a DataLoader worker reads whole shards (shard i
goes to worker i mod W; ranks split the list first), decodes and preprocesses images, and
yields batches that never span two shards. The last batch of a shard carries the shard's
outcome (samples read, bad samples with reasons, or the error that stopped it).
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from engine.runtime import EngineError

_logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_REMOTE = ("pipe:", "http://", "https://", "s3://", "s3a://", "gs://", "gcs://", "az://", "abfs://", "ais://", "hf://")
_FSSPEC = ("s3://", "s3a://", "gs://", "gcs://", "az://", "abfs://")  # opened with fsspec (s3fs, gcsfs, adlfs)


def iter_tar_samples(url: str) -> Iterator[dict]:
    """webdataset samples of one tar: local paths, pipe:, http(s) through webdataset's openers;
    object-store URLs (s3://, gs://, az://) through fsspec, with the same credentials and
    endpoint settings as an fsspec cache URL (e.g. FSSPEC_S3_ENDPOINT_URL)."""
    import webdataset as wds

    if not url.startswith(_FSSPEC):
        yield from wds.tariterators.tarfile_samples([{"url": url}])
        return
    import fsspec

    with fsspec.open(url, "rb") as stream:
        yield from wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander([{"url": url, "stream": stream}]))


def expand_shards(specs: list[str] | tuple[str, ...]) -> list[str]:
    """Brace ranges, globs, several arguments, `pipe:` and URLs → a sorted, de-duplicated list.

    Local paths must exist (an error names the first missing one before any work starts).
    """
    import braceexpand

    if not specs:
        raise EngineError("shards: no shard given; expected paths like shards/{000..099}.tar")
    urls: list[str] = []
    for spec in map(str, specs):
        for url in braceexpand.braceexpand(spec):
            if url.startswith(_REMOTE):
                urls.append(url)
            elif glob.has_magic(url):
                found = glob.glob(url)
                if not found:
                    raise EngineError(f"shards: the pattern {url!r} matches no file")
                urls.extend(os.path.abspath(p) for p in found)
            else:
                if not os.path.isfile(url):
                    raise EngineError(f"shards: {url!r} does not exist")
                urls.append(os.path.abspath(url))
    return sorted(dict.fromkeys(urls))


def split_for_rank(
    shards: list, rank: int, world_size: int, sizes: list | None = None, *, tolerance: float = 0.05
) -> list:
    """Rank `rank`'s share of a plan of shards, in plan order; every rank computes the same split.

    Every world_size-th shard from `rank` on (round robin, which keeps ranks moving through the
    plan together, so the leader can append the committed prefix as it grows). When `sizes`
    (bytes per shard, all known) show that round robin leaves the busiest rank more than
    `tolerance` above the mean, the shards are balanced by bytes instead: largest first, each to
    the rank with the fewest bytes so far (ties: plan order, lower rank), the LPT rule, within
    4/3 of the best possible split; it is used only when it beats round robin."""
    robin = shards[rank::world_size]
    if world_size == 1 or sizes is None or len(sizes) != len(shards) or any(not s or s < 0 for s in sizes):
        return robin
    loads = [sum(sizes[r::world_size]) for r in range(world_size)]
    if max(loads) <= (1 + tolerance) * sum(sizes) / world_size:
        return robin
    import heapq

    heap = [(0, r) for r in range(world_size)]
    owner = [0] * len(shards)
    for i in sorted(range(len(shards)), key=lambda i: (-sizes[i], i)):
        load, r = heapq.heappop(heap)
        owner[i] = r
        heapq.heappush(heap, (load + sizes[i], r))
    if max(load for load, _ in heap) >= max(loads):
        return robin
    return [shard for shard, r in zip(shards, owner) if r == rank]


def parse_label(sample: dict, key: str | None) -> int | None:
    """The integer label under `key` (`cls`, or `json:FIELD`); None when absent or unreadable."""
    if not key:
        return None
    if key.startswith("json:"):
        raw = sample.get("json")
        if raw is None:
            return None
        try:
            value = json.loads(raw)
            for part in key[5:].split("."):
                value = value[part]
            return int(value)
        except (ValueError, KeyError, TypeError):
            return None
    raw = sample.get(key)
    if raw is None:
        return None
    try:
        return int(raw.decode() if isinstance(raw, bytes) else raw)
    except (ValueError, UnicodeDecodeError):
        return None


def image_bytes(sample: dict) -> tuple[str, bytes]:
    """(field, bytes) of the first present of jpg/jpeg/png/webp; ValueError when none is."""
    for ext in IMAGE_KEYS:
        if ext in sample:
            return ext, sample[ext]
    raise ValueError(f"no image under any of {', '.join(IMAGE_KEYS)}")


def is_jpeg(data: bytes) -> bool:
    """JPEG by its magic bytes (the field name may lie)."""
    return data[:3] == b"\xff\xd8\xff"


def decode_image(sample: dict, *, draft: int | None = None) -> Image.Image:
    """The first present of jpg/jpeg/png/webp decoded to RGB; raises ValueError with a reason.

    `draft`: a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides at
    least `draft` pixels (PIL's `Image.draft`), which is several times faster for photos larger
    than the model needs; other formats are decoded whole."""
    ext, data = image_bytes(sample)
    try:
        image = Image.open(io.BytesIO(data))
        if draft and image.format == "JPEG":
            image.draft("RGB", (draft, draft))
        image.load()
        return image.convert("RGB")
    except Exception as err:  # PIL raises many types for bad data
        reason = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the bytes", str(err))  # no addresses: reruns match
        raise ValueError(f"cannot decode {ext}: {type(err).__name__}: {reason}") from None


def check_end_of_archive(url: str) -> None:
    """Raise ValueError when a tar lacks the end-of-archive marker (two zero blocks).

    Python's tarfile treats a file cut exactly between two members as a complete archive; a
    truncated shard would then lose its tail silently. Local files and object-store URLs
    (one ranged read of the last 1 KiB) are checked; pipe: and http(s) streams are not.
    """
    if url.startswith(_FSSPEC):
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        size = int(fs.size(path))
        tail = fs.cat_file(path, start=max(0, size - 1024), end=size) if size else b""
    elif url.startswith(_REMOTE) or not os.path.isfile(url):
        return
    else:
        size = os.path.getsize(url)
        with open(url, "rb") as handle:
            handle.seek(max(0, size - 1024))
            tail = handle.read()
    if size % 512 or len(tail) < 1024 or any(tail):
        raise ValueError(f"truncated: no end-of-archive marker ({size} bytes)")


def shard_fingerprints(urls: list[str], *, edge_bytes: int = 16384) -> dict[str, str | None]:
    """url → "size:digest" that changes when a shard file is rewritten, None where unknown.

    Local files: size and sha1 of the first and last `edge_bytes` (tar headers carry member
    names and times, so a rewrite shows there; a copy keeps it). Object stores: size and the
    store's ETag, from one listing per folder. pipe: and http(s) streams: None.
    """
    import hashlib

    out: dict[str, str | None] = {}
    remote: dict[str, list[str]] = {}
    for url in urls:
        if url.startswith(_FSSPEC):
            remote.setdefault(url.rsplit("/", 1)[0], []).append(url)
        elif url.startswith(_REMOTE) or not os.path.isfile(url):
            out[url] = None
        else:
            size = os.path.getsize(url)
            digest = hashlib.sha1()
            with open(url, "rb") as handle:
                digest.update(handle.read(edge_bytes))
                handle.seek(max(0, size - edge_bytes))
                digest.update(handle.read(edge_bytes))
            out[url] = f"{size}:{digest.hexdigest()[:16]}"
    for folder, members in remote.items():
        import fsspec

        fs, path = fsspec.core.url_to_fs(folder)
        try:
            listing = {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry for entry in fs.ls(path, detail=True)}
        except (FileNotFoundError, OSError):
            listing = {}
        for url in members:
            entry = listing.get(url.rsplit("/", 1)[-1])
            tag = entry and (entry.get("ETag") or entry.get("etag") or entry.get("md5Hash") or entry.get("mtime"))
            out[url] = f"{entry['size']}:{str(tag).strip(chr(34))}" if entry and tag else None
    return out


def fingerprint_size(fingerprint: str | None) -> int | None:
    """The byte size inside a `shard_fingerprints` value, None when there is none."""
    return int(fingerprint.split(":", 1)[0]) if fingerprint else None


def _remote_exists(url: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return bool(fs.exists(path))


def read_samples(url: str, positions=None) -> Iterator[tuple[int, dict]]:
    """Raw samples of one shard as (position, {"__key__": str, ext: bytes, ...}), in shard order.

    `positions` (iterable of ints, the `images/position` provenance) limits the output to those
    samples and stops reading after the last one; None yields every sample. Positions count
    samples exactly as `ShardReader` did at embed time. A missing shard raises EngineError
    naming it; an unreadable one raises ValueError with the reason.
    """
    if (not url.startswith(_REMOTE) and not os.path.isfile(url)) or (
        url.startswith(_FSSPEC) and not _remote_exists(url)
    ):
        raise EngineError(f"shard: {url!r} is no longer there (moved or deleted since it was embedded)")
    wanted = None if positions is None else set(int(p) for p in positions)
    last = None if wanted is None else (max(wanted) if wanted else -1)
    if last == -1:
        return
    try:
        for position, sample in enumerate(iter_tar_samples(url)):
            if wanted is None or position in wanted:
                yield position, {k: v for k, v in sample.items() if k != "__url__"}
            if last is not None and position >= last:
                return
    except EngineError:
        raise
    except Exception as err:
        first = str(err).split(" @ ")[0].splitlines()[0] if str(err) else ""
        raise ValueError(f"shard {url}: {type(err).__name__}: {first}"[:300]) from None


@dataclass
class ShardOutcome:
    """What happened to one shard: rows read, bad samples, or the error that stopped it."""

    shard: int
    url: str
    samples: int = 0
    bad: list = field(default_factory=list)  # [(key, reason)]
    missing_labels: int = 0
    error: str | None = None
    fatal: bool = False  # --strict: the run must stop (raised in the main process)
    read_seconds: float = 0.0
    bad_positions: list = field(default_factory=list)  # position of each bad sample, for merging stripes
    stripe: int = 0  # this part of the shard: samples with position % stripes == stripe
    stripes: int = 1


def merge_outcomes(parts: list[ShardOutcome]) -> ShardOutcome:
    """One shard's outcome from the outcomes of its stripes (read by different workers): the same
    record a single worker would have made, bad samples in position order."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    order = sorted(((p, k, r) for o in parts for p, (k, r) in zip(o.bad_positions, o.bad)), key=lambda t: t[0])
    errors = [o for o in parts if o.error]
    return ShardOutcome(
        shard=first.shard,
        url=first.url,
        samples=max(o.samples for o in parts),
        bad=[(k, r) for _, k, r in order],
        bad_positions=[p for p, _, _ in order],
        missing_labels=sum(o.missing_labels for o in parts),
        error=errors[0].error if errors else None,
        fatal=any(o.fatal for o in parts),
        read_seconds=sum(o.read_seconds for o in parts),
        stripes=first.stripes,
    )


@dataclass
class Batch:
    """Preprocessed images of one shard, with their metadata; `outcome` set on the shard's last batch."""

    shard: int
    images: torch.Tensor  # (B, 3, H, W) float32, or (B - B_j, ...) with undecoded JPEGs
    keys: list
    positions: np.ndarray  # (B,) int32 sample position within the shard
    labels: np.ndarray  # (B,) int32, -1 = missing
    true_labels: np.ndarray  # (B,) int32, -1 = missing
    outcome: ShardOutcome | None = None
    # GPU decoding: the undecoded JPEGs' bytes back to back in one uint8 tensor (one shared-memory
    # transfer per batch, not one per image), their (B_j + 1,) offsets and (B_j,) rows in the batch
    jpeg_data: torch.Tensor | None = None
    jpeg_offsets: np.ndarray | None = None
    jpeg_rows: np.ndarray | None = None

    @property
    def jpegs(self) -> list[torch.Tensor]:
        """The undecoded JPEGs as (n_bytes,) uint8 views of `jpeg_data`."""
        if self.jpeg_data is None:
            return []
        o = self.jpeg_offsets
        return [self.jpeg_data[o[i] : o[i + 1]] for i in range(len(o) - 1)]

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pin-memory thread (GPU runs): page-locked images."""
        if self.images is not None and self.images.numel():
            self.images = self.images.pin_memory()
        return self


class _StrictStop(Exception):
    """A bad sample under --strict: ends the shard; the main process raises."""


@dataclass(frozen=True)
class ReaderConfig:
    label_key: str | None = "cls"
    true_label_key: str | None = None
    batch_size: int = 256
    strict: bool = False
    draft: int | None = None  # decode JPEGs at reduced DCT scale, both sides >= this (None: whole)
    gpu_jpeg: bool = False  # leave JPEGs undecoded (bytes) for the GPU; decode the rest here


STRIPE_READ_COST = 0.05  # reading (not decoding) a whole shard, as a share of decoding it


def stripes_for(shards: int, workers: int) -> int:
    """Parts each shard is read in, so that `workers` decode workers all have work even with fewer
    shards than workers (each part decodes every k-th sample of the shard, but reads all of it).

    The k that finishes soonest: the busiest worker takes ceil(shards * k / workers) parts, each
    costing 1/k of a shard's decoding plus one read of the whole shard (8 shards on 14 workers:
    k = 5, 40 parts, 3 for the busiest worker, against 1 shard each on 8 workers and 6 idle)."""
    if not 0 < shards < workers:
        return 1
    cost = lambda k: -(-shards * k // workers) * (1 / k + STRIPE_READ_COST)  # noqa: E731
    return min(range(1, workers + 1), key=lambda k: (cost(k), k))


class ShardReader(torch.utils.data.IterableDataset):
    """Yields `Batch`es for `shards` [(index, url)]; each DataLoader worker takes whole work units
    (a shard, or with `stripes` k > 1 every k-th sample of a shard, so workers need not wait for
    shards); batches never span units and a unit's last batch carries its `ShardOutcome`."""

    def __init__(self, shards: list[tuple[int, str]], preprocess: Callable, config: ReaderConfig, *, stripes: int = 1):
        super().__init__()
        self.shards = shards
        self.preprocess = preprocess
        self.config = config
        self.units = [(index, url, j, stripes) for index, url in shards for j in range(stripes)]

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        mine = self.units if info is None else self.units[info.id :: info.num_workers]
        for index, url, stripe, stripes in mine:
            yield from self._read_shard(index, url, stripe, stripes)

    def _read_shard(self, index: int, url: str, stripe: int = 0, stripes: int = 1) -> Iterator[Batch]:
        import time

        outcome = ShardOutcome(shard=index, url=url, stripe=stripe, stripes=stripes)
        pending: list = []
        start = time.perf_counter()
        position = -1
        try:
            for position, sample in enumerate(iter_tar_samples(url)):
                if position % stripes != stripe:
                    continue
                item = self._prepare(sample, position, outcome)
                if item is not None:
                    pending.append(item)
                if len(pending) == self.config.batch_size:
                    outcome.read_seconds += time.perf_counter() - start
                    yield self._collate(index, pending)
                    pending, start = [], time.perf_counter()
            check_end_of_archive(url)
        except _StrictStop as stop:
            outcome.error, outcome.fatal = str(stop), True
        except Exception as err:  # a truncated or unreadable tar: the shard fails as a whole
            first = str(err).split(" @ ")[0].splitlines()[0] if str(err) else ""
            outcome.error = f"{type(err).__name__}: {first}"[:300] + f" (after sample {position + 1})"
        outcome.samples = position + 1
        outcome.read_seconds += time.perf_counter() - start
        batch = self._collate(index, pending)
        batch.outcome = outcome
        yield batch

    def _prepare(self, sample: dict, position: int, outcome: ShardOutcome):
        key = sample.get("__key__", f"#{position}")
        try:
            image = self._image(sample)
        except ValueError as err:
            if self.config.strict:
                raise _StrictStop(f"bad sample {key} in {outcome.url}: {err} (--strict)") from None
            outcome.bad.append((key, str(err)[:200]))
            outcome.bad_positions.append(position)
            return None
        label = parse_label(sample, self.config.label_key)
        if label is None:
            outcome.missing_labels += 1
            label = -1
        true_label = parse_label(sample, self.config.true_label_key)
        return key, image, position, label, -1 if true_label is None else true_label

    def _image(self, sample: dict):
        """The preprocessed image tensor, or with `gpu_jpeg` a JPEG's bytes."""
        if self.config.gpu_jpeg:
            _, data = image_bytes(sample)
            if is_jpeg(data):
                return bytes(data)
        return self.preprocess(decode_image(sample, draft=self.config.draft))

    @staticmethod
    def _collate(index: int, items: list) -> Batch:
        if not items:
            return Batch(
                shard=index,
                images=torch.empty(0),
                keys=[],
                positions=np.zeros(0, np.int32),
                labels=np.zeros(0, np.int32),
                true_labels=np.zeros(0, np.int32),
            )
        keys, images, positions, labels, true_labels = zip(*items)
        encoded = np.asarray([isinstance(im, bytes) for im in images], dtype=bool)
        decoded = [im for im, e in zip(images, encoded) if not e]
        jpegs = [im for im, e in zip(images, encoded) if e]
        return Batch(
            shard=index,
            images=torch.stack(decoded) if decoded else torch.empty(0),
            keys=list(keys),
            positions=np.asarray(positions, np.int32),
            labels=np.asarray(labels, np.int32),
            true_labels=np.asarray(true_labels, np.int32),
            jpeg_data=torch.frombuffer(bytearray(b"".join(jpegs)), dtype=torch.uint8) if jpegs else None,
            jpeg_offsets=np.concatenate([[0], np.cumsum([len(j) for j in jpegs])]) if jpegs else None,
            jpeg_rows=np.flatnonzero(encoded) if jpegs else None,
        )
