"""Durable small files: written whole under a temporary name, fsynced, renamed into place, so a
reader (or a rerun after a kill) sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def lock_folder(folder: str | os.PathLike, *, wait: bool = True) -> int | None:
    """An exclusive `flock` on the folder itself (no extra file), held while the returned fd is
    open; it follows the folder through renames. With `wait=False`, None when another process
    holds it (a way to tell whether that process is still alive)."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename inside `directory` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, suffix: str = ".tmp") -> Iterator[IO[bytes]]:
    """A binary handle on `path + suffix`; on success it is fsynced and renamed to `path`, on any
    error (or interrupt) removed, so `path` never holds a partial file."""
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, doc, *, suffix: str = ".tmp", sort_keys: bool = False) -> None:
    """Write `doc` as indented JSON to `path` via `path + suffix`, fsync, rename, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    with open(tmp, "w") as handle:
        handle.write(json.dumps(doc, indent=1, sort_keys=sort_keys) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


_JSON_KINDS = {
    dict: "an object",
    list: "an array",
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    type(None): "null",
}


def json_kind(value) -> str:
    """JSON's name for a parsed value, with its article ("an object", "an array", ...), for
    messages that say what a file holds instead of what was expected."""
    return _JSON_KINDS.get(type(value), type(value).__name__)


def read_json(path: str | os.PathLike):
    """The parsed JSON of `path`; ValueError("unreadable (REASON)") with a one-line reason when
    it cannot be read or parsed (the caller names the file and says what to do)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(
            f"unreadable ({type(err).__name__}: {first})" if first else f"unreadable ({type(err).__name__})"
        ) from None
