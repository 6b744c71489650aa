"""The embedding loop: shards → decoded batches (DataLoader workers) → CLIP under inference
mode and autocast → a writer thread that stages and commits each shard into the cache.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engine import models
from engine.cache import Cache
from engine.classes import encode_prompts, load_classes
from engine.reader import ReaderConfig, ShardReader, expand_shards, split_for_rank
from engine.runtime import EngineError, Timer, autocast, progress, resolve_device, resolve_precision, \
    worker_init_single_thread

_logger = logging.getLogger(__name__)
_SLOW_WRITE = float(os.environ.get("ENGINE_TEST_SLOW_WRITE", "0") or 0)
_PRECISION_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class EmbedConfig:
    model: str = "shapes-tiny"
    pretrained: str | None = None
    classes: str | None = None
    label_key: str | None = "cls"
    true_label_key: str | None = None
    batch_size: int = 256
    workers: int | None = None        # None: half the cores on CPU (at least 1), up to 8 on GPU
    precision: str = "auto"
    device: str = "auto"
    strict: bool = False

    def __post_init__(self):
        if self.batch_size < 1:
            raise EngineError(f"batch-size: got {self.batch_size}, expected a positive integer")
        if self.workers is not None and self.workers < 0:
            raise EngineError(f"workers: got {self.workers}, expected 0 or more")


def plan_cpu_split(workers: int | None, device: torch.device) -> tuple[int, int | None]:
    """(DataLoader workers, torch threads for the model or None to leave as is).

    On CPU the decoding workers and the model share the cores: measured on 2 cores, 1 worker
    and 1 model thread embedded 1.6x faster than 2 workers and 2 threads (oversubscription).
    So the default is half the cores for workers, and the model gets the cores they leave."""
    cores = max(1, len(os.sched_getaffinity(0)))
    if workers is None:
        workers = min(8, cores) if device.type == "cuda" else max(1, cores // 2)
    if device.type != "cpu":
        return workers, None
    return workers, max(1, min(torch.get_num_threads(), cores - workers))


class _Writer(threading.Thread):
    """Collects each shard's rows and stages + commits the shard when its last batch arrives."""

    def __init__(self, cache: Cache, *, consolidate: bool, timer: Timer):
        super().__init__(daemon=True, name="engine-writer")
        self.cache, self.consolidate, self.timer = cache, consolidate, timer
        self.inbox: queue.Queue = queue.Queue(maxsize=64)
        self.parts: dict[int, list] = {}
        self.done: list[dict] = []
        self.failed: list[dict] = []
        self.error: BaseException | None = None

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
        if features is not None and len(batch.keys):
            self.parts.setdefault(shard, []).append((features, batch))
        if outcome is None:
            return
        parts = self.parts.pop(shard, [])
        record = asdict(outcome)
        if outcome.error:
            self.cache.mark_failed(shard, record)
            self.failed.append(record)
            return
        feats = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, self.cache.dim), np.float16)
        cat = (lambda name: np.concatenate([getattr(p[1], name) for p in parts]) if parts
               else np.zeros(0, np.int32))
        keys = [k for p in parts for k in p[1].keys]
        if _SLOW_WRITE:  # testing aid: widen the window in which a kill lands mid-run
            time.sleep(_SLOW_WRITE)
        self.cache.stage_shard(shard, features=feats, keys=keys, labels=cat("labels"),
                               true_labels=cat("true_labels"), positions=cat("positions"), outcome=record)
        if self.consolidate:
            self.cache.consolidate()
        self.done.append(record)


def _update_prompts(cache: Cache, class_set, loaded: models.LoadedModel, device) -> bool:
    if cache.text_fingerprint() == class_set.fingerprint():
        return False
    features, mask = encode_prompts(class_set, loaded.model, loaded.tokenizer, device=device)
    cache.write_text(class_set, features, mask)
    return True


def write_prompts(cache_path: str, classes: str, *, device: str = "auto") -> dict:
    """Recompute text/* of an existing cache with the cache's own model; images untouched."""
    cache = Cache(cache_path, mode="a")
    identity = cache.identity
    if not identity:
        raise EngineError(f"cache: {cache_path} has no model recorded; embed or import features first")
    if identity.get("pretrained") == "imported":
        raise EngineError(f"cache: {cache_path} holds imported features; their text features must be imported "
                          "too (text_features in the .npz), since the model that made them is not known here")
    class_set = load_classes(classes)
    torch_device = resolve_device(device)
    loaded = models.load_model(identity["model"], _weights_spec(identity), device=torch_device)
    if not models.same_model(identity, loaded.identity):
        raise EngineError(f"cache: {cache_path} was made by {models.describe(identity)} but the model found "
                          f"now is {models.describe(loaded.identity)}; pass the same weights file")
    features, mask = encode_prompts(class_set, loaded.model, loaded.tokenizer, device=torch_device)
    cache.write_text(class_set, features, mask)
    return {"cache": cache_path, "classes": class_set.num_classes, "prompts": int(mask.sum()),
            "max_prompts": int(mask.shape[1]), "fingerprint": class_set.fingerprint()}


def _weights_spec(identity: dict) -> str | None:
    """The --pretrained value that reproduces a recorded identity (tags; bundled models)."""
    pretrained = identity.get("pretrained", "")
    if identity.get("model") in models.BUNDLED or pretrained in ("folder", models.RANDOM):
        return None if pretrained != models.RANDOM else pretrained
    if pretrained.startswith("file:"):
        raise EngineError(f"cache: made from the weights file {pretrained[5:]!r}; "
                          "`engine prompts` needs it: re-run `engine embed --classes` with the same --pretrained")
    return pretrained


def _check_identity_early(cache: Cache, config: EmbedConfig) -> None:
    """Refuse a different model before any weights are loaded (cheap fields only)."""
    stored = cache.identity
    if not stored:
        return
    _, partial = models.resolve(config.model, config.pretrained, probe=False)
    for field in ("model", "pretrained", "sha256"):
        if field in partial and stored.get(field) != partial[field]:
            raise EngineError(f"cache: {cache.path} holds features of {models.describe(stored)}, but this run "
                              f"uses {models.describe(partial)}; use another --cache or the same model")


def embed_shards(specs: list[str], cache_path: str, config: EmbedConfig, *, rank: int = 0,
                 world_size: int = 1, show_progress: bool | None = None) -> dict:
    """Embed every image of `specs` into `cache_path` once; returns a summary dict."""
    started = time.perf_counter()
    if world_size > 1:
        raise EngineError(f"embed: launched as rank {rank} of {world_size}, but this version embeds in one "
                          "process; run it without torchrun (several processes would race on the manifest)")
    urls = expand_shards(specs)
    device = resolve_device(config.device)
    dtype = resolve_precision(config.precision, device)
    cache = Cache(cache_path, mode="a", create=True)
    _check_identity_early(cache, config)
    if cache.identity:
        cache.consolidate()  # finish shards staged by an interrupted run
    status = cache.shard_status()
    mine = split_for_rank(urls, rank, world_size)
    pending = [u for u in mine if status.get(u) != "done"]
    class_set = load_classes(config.classes) if config.classes is not None else None
    needs_text = class_set is not None and cache.text_fingerprint() != class_set.fingerprint()
    summary = {"cache": cache_path, "shards": {"given": len(urls), "this_rank": len(mine),
                                               "skipped": len(mine) - len(pending)}}
    if not pending and not needs_text:
        return _finish(summary, cache, Timer(), [], [], started, new_rows=0, device=device, dtype=dtype)
    timer = Timer()
    with timer("load_model"):
        loaded = models.load_model(config.model, config.pretrained, device=device)
    cache.initialise(loaded.identity, dim=loaded.embed_dim, precision=_PRECISION_NAMES[dtype])
    summary["prompts_updated"] = _update_prompts(cache, class_set, loaded, device) if class_set else False
    index = cache.register_shards(pending)
    writer = _Writer(cache, consolidate=rank == 0, timer=timer)
    writer.start()
    workers, threads = plan_cpu_split(config.workers, device)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    summary["workers"], summary["model_threads"] = min(workers, len(pending)), torch.get_num_threads()
    with timer("embed_loop"):  # until the last shard is committed
        try:
            new_rows = _run_loop([(index[u], u) for u in pending], loaded, config, device, dtype, writer,
                                 timer, show_progress, workers=workers)
        finally:
            writer.inbox.put(None)
            writer.join()
            torch.set_num_threads(before)
    if writer.error is not None:
        raise writer.error
    if rank == 0:
        cache.consolidate()
        cache.trim()
    return _finish(summary, cache, timer, writer.done, writer.failed, started, new_rows=new_rows,
                   device=device, dtype=dtype)


def _run_loop(shards, loaded, config, device, dtype, writer, timer, show_progress, *, workers: int) -> int:
    reader = ShardReader(shards, loaded.preprocess, ReaderConfig(
        label_key=config.label_key, true_label_key=config.true_label_key,
        batch_size=config.batch_size, strict=config.strict))
    loader = torch.utils.data.DataLoader(
        reader, batch_size=None, num_workers=min(workers, len(shards)),
        worker_init_fn=worker_init_single_thread, pin_memory=device.type == "cuda",
        persistent_workers=False, prefetch_factor=4 if min(workers, len(shards)) else None)
    bar = progress(desc="embed", unit="img", disable=None if show_progress is None else not show_progress)
    try:
        return _consume(loader, loaded, device, dtype, writer, timer, bar)
    finally:
        bar.close()


def _consume(loader, loaded, device, dtype, writer, timer, bar) -> int:
    rows = 0
    batches = iter(loader)
    with torch.inference_mode():
        while True:
            with timer("wait_input"):
                batch = next(batches, None)
            if batch is None:
                break
            features = None
            if len(batch.keys):
                with timer("model"):
                    images = batch.images.to(device, non_blocking=True)
                    with autocast(device, dtype):
                        out = loaded.model.encode_image(images)
                    features = F.normalize(out.float(), dim=-1).to(torch.float16).cpu().numpy()
                rows += len(batch.keys)
                bar.update(len(batch.keys))
            if writer.error is not None:
                raise writer.error
            if batch.outcome is not None and batch.outcome.fatal:
                raise EngineError(batch.outcome.error)
            batch.images = None  # the writer keeps only features and metadata
            writer.inbox.put((batch.shard, features, batch, batch.outcome))
    return rows


def _finish(summary, cache, timer, done, failed, started, *, new_rows, device, dtype) -> dict:
    seconds = time.perf_counter() - started
    read = sum(d.get("read_seconds", 0.0) for d in done + failed)
    bad = [b for d in done for b in d.get("bad", [])]
    summary["shards"].update(done=len(done), failed=len(failed))
    summary.update({
        "rows": cache.num_rows, "new_rows": new_rows,
        "bad_samples": len(bad), "bad_examples": [{"key": k, "reason": r} for k, r in bad[:10]],
        "missing_labels": sum(d.get("missing_labels", 0) for d in done),
        "failed": [{"url": f["url"], "error": f["error"]} for f in failed],
        "images_per_s": round(new_rows / timer.seconds["embed_loop"], 1) if new_rows else 0.0,
        "seconds": {"total": round(seconds, 3), "read_decode_workers": round(read, 3), **timer.rounded()},
        "model": models.describe(cache.identity) if cache.identity else None,
        "device": str(device), "precision": _PRECISION_NAMES[dtype]})
    return summary
