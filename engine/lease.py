"""A lock for caches on S3-compatible object stores, made of one object and conditional writes.

Object stores have no `flock`, but S3 (and MinIO, Ceph RGW, moto) take preconditions on
writes: a PUT with `If-None-Match: *` succeeds only when the object is absent, a PUT or
DELETE with `If-Match: <etag>` only when the object is still the version the caller saw.
That is enough for a lease:

- take: create `<cache>/engine.lock` with `If-None-Match: *`; its body names the holder;
- hold: a heartbeat thread rewrites it with `If-Match: <our etag>` every ttl/4;
- release: delete it with `If-Match: <our etag>`;
- a holder that died stops renewing: a waiter that has seen the same etag for longer than
  the ttl (by its own monotonic clock, so no two machines' clocks are compared) takes it over
  with `If-Match: <that etag>`, so of several waiters exactly one wins;
- a holder that finds its etag replaced (it stalled for longer than the ttl and was taken
  over) reports the lease lost instead of pretending it held it throughout.

Only the manifest's read-modify-write steps hold it (register, consolidate, trim, prompts),
each for seconds, so concurrent jobs interleave at shard granularity.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time

from engine.runtime import EngineError

_logger = logging.getLogger(__name__)

LOCK_NAME = "engine.lock"
TTL_S = float(os.environ.get("ENGINE_LOCK_TTL_S", "60"))
_S3_PROTOCOLS = ("s3", "s3a")


def supports_lease(url: str) -> bool:
    return url.split("://", 1)[0] in _S3_PROTOCOLS


def _precondition_failed(err: BaseException) -> bool:
    """A 412 (or a 409 from a conditional write racing another) from S3, however s3fs wrapped it."""
    for e in (err, err.__cause__, err.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409") or status in (409, 412):
                return True
    return isinstance(err, FileExistsError)


def _missing(err: BaseException) -> bool:
    if isinstance(err, FileNotFoundError):
        return True
    for e in (err.__cause__, err.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and str(response.get("Error", {}).get("Code")) in ("404", "NoSuchKey"):
            return True
    return False


class S3Lease:
    """An exclusive lease on `<url>/engine.lock`; use as a context manager."""

    def __init__(self, url: str, *, ttl: float | None = None, poll: float = 0.25,
                 timeout: float | None = None, owner: dict | None = None):
        import fsspec

        self.url = url.rstrip("/")
        self.fs, path = fsspec.core.url_to_fs(f"{self.url}/{LOCK_NAME}")
        self.bucket, self.key, _ = self.fs.split_path(path)
        self.ttl = TTL_S if ttl is None else float(ttl)
        self.poll, self.timeout = poll, timeout
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), **(owner or {})}
        self.etag: str | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._guard = threading.Lock()   # the heartbeat and release never write at once

    # ------------------------------------------------------------ S3 calls
    def _put(self, **condition) -> str:
        body = json.dumps({**self.owner, "written": time.time(), "ttl_s": self.ttl}).encode()
        out = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=body, **condition)
        return out["ETag"]

    def _head(self) -> tuple[str, dict] | None:
        """(etag, holder) of the lock object, or None when there is none."""
        try:
            head = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)
        except Exception as err:
            if _missing(err):
                return None
            raise
        try:
            holder = json.loads(self.fs.cat_file(f"{self.bucket}/{self.key}"))
        except Exception:  # released meanwhile, or not ours to parse: the etag is what counts
            holder = {}
        return head["ETag"], holder

    # ------------------------------------------------------------ take, hold, release
    def acquire(self) -> None:
        seen: tuple[str, float] | None = None
        started = last_said = time.monotonic()
        while True:
            try:
                self.etag = self._put(IfNoneMatch="*")
                break
            except Exception as err:
                if not _precondition_failed(err):
                    raise EngineError(f"cache: cannot take the lock {self.url}/{LOCK_NAME}: "
                                      f"{type(err).__name__}: {err}") from None
            current = self._head()
            now = time.monotonic()
            if current is None:
                continue  # released between our PUT and HEAD: try again at once
            etag, holder = current
            if seen is None or seen[0] != etag:
                seen = (etag, now)   # a live holder renews, which changes the etag
            elif now - seen[1] > self.ttl:
                try:
                    self.etag = self._put(IfMatch=etag)
                    _logger.warning("cache %s: took over a lock not renewed for %.0f s (held by %s)",
                                    self.url, now - seen[1], _describe(holder))
                    break
                except Exception as err:
                    if not (_precondition_failed(err) or _missing(err)):
                        raise
                    seen = None   # someone else took it (or it was released): start again
            if self.timeout is not None and now - started > self.timeout:
                raise EngineError(f"cache: {self.url} is locked by {_describe(holder)}; waited "
                                  f"{now - started:.0f} s (a lock not renewed for {self.ttl:.0f} s is taken over)")
            if now - last_said > 30:
                _logger.warning("cache %s: waiting for the lock held by %s", self.url, _describe(holder))
                last_said = now
            time.sleep(self.poll)
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._renew, daemon=True, name="engine-lease")
        self._heartbeat.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            with self._guard:
                if self._stop.is_set() or self.lost:
                    return
                try:
                    self.etag = self._put(IfMatch=self.etag)
                except Exception as err:
                    if _precondition_failed(err) or _missing(err):
                        self.lost = "it was taken over or removed while held"
                        return
                    _logger.warning("cache %s: renewing the lock failed (%s); retrying", self.url, err)

    def release(self) -> None:
        self._stop.set()
        with self._guard:
            if self._heartbeat is not None:
                self._heartbeat.join(timeout=0)
            if not self.lost:
                try:
                    self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
                except Exception as err:
                    if _precondition_failed(err) or _missing(err):
                        self.lost = "it was taken over or removed while held"
                    else:
                        _logger.warning("cache %s: releasing the lock failed (%s); it expires in %.0f s",
                                        self.url, err, self.ttl)
        if self.lost:
            raise EngineError(f"cache: lost the lock on {self.url} ({self.lost}): this process stalled for "
                              f"over {self.ttl:.0f} s; rerun the command, the per-shard commit keeps what is done")

    def check(self) -> None:
        """Raise before a write if the lease was lost (see `release`)."""
        if self.lost:
            raise EngineError(f"cache: lost the lock on {self.url} ({self.lost}); nothing more was written: "
                              "rerun the command")

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.release()
        except EngineError:
            if exc[0] is None:
                raise


def _describe(holder: dict) -> str:
    if not holder:
        return "another job"
    parts = [f"pid {holder.get('pid')} on {holder.get('host')}"]
    if holder.get("run"):
        parts.append(f"run {holder['run']}")
    return ", ".join(parts)


def remote_lock(url: str, **owner):
    """The cross-job lock for a cache at `url`: a lease on S3; nothing elsewhere (see docs)."""
    if supports_lease(url):
        return S3Lease(url, owner=owner)
    return contextlib.nullcontext()
