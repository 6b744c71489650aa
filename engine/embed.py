"""The embedding loop: shards → decoded batches (DataLoader workers) → CLIP under inference
mode and autocast → a writer thread that stages and commits each shard into the cache.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from engine import gpudecode, models
from engine.append import CacheWriter
from engine.cache import Cache
from engine.classes import encode_prompts, load_classes
from engine.distributed import ProcessGroup, process_group
from engine.reader import (
    ReaderConfig,
    ShardReader,
    decode_image,
    expand_shards,
    fingerprint_size,
    merge_outcomes,
    shard_fingerprints,
    split_for_rank,
    stripes_for,
)
from engine.runtime import (
    EngineError,
    Timer,
    autocast,
    available_cores,
    distributed_context,
    progress,
    resolve_device,
    resolve_precision,
    worker_init_single_thread,
)

_logger = logging.getLogger(__name__)
_SLOW_WRITE = float(os.environ.get("ENGINE_TEST_SLOW_WRITE", "0") or 0)
_SLOW_BATCH = float(os.environ.get("ENGINE_TEST_SLOW_BATCH", "0") or 0)
_SLOW_RANK = os.environ.get("ENGINE_TEST_SLOW_WRITE_RANK")  # only this rank is slowed (tests)


def _slowed(seconds: float) -> float:
    """A testing aid's delay on this rank (all ranks unless ENGINE_TEST_SLOW_WRITE_RANK names one)."""
    return seconds if _SLOW_RANK in (None, os.environ.get("RANK", "0")) else 0.0


CONSOLIDATE_EVERY_S = float(os.environ.get("ENGINE_CONSOLIDATE_EVERY_S", "5"))
_PRECISION_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class _Stopped(EngineError):
    """Another rank failed and asked every rank to stop."""


@dataclass(frozen=True)
class EmbedConfig:
    model: str = "shapes-tiny"
    pretrained: str | None = None
    classes: str | None = None
    label_key: str | None = "cls"
    true_label_key: str | None = None
    batch_size: int = 256
    workers: int | None = None  # None: half the cores on CPU (at least 1), up to 8 on GPU
    precision: str = "auto"
    device: str = "auto"
    strict: bool = False
    exact_decode: bool = False  # False: JPEGs decoded at a reduced DCT scale (see DRAFT_MARGIN)
    gpu_decode: bool = True  # with a CUDA device: JPEGs decoded and resized on the GPU (nvJPEG)

    @property
    def decode(self) -> str:
        """How images are decoded, recorded in the cache's model identity."""
        return "exact" if self.exact_decode else "reduced"

    def __post_init__(self):
        if self.batch_size < 1:
            raise EngineError(f"batch-size: got {self.batch_size}, expected a positive integer")
        if self.workers is not None and self.workers < 0:
            raise EngineError(f"workers: got {self.workers}, expected 0 or more")


DRAFT_MARGIN = 1.25  # reduced JPEG decoding keeps both sides >= 1.25 x the model's resize target:
# measured on photo-like JPEGs with the bundled model (64 px), cosine to full decoding mean >= 0.999,
# 1st percentile >= 0.994; at a margin of 1 the reduced image can land exactly on the target and the
# model's own antialiased resize is skipped (minimum 0.93). benchmarks/bench_embed.py records it.


def draft_size(identity: dict, config: EmbedConfig) -> int | None:
    """The short side JPEGs are decoded to at least (None: decode whole)."""
    if config.exact_decode:
        return None
    size = identity.get("preprocess", {}).get("size")
    if size is None:
        return None
    target = max(size) if isinstance(size, (list, tuple)) else int(size)
    return int(math.ceil(DRAFT_MARGIN * target))


def with_decode(identity: dict, config: EmbedConfig) -> dict:
    """The model identity recorded in the cache, with how its images are decoded."""
    return {**identity, "preprocess": {**identity.get("preprocess", {}), "decode": config.decode}}


def plan_cpu_split(workers: int | None, device: torch.device) -> tuple[int, int | None]:
    """(DataLoader workers, torch threads for the model or None to leave as is).

    On CPU the decoding workers and the model share the cores: measured on 2 cores, 1 worker
    and 1 model thread embedded 1.6x faster than 2 workers and 2 threads (oversubscription).
    So the default is half the cores for workers, and the model gets the cores they leave."""
    cores = available_cores()
    if workers is None:
        workers = min(8, cores) if device.type == "cuda" else max(1, cores // 2)
    if device.type != "cpu":
        return workers, None
    return workers, max(1, min(torch.get_num_threads(), cores - workers))


class _Writer(threading.Thread):
    """Collects each shard's rows and stages + commits the shard when its last batch arrives."""

    def __init__(self, cache: Cache, *, consolidate: list[int] | None, timer: Timer):
        """`consolidate`: the run's plan of shard indexes when this process is the consolidator
        (rows are appended in plan order as shards complete), None on other ranks."""
        super().__init__(daemon=True, name="engine-writer")
        self.cache, self.consolidate, self.timer = cache, consolidate, timer
        self.inbox: queue.Queue = queue.Queue(maxsize=64)
        self.parts: dict[int, list] = {}
        self.done: list[dict] = []
        self.failed: list[dict] = []
        self.error: BaseException | None = None
        self.last_consolidate = float("-inf")
        self.stripes: dict[int, list] = {}  # shard -> outcomes of its stripes received so far
        self.summary: dict = {}  # how the run decoded (for the summary)
        self.late_bad: dict[int, list] = {}  # shard -> [(key, reason, position)] found undecodable on the GPU side

    def run(self) -> None:
        while True:
            item = self.inbox.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain after a failure so the producer never blocks
            try:
                with self.timer("write"):
                    self._handle(*item)
            except BaseException as err:  # surfaced in the main thread
                self.error = err

    def _handle(self, shard: int, features, batch, outcome) -> None:
        if isinstance(features, _InFlight):
            features = features.numpy()
        if features is not None and len(batch.keys):
            self.parts.setdefault(shard, []).append((features, batch))
        if outcome is None:
            return
        stripes = self.stripes.setdefault(shard, [])
        stripes.append(outcome)
        if len(stripes) < outcome.stripes:
            return  # other workers still read this shard's other stripes
        outcome = merge_outcomes(self.stripes.pop(shard))
        for key, reason, position in self.late_bad.pop(shard, []):
            outcome.bad.append((key, reason))
            outcome.bad_positions.append(position)
        parts = self.parts.pop(shard, [])
        record = asdict(outcome)
        if outcome.error:
            self.cache.stage_failure(shard, record)
            self.failed.append(record)
            self._consolidate()
            return
        feats = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, self.cache.dim), np.float16)
        cat = lambda name: np.concatenate([getattr(p[1], name) for p in parts]) if parts else np.zeros(0, np.int32)
        keys = [k for p in parts for k in p[1].keys]
        if outcome.stripes > 1:  # rows in sample order, as one worker would have read them
            order = np.argsort(cat("positions"), kind="stable")
            feats, keys = feats[order], [keys[i] for i in order]
            cat = lambda name, _cat=cat: _cat(name)[order]
        if _slowed(_SLOW_WRITE):
            time.sleep(_SLOW_WRITE)  # testing aid: widen the window in which a kill lands mid-run
        self.cache.stage_shard(
            shard,
            features=feats,
            keys=keys,
            labels=cat("labels"),
            true_labels=cat("true_labels"),
            positions=cat("positions"),
            outcome=record,
        )
        self.done.append(record)
        self._consolidate()

    def _consolidate(self) -> None:
        """Append the committed prefix of the plan, at most every CONSOLIDATE_EVERY_S seconds (one
        manifest write per call: the manifest grows with the shard count); the rest is appended
        at the end of the run."""
        now = time.monotonic()
        if self.consolidate is not None and now - self.last_consolidate >= CONSOLIDATE_EVERY_S:
            self.cache.consolidate(self.consolidate)
            self.last_consolidate = time.monotonic()


def _update_prompts(cache: Cache, class_set, loaded: models.LoadedModel, device) -> bool:
    if cache.text_fingerprint() == class_set.fingerprint():
        return False
    features, mask = encode_prompts(class_set, loaded.model, loaded.tokenizer, device=device)
    cache.write_text(class_set, features, mask)
    return True


def write_prompts(cache_path: str, classes: str, *, device: str = "auto") -> dict:
    """Recompute text/* of an existing cache with the cache's own model; images untouched."""
    cache = CacheWriter(cache_path)
    identity = cache.identity
    if not identity:
        raise EngineError(f"cache: {cache_path} has no model recorded; embed or import features first")
    if identity.get("pretrained") == "imported":
        raise EngineError(
            f"cache: {cache_path} holds imported features; their text features must be imported "
            "too (text_features in the .npz), since the model that made them is not known here"
        )
    class_set = load_classes(classes)
    torch_device = resolve_device(device)
    loaded = models.load_model(identity["model"], _weights_spec(identity), device=torch_device)
    if not models.same_model(identity, loaded.identity, images=False):
        raise EngineError(
            f"cache: {cache_path} was made by {models.describe(identity)} but the model found "
            f"now is {models.describe(loaded.identity)}; pass the same weights file"
        )
    features, mask = encode_prompts(class_set, loaded.model, loaded.tokenizer, device=torch_device)
    cache.write_text(class_set, features, mask)
    return {
        "cache": cache_path,
        "classes": class_set.num_classes,
        "prompts": int(mask.sum()),
        "max_prompts": int(mask.shape[1]),
        "fingerprint": class_set.fingerprint(),
    }


def _weights_spec(identity: dict) -> str | None:
    """The --pretrained value that reproduces a recorded identity (tags; bundled models)."""
    pretrained = identity.get("pretrained", "")
    if identity.get("model") in models.BUNDLED or pretrained in ("folder", models.RANDOM):
        return None if pretrained != models.RANDOM else pretrained
    if pretrained.startswith("file:"):
        raise EngineError(
            f"cache: made from the weights file {pretrained[5:]!r}; "
            "`engine prompts` needs it: re-run `engine embed --classes` with the same --pretrained"
        )
    return pretrained


def _check_identity_early(cache: Cache, config: EmbedConfig) -> None:
    """Refuse a different model before any weights are loaded (cheap fields only)."""
    stored = cache.identity
    if not stored:
        return
    _, partial = models.resolve(config.model, config.pretrained, probe=False)
    for field in ("model", "pretrained", "sha256"):
        if field in partial and stored.get(field) != partial[field]:
            raise EngineError(
                f"cache: {cache.path} holds features of {models.describe(stored)}, but this run "
                f"uses {models.describe(partial)}; use another --cache or the same model"
            )
    stored_decode = models.decode_of(stored)
    if stored_decode != config.decode:
        flag = "with --exact-decode" if stored_decode == "exact" else "without --exact-decode"
        raise EngineError(
            f"cache: {cache.path} holds images decoded {stored_decode}ly (JPEGs "
            f"{'at full size' if stored_decode == 'exact' else 'at a reduced DCT scale'}); this run decodes "
            f"them {config.decode}ly; rerun {flag}, or use another --cache"
        )


def embed_shards(
    specs: list[str],
    cache_path: str,
    config: EmbedConfig,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    show_progress: bool | None = None,
) -> dict:
    """Embed every image of `specs` into `cache_path` once; returns a summary dict.

    Under torch.distributed (torchrun sets RANK and WORLD_SIZE; `rank`/`world_size` default to
    them) every rank calls this with the same arguments: rank 0 prepares the cache and the plan
    (pending shards in sorted order), each rank embeds plan[rank::world_size] and stages its
    shards, rank 0 appends staged shards in plan order as they complete, and all ranks meet
    once at the end, where rank 0 completes the manifest. The summary covers all ranks.
    """
    if rank is None or world_size is None:
        rank, world_size = distributed_context()
    with process_group(rank, world_size) as group:
        return _embed(specs, cache_path, config, group, show_progress)


def _embed(specs, cache_path, config, group: ProcessGroup, show_progress) -> dict:
    started = time.perf_counter()

    def setup():
        urls = expand_shards(specs)
        device = resolve_device(_rank_device(config.device, group))
        dtype = resolve_precision(config.precision, device)
        return urls, device, dtype, load_classes(config.classes) if config.classes is not None else None

    urls, device, dtype, class_set = group.on_every_rank(setup)  # bad options stop every rank
    survey = group.from_leader(lambda: _survey(cache_path, urls, config, class_set))
    summary = {
        "cache": cache_path,
        "shards": {"given": len(urls), "skipped": len(urls) - len(survey["pending"])},
        "ranks": group.world_size,
    }
    if not survey["pending"] and not survey["needs_text"]:
        cache = Cache(cache_path, mode="r")
        return _finish(summary, cache, Timer(), [], [], started, new_rows=0, device=device, dtype=dtype)
    timer = Timer()
    with timer("load_model"):
        loaded = group.on_every_rank(lambda: models.load_model(config.model, config.pretrained, device=device))
    plan = group.from_leader(lambda: _prepare(cache_path, survey["pending"], loaded, class_set, dtype, device, config))
    summary["prompts_updated"] = plan["prompts_updated"]
    cache = group.on_every_rank(lambda: CacheWriter(cache_path))
    cache.run_id = plan["run"]
    order = [i for i, _ in plan["shards"]]
    mine = split_for_rank(plan["shards"], group.rank, group.world_size, plan["sizes"])  # by bytes when uneven
    summary["shards"]["this_rank"] = len(mine)
    writer = _Writer(cache, consolidate=order if group.is_leader else None, timer=timer)
    local, crash = {"done": [], "failed": [], "new_rows": 0, "error": None, "stopped": False}, None
    try:
        local["new_rows"] = _embed_mine(
            mine,
            loaded,
            config,
            device,
            dtype,
            writer,
            timer,
            show_progress,
            summary,
            should_stop=lambda: group.stop_requested(plan["run"]),
        )
    except Exception as err:  # reported to every rank, so none waits forever on this one
        crash = None if isinstance(err, EngineError) else err
        local["error"] = str(err) if crash is None else f"rank {group.rank}: {type(err).__name__}: {err}"
        local["stopped"] = isinstance(err, _Stopped)
        if not local["stopped"]:  # the others stop at their next batch, keeping what they staged
            group.request_stop(
                plan["run"], local["error"] if crash is not None else f"rank {group.rank}: {local['error']}"
            )
    local.update(done=writer.done, failed=writer.failed, decoding=writer.summary)
    with timer("wait_ranks"):
        results = group.gather(local)  # the one wait: every rank has staged all it will stage
    staged = [r["shard"] for res in results for r in res["done"] + res["failed"]]
    final = group.from_leader(lambda: _complete(cache, order, staged))
    if crash is not None and group.world_size == 1:
        raise crash  # a bug, not bad input: keep the traceback
    errors = [r["error"] for r in results if r["error"] and not r["stopped"]] or [
        r["error"] for r in results if r["error"]
    ]
    if errors:
        raise EngineError(errors[0] if group.world_size == 1 else f"{len(errors)} rank(s) failed; first: {errors[0]}")
    done = [d for r in results for d in r["done"]]
    failed = [f for r in results for f in r["failed"]]
    summary["rows_after"] = final["rows"]
    summary["decode"] = {
        "mode": config.decode,
        "gpu_decoded": sum(r["decoding"].get("gpu_decoded", 0) for r in results),
        "cpu_fallback": sum(r["decoding"].get("cpu_fallback", 0) for r in results),
        "stripes": max((r["decoding"].get("stripes", 1) for r in results), default=1),
    }
    return _finish(
        summary,
        Cache(cache_path, mode="r"),
        timer,
        done,
        failed,
        started,
        new_rows=sum(r["new_rows"] for r in results),
        device=device,
        dtype=dtype,
    )


def _rank_device(name: str, group: ProcessGroup) -> str:
    """One GPU per rank on a multi-GPU node: auto/cuda → cuda:LOCAL_RANK."""
    if group.world_size > 1 and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{group.local_rank % torch.cuda.device_count()}"
    return name


def _survey(cache_path, urls, config, class_set) -> dict:
    """Leader: open (or create) the cache, finish what a killed run staged, list pending shards."""
    cache = CacheWriter(cache_path, create=True)
    _check_identity_early(cache, config)
    if cache.identity:
        cache.consolidate()  # shards staged by an interrupted run
        cache.trim()
    status = cache.shard_status()
    _check_done_shards_unchanged(cache, [u for u in urls if status.get(u) == "done"])
    return {
        "pending": [u for u in urls if status.get(u) != "done"],
        "needs_text": class_set is not None and cache.text_fingerprint() != class_set.fingerprint(),
    }


def _check_done_shards_unchanged(cache: Cache, done: list[str]) -> None:
    """A shard file rewritten since it was embedded would otherwise be skipped as done."""
    if not done:
        return
    recorded = {s["url"]: s.get("fingerprint") for s in cache.manifest.get("shards", [])}
    urls = [u for u in done if recorded.get(u)]
    if not urls:
        return
    now = shard_fingerprints(urls)
    changed = [u for u in urls if now[u] is not None and now[u] != recorded[u]]
    if changed:
        raise EngineError(
            f"shards: {len(changed)} shard(s) changed since they were embedded into {cache.path} "
            f"(first: {changed[0]}: size:digest {recorded[changed[0]]} -> {now[changed[0]]}); "
            "their rows are from the old files: embed into a new --cache"
        )


def _prepare(cache_path, pending, loaded, class_set, dtype, device, config) -> dict:
    """Leader: schema or model check, prompts, and the plan [(shard index, url)] in sorted order."""
    cache = CacheWriter(cache_path, create=True)
    cache.initialise(with_decode(loaded.identity, config), dim=loaded.embed_dim, precision=_PRECISION_NAMES[dtype])
    updated = _update_prompts(cache, class_set, loaded, device) if class_set else False
    fingerprints = shard_fingerprints(pending)
    index = cache.register_shards(pending, fingerprints)
    cache.root.require_group("staging")
    sizes = [fingerprint_size(fingerprints.get(u)) for u in pending]
    return {
        "shards": [(index[u], u) for u in pending],
        "sizes": sizes,
        "prompts_updated": updated,
        "run": uuid.uuid4().hex[:12],
    }


def _complete(cache: Cache, order: list[int], staged: list[int]) -> dict:
    """Leader, after every rank is done: append this run's staged shards in plan order (looked up
    by name: no directory listing, which a shared file system may serve stale), then any other
    committed leftovers, trim, and check that every shard a rank staged is now recorded."""
    cache.consolidate(order, prefix=False)
    cache.consolidate()
    cache.trim()
    shards = cache.manifest["shards"]
    lost = [shards[i]["url"] for i in staged if shards[i]["status"] not in ("done", "failed")]
    if lost:
        raise EngineError(
            f"cache: {len(lost)} shard(s) staged by a rank are not visible to rank 0 (first: "
            f"{lost[0]}); is {cache.path} on storage every node sees? Rerun to finish them"
        )
    return {"rows": cache.num_rows}


def _embed_mine(
    mine, loaded, config, device, dtype, writer, timer, show_progress, summary, *, should_stop=lambda: None
) -> int:
    writer.start()
    workers, threads = plan_cpu_split(config.workers, device)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    parts = len(mine) * stripes_for(len(mine), workers)
    summary["workers"], summary["model_threads"] = min(workers, max(1, parts)), torch.get_num_threads()
    new_rows = 0
    with timer("embed_loop"):  # until the last shard is staged (and, on the leader, appended)
        try:
            if mine:
                new_rows = _run_loop(
                    mine,
                    loaded,
                    config,
                    device,
                    dtype,
                    writer,
                    timer,
                    show_progress,
                    workers=workers,
                    should_stop=should_stop,
                )
        except BaseException as err:
            if err is not writer.error:
                raise  # the writer's own error is reported below, as one line
        finally:
            writer.inbox.put(None)
            writer.join()
            torch.set_num_threads(before)
    if writer.error is not None:
        if isinstance(writer.error, EngineError):
            raise writer.error
        raise EngineError(
            f"cache: writing {writer.cache.path} failed: {type(writer.error).__name__}: {writer.error}"
        ) from writer.error
    return new_rows


def _run_loop(shards, loaded, config, device, dtype, writer, timer, show_progress, *, workers: int, should_stop) -> int:
    identity = with_decode(loaded.identity, config)
    gpu = config.gpu_decode and device.type == "cuda" and gpudecode.supported(identity)
    stripes = stripes_for(len(shards), workers)
    reader = ShardReader(
        shards,
        loaded.preprocess,
        ReaderConfig(
            label_key=config.label_key,
            true_label_key=config.true_label_key,
            batch_size=config.batch_size,
            strict=config.strict,
            draft=draft_size(identity, config),
            gpu_jpeg=gpu,
        ),
        stripes=stripes,
    )
    num_workers = min(workers, len(reader.units))
    writer.summary.update(stripes=stripes, decode=config.decode, gpu_decode=gpu)
    loader = torch.utils.data.DataLoader(
        reader,
        batch_size=None,
        num_workers=num_workers,
        worker_init_fn=worker_init_single_thread,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
    )
    decoder = _BatchImages(loaded, identity, config, device, gpu)
    bar = progress(desc="embed", unit="img", disable=None if show_progress is None else not show_progress)
    try:
        return _consume(loader, loaded, device, dtype, writer, timer, bar, should_stop, decoder)
    finally:
        bar.close()
        writer.summary.update(decoder.counts)


class _BatchImages:
    """A batch's images on the device: CPU-preprocessed rows as they are; with GPU decoding, the
    JPEG rows decoded and preprocessed there, those nvJPEG refuses decoded on the CPU here, and
    rows no decoder can read dropped from the batch (recorded as bad samples of their shard)."""

    def __init__(self, loaded, identity: dict, config: EmbedConfig, device, gpu: bool):
        self.loaded, self.config, self.device = loaded, config, device
        self.draft = draft_size(identity, config)
        self.gpu = gpudecode.GpuJpegDecoder(identity, device) if gpu else None
        self.counts = {"gpu_decoded": 0, "cpu_fallback": 0}

    def __call__(self, batch, writer) -> torch.Tensor:
        images = batch.images.to(self.device, non_blocking=True)
        if not batch.jpegs:
            return images
        jpegs = batch.jpegs
        decoded, failed = self.gpu(jpegs)
        self.counts["gpu_decoded"] += len(jpegs) - len(failed)
        rows = batch.jpeg_rows
        if not failed and len(rows) == len(batch.keys):
            return decoded  # the usual batch: all JPEGs, all read by nvJPEG
        index = partial(gpudecode.device_index, device=self.device)
        out = torch.empty((len(batch.keys), 3, *self.gpu.size), device=self.device)
        cpu_rows = np.setdiff1d(np.arange(len(batch.keys)), rows)
        if len(cpu_rows):
            out[index(cpu_rows)] = images
        ok = np.setdiff1d(np.arange(len(rows)), failed)
        if len(ok):
            out[index(rows[ok])] = decoded
        dropped = []
        for i in failed:  # nvJPEG refused it: the CPU decoder, or a bad sample
            self.counts["cpu_fallback"] += 1
            row = int(rows[i])
            try:
                sample = {"jpg": bytes(jpegs[i].numpy())}
                image = self.loaded.preprocess(decode_image(sample, draft=self.draft))
                out[row] = image.to(self.device)
            except ValueError as err:
                if self.config.strict:
                    raise EngineError(f"bad sample {batch.keys[row]}: {err} (--strict)") from None
                writer.late_bad.setdefault(batch.shard, []).append(
                    (batch.keys[row], str(err)[:200], int(batch.positions[row]))
                )
                dropped.append(row)
        if dropped:
            keep = np.setdiff1d(np.arange(len(batch.keys)), dropped)
            batch.keys = [batch.keys[i] for i in keep]
            for name in ("positions", "labels", "true_labels"):
                setattr(batch, name, getattr(batch, name)[keep])
            out = out[index(keep)]
        return out


def _consume(loader, loaded, device, dtype, writer, timer, bar, should_stop, decoder) -> int:
    """Embed every batch and hand it to the writer; stops early when another rank failed (the
    shard in progress is dropped, finished ones are still staged by the writer)."""
    rows = 0
    batches = iter(loader)
    slow = _slowed(_SLOW_BATCH)
    with torch.inference_mode():
        while True:
            reason = should_stop()
            if reason:
                raise _Stopped(f"stopped because {reason}")
            if slow:
                time.sleep(slow)  # testing aid: a slow rank, so another's stop reaches it mid-run
            with timer("wait_input"):
                batch = next(batches, None)
            if batch is None:
                break
            features = None
            if len(batch.keys):
                with timer("model"):
                    images = decoder(batch, writer)
                    if len(images):
                        with autocast(device, dtype):
                            out = loaded.model.encode_image(images)
                        features = _to_host(F.normalize(out.float(), dim=-1).to(torch.float16))
                rows += len(batch.keys)
                bar.update(len(batch.keys))
            if writer.error is not None:
                raise writer.error
            if batch.outcome is not None and batch.outcome.fatal:
                raise EngineError(batch.outcome.error)
            batch.images = batch.jpeg_data = None  # the writer keeps only features and metadata
            writer.inbox.put((batch.shard, features, batch, batch.outcome))
    return rows


class _InFlight:
    """Features still being copied from the GPU: the loop goes on to the next batch (so reading
    and decoding it overlap the model's work) and the writer waits for the copy."""

    def __init__(self, features: torch.Tensor):
        self.host = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
        self.host.copy_(features, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def numpy(self) -> np.ndarray:
        self.event.synchronize()
        return self.host.numpy().copy()


def _to_host(features: torch.Tensor):
    """(B, D) float16 features as numpy, or on CUDA an `_InFlight` copy."""
    return _InFlight(features) if features.is_cuda else features.cpu().numpy()


def _finish(summary, cache, timer, done, failed, started, *, new_rows, device, dtype) -> dict:
    seconds = time.perf_counter() - started
    read = sum(d.get("read_seconds", 0.0) for d in done + failed)
    bad = [b for d in done for b in d.get("bad", [])]
    summary["shards"].update(done=len(done), failed=len(failed))
    summary.update(
        {
            "rows": cache.num_rows,
            "new_rows": new_rows,
            "bad_samples": len(bad),
            "bad_examples": [{"key": k, "reason": r} for k, r in bad[:10]],
            "missing_labels": sum(d.get("missing_labels", 0) for d in done),
            "failed": [{"url": f["url"], "error": f["error"]} for f in failed],
            "images_per_s": round(new_rows / (timer.seconds["embed_loop"] + timer.seconds.get("wait_ranks", 0.0)), 1)
            if new_rows
            else 0.0,
            "seconds": {"total": round(seconds, 3), "read_decode_workers": round(read, 3), **timer.rounded()},
            "model": models.describe(cache.identity) if cache.identity else None,
            "device": str(device),
            "precision": _PRECISION_NAMES[dtype],
        }
    )
    return summary
