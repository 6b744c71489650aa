"""The cache's cross-process lock: `flock` on a local cache directory, a lease object on S3
(`engine.lease`), nothing on other object stores (one job per cache there). See docs/architecture.md."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def cache_lock(path: str, *, run: str = "0") -> Iterator[object | None]:
    """Hold the lock of the cache at `path` (a directory or an fsspec URL) for the block.

    Yields the S3 lease (whose `check()` a writer calls before each write, so a holder that
    stalled past half the lease stops before anyone else may take over) or None."""
    if "://" in str(path):
        from engine.lease import remote_lock

        with remote_lock(path, run=run) as lease:
            yield lease
        return
    from engine.files import lock_folder

    fd = lock_folder(path)
    try:
        yield None
    finally:
        os.close(fd)  # closing releases the lock
