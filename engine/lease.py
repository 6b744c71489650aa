"""A lock for caches on S3-compatible object stores: one object, `<cache>/engine.lock`, taken with
`If-None-Match: *`, renewed by a heartbeat with `If-Match`, taken over after its ttl by exactly one
waiter, and fenced (a holder that stalled past half the ttl stops writing). `ENGINE_S3_LOCK=off`
turns it off. How and why: docs/architecture.md#the-lock.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import threading
import time
import uuid

from engine.runtime import EngineError

_logger = logging.getLogger(__name__)

LOCK_NAME = "engine.lock"
TTL_S = float(os.environ.get("ENGINE_LOCK_TTL_S", "60"))
_S3_PROTOCOLS = ("s3", "s3a")
_verified_buckets: set[str] = set()  # stores seen to refuse a second If-None-Match PUT


def supports_lease(url: str) -> bool:
    return url.split("://", 1)[0] in _S3_PROTOCOLS


def _error_code(err: BaseException) -> tuple[str, int | None]:
    """(S3 error code, HTTP status) of an error however s3fs wrapped it; ("", None) if none."""
    for e in (err, err.__cause__, err.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            return (
                str(response.get("Error", {}).get("Code", "")),
                response.get("ResponseMetadata", {}).get("HTTPStatusCode"),
            )
    return "", None


def _precondition_failed(err: BaseException) -> bool:
    """412: the object is not the version the condition named (or exists, for If-None-Match)."""
    code, status = _error_code(err)
    return code in ("PreconditionFailed", "412") or status == 412 or (isinstance(err, FileExistsError) and not code)


def _conflict(err: BaseException) -> bool:
    """409 ConditionalRequestConflict: a concurrent conditional write; S3 says retry."""
    code, status = _error_code(err)
    return code in ("ConditionalRequestConflict", "409") or status == 409


def _missing(err: BaseException) -> bool:
    code, status = _error_code(err)
    return isinstance(err, FileNotFoundError) or code in ("404", "NoSuchKey") or status == 404


@functools.cache
def _check_client_supports_conditions() -> None:
    """s3fs drops keyword arguments its botocore does not know, which would make every
    conditional PUT unconditional: refuse instead of pretending to lock."""
    import botocore.session

    model = botocore.session.get_session().get_service_model("s3")
    put = model.operation_model("PutObject").input_shape.members
    delete = model.operation_model("DeleteObject").input_shape.members
    if not {"IfNoneMatch", "IfMatch"} <= set(put) or "IfMatch" not in delete:
        import botocore

        raise EngineError(
            f"cache: botocore {botocore.__version__} cannot send conditional writes "
            "(If-None-Match/If-Match), which the S3 cache lock needs: upgrade s3fs/aiobotocore, "
            "or set ENGINE_S3_LOCK=off and run one job per cache at a time"
        )


class S3Lease:
    """An exclusive lease on `<url>/engine.lock`; use as a context manager."""

    def __init__(
        self,
        url: str,
        *,
        ttl: float | None = None,
        poll: float = 0.25,
        timeout: float | None = None,
        owner: dict | None = None,
    ):
        import fsspec

        _check_client_supports_conditions()
        self.url = url.rstrip("/")
        self.fs, path = fsspec.core.url_to_fs(f"{self.url}/{LOCK_NAME}")
        self.bucket, self.key, _ = self.fs.split_path(path)
        self.ttl = TTL_S if ttl is None else float(ttl)
        self.poll, self.timeout = poll, timeout
        self.nonce = uuid.uuid4().hex
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), **(owner or {})}
        self.etag: str | None = None
        self.lost: str | None = None
        self._ok_at = float("-inf")  # monotonic time just before our last successful write
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._guard = threading.Lock()  # the heartbeat and release never write at once

    # ------------------------------------------------------------ S3 calls
    def _put(self, **condition) -> str:
        body = json.dumps({**self.owner, "nonce": self.nonce, "written": time.time(), "ttl_s": self.ttl})
        sent = time.monotonic()
        out = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=body.encode(), **condition)
        self._ok_at = sent
        return out["ETag"]

    def _head(self) -> tuple[str, dict] | None:
        """(etag, holder) of the lock object, or None when there is none."""
        try:
            head = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)
        except Exception as err:
            if _missing(err):
                return None
            raise self._error("reading", err) from None
        try:
            holder = json.loads(self.fs.cat_file(f"{self.bucket}/{self.key}"))
        except Exception:  # replaced or released meanwhile, or not ours to parse: the etag counts
            holder = {}
        return head["ETag"], holder

    def _error(self, doing: str, err: BaseException) -> EngineError:
        return EngineError(f"cache: {doing} the lock {self.url}/{LOCK_NAME} failed: {type(err).__name__}: {err}")

    def _ours(self) -> str | None:
        """Our etag when the stored lock object is ours (a retried write that had succeeded);
        None when it is another's, absent, or cannot be read now."""
        try:
            current = self._head()
        except EngineError:
            return None
        if current is not None and current[1].get("nonce") == self.nonce:
            return current[0]
        return None

    # ------------------------------------------------------------ take, hold, release
    def acquire(self) -> None:
        self._verify_store()
        seen: tuple[str, float] | None = None
        holder: dict = {}
        started = last_said = time.monotonic()
        while True:
            try:
                self.etag = self._put(IfNoneMatch="*")
                break
            except Exception as err:
                if not (_precondition_failed(err) or _conflict(err)):
                    raise self._error("taking", err) from None
            current = self._head()
            now = time.monotonic()
            if current is not None:
                etag, holder = current
                if holder.get("nonce") == self.nonce:
                    # our own earlier PUT had landed (its retry got 412): renew it at once, so
                    # the fencing clock starts from a write whose time is known
                    if self._try_put(IfMatch=etag):
                        break
                    seen = None
                elif seen is None or seen[0] != etag:
                    seen = (etag, now)  # a live holder renews, which changes the etag
                elif now - seen[1] > self._expiry(holder):
                    if self._try_put(IfMatch=etag):
                        _logger.warning(
                            "cache %s: took over a lock not renewed for %.0f s (held by %s)",
                            self.url,
                            now - seen[1],
                            _describe(holder),
                        )
                        break
                    seen = None  # someone else took it (or it was released): start again
            if self.timeout is not None and now - started > self.timeout:
                raise EngineError(
                    f"cache: {self.url} is locked by {_describe(holder)}; waited "
                    f"{now - started:.0f} s (a lock not renewed for {self.ttl:.0f} s is taken over)"
                )
            if now - last_said > 30:
                _logger.warning("cache %s: waiting for the lock held by %s", self.url, _describe(holder))
                last_said = now
            time.sleep(self.poll)
        self.lost = None
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._renew, daemon=True, name="engine-lease")
        self._heartbeat.start()

    def _try_put(self, **condition) -> bool:
        """A conditional PUT that may lose a race: True when it landed (and is now ours)."""
        try:
            self.etag = self._put(**condition)
            return True
        except Exception as err:
            if _precondition_failed(err) or _conflict(err) or _missing(err):
                return False
            raise self._error("taking", err) from None

    def _expiry(self, holder: dict) -> float:
        """How long an unchanged lock must stay unchanged before it is taken over: our ttl, or the
        holder's own when longer (it renews every ttl/4 of its own), at most a day."""
        try:
            theirs = float(holder.get("ttl_s", 0))
        except (TypeError, ValueError):
            theirs = 0.0
        return max(self.ttl, min(theirs, 86400.0))

    def _verify_store(self) -> None:
        """Once per bucket and process, on a probe object beside the lock: the store must refuse
        a second If-None-Match PUT and an If-Match PUT and DELETE with a wrong etag, or the
        lock would exclude nobody."""
        if self.bucket in _verified_buckets:
            return
        probe = f"{self.key}-probe-{self.nonce}"
        ignored = []
        try:
            self.fs.call_s3("put_object", Bucket=self.bucket, Key=probe, Body=b"{}")
            for name, call, condition in (
                ("If-None-Match on PUT", "put_object", {"IfNoneMatch": "*", "Body": b"{}"}),
                ("If-Match on PUT", "put_object", {"IfMatch": '"0"', "Body": b"{}"}),
                ("If-Match on DELETE", "delete_object", {"IfMatch": '"0"'}),
            ):
                try:
                    self.fs.call_s3(call, Bucket=self.bucket, Key=probe, **condition)
                    ignored.append(name)
                except Exception as err:
                    if not (_precondition_failed(err) or _conflict(err) or _missing(err)):
                        raise
        except Exception as err:
            raise self._error("checking", err) from None
        finally:
            with contextlib.suppress(Exception):
                self.fs.call_s3("delete_object", Bucket=self.bucket, Key=probe)
        if ignored:
            raise EngineError(
                f"cache: the object store of {self.url} ignores conditional writes "
                f"({', '.join(ignored)}), so it cannot be locked: set ENGINE_S3_LOCK=off and run "
                "one job per cache at a time"
            )
        _verified_buckets.add(self.bucket)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            with self._guard:
                if self._stop.is_set() or self.lost:
                    return
                try:
                    self.etag = self._put(IfMatch=self.etag)
                except Exception as err:
                    mine = self._ours() if (_precondition_failed(err) or _conflict(err)) else None
                    if mine is not None:  # the write had landed (a retried request), or a 409
                        self.etag = mine
                        continue
                    if _precondition_failed(err) or _missing(err):
                        self.lost = "another job took it over, or it was removed"
                        return
                    _logger.warning("cache %s: renewing the lock failed (%s); retrying", self.url, err)

    def check(self) -> None:
        """Raise before a write unless the lease is certainly still ours."""
        age = time.monotonic() - self._ok_at
        if not self.lost and age > self.ttl / 2:
            self.lost = f"not renewed for {age:.0f} s"
        if self.lost:
            raise EngineError(
                f"cache: lost the lock on {self.url} ({self.lost}); stopped before writing more: "
                "rerun the command, the per-shard commit keeps what is done"
            )

    def release(self) -> None:
        self._stop.set()
        with self._guard:
            if not self.lost and time.monotonic() - self._ok_at > self.ttl / 2:
                self.lost = "not renewed in time"  # it may be another's now: leave it alone
            if not self.lost:
                self._delete()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        if self.lost:
            raise EngineError(
                f"cache: lost the lock on {self.url} ({self.lost}): this process stalled for "
                f"over {self.ttl / 2:.0f} s; rerun the command, the per-shard commit keeps what is done"
            )

    def _delete(self) -> None:
        for _ in range(3):
            try:
                self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
                return
            except Exception as err:
                if _missing(err):
                    return  # a retried DELETE whose first try had landed (we were in time: see above)
                if not (_precondition_failed(err) or _conflict(err)):
                    _logger.warning(
                        "cache %s: releasing the lock failed (%s); it expires in %.0f s", self.url, err, self.ttl
                    )
                    return
                mine = self._ours()
                if mine is None and _precondition_failed(err):
                    self.lost = "another job took it over"
                    return
                self.etag = mine or self.etag
        _logger.warning("cache %s: releasing the lock kept conflicting; it expires in %.0f s", self.url, self.ttl)

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
    if not holder or "pid" not in holder:
        return "another job"
    parts = [f"pid {holder.get('pid')} on {holder.get('host')}"]
    if holder.get("run"):
        parts.append(f"run {holder['run']}")
    return ", ".join(parts)


def remote_lock(url: str, **owner):
    """The cross-job lock for a cache at `url`: a lease on S3; nothing elsewhere (see docs)."""
    if supports_lease(url) and os.environ.get("ENGINE_S3_LOCK", "on").lower() not in ("off", "0", "no"):
        return S3Lease(url, owner=owner)
    return contextlib.nullcontext()
