"""Output folders, written so that a killed run loses nothing and a rerun resumes.

Two shapes, one set of rules (docs/architecture.md, "Output folders"):

- `UnitFolder` (`engine pack`, `engine export --shards`): a folder of named units (shards), each
  written under a temporary name and renamed into place, recorded in a JSON manifest with the
  fingerprint of the plan that made them. A rerun of the same plan skips the units recorded and
  still in place; another plan, files no manifest records, or an unreadable manifest are errors
  unless `--overwrite`, which removes only what the earlier manifest (or this plan) names. One
  run at a time per folder (a `flock`).
- `FolderSwap` (`engine report`): a folder built whole next to its target and swapped in when
  complete; the folder must be new, empty or an earlier output (a marker file), files of the
  user's in it are kept, and what a killed run left is undone by the next one (liveness by the
  `flock` each run holds on its hidden folders).
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from engine.files import atomic_file, json_kind, lock_folder, read_json, write_json_atomic
from engine.runtime import EngineError

_logger = logging.getLogger(__name__)


@contextlib.contextmanager
def exclusive(folder: Path, *, command: str, option: str) -> Iterator[None]:
    """One run of `engine COMMAND` at a time writing into `folder` (a `flock` on the folder itself,
    so no lock file is left in it)."""
    fd = lock_folder(folder, wait=False)
    if fd is None:
        raise EngineError(
            f"{option}: another `engine {command}` is writing into {folder}; wait for it or use another --{option}"
        )
    try:
        yield
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- folders of units


@dataclass
class Resume:
    """How a run starts in its folder: `manifest` the earlier manifest when this run continues the
    same plan (else None), `done` {unit name: record} of the units it finished that are still in
    place, `victims` the unit names `--overwrite` will remove, `removed` how many files it did."""

    manifest: dict | None
    done: dict = field(default_factory=dict)
    victims: set = field(default_factory=set)
    removed: int = 0


@dataclass
class UnitFolder:
    """A folder of units recorded in `folder/manifest_name`.

    `kind` names the manifest in messages ("a pack manifest"); `format` is the value of its
    "format" field (a manifest with another one was written by something else and is never
    touched); `shape_problem(manifest) -> str | None` says why a parsed manifest is unusable;
    `units_of(manifest) -> {name: record}` reads the units it records; `option` is the command
    line option that names the folder, for messages."""

    folder: Path
    command: str
    manifest_name: str
    kind: str
    format: object
    shape_problem: Callable[[object], str | None]
    units_of: Callable[[dict], dict]
    option: str = "out"
    temp_suffix: str = ".partial"

    @property
    def manifest_path(self) -> Path:
        return self.folder / self.manifest_name

    def lock(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        return exclusive(self.folder, command=self.command, option=self.option)

    def read(self, *, overwrite: bool) -> tuple[dict | None, bool]:
        """(the manifest or None, whether an unusable one was found and --overwrite lets it go)."""
        path = self.manifest_path
        if not path.exists():
            return None, False
        try:
            manifest = read_json(path)
        except ValueError as err:
            problem = f"is {err}"
        else:
            if isinstance(manifest, dict) and "format" in manifest and manifest["format"] != self.format:
                raise EngineError(
                    f"{self.option}: {path} was not written by `engine {self.command}`; use another --{self.option}"
                )
            shape = self.shape_problem(manifest)
            if shape is None:
                return manifest, False
            problem = f"is not {self.kind} ({shape})"
        if not overwrite:
            raise EngineError(f"{self.option}: {path} {problem}; use --overwrite to start again, or delete it")
        _logger.warning("%s: %s %s; --overwrite: starting again", self.option, path, problem)
        return None, True

    def start(
        self,
        *,
        fingerprint: str,
        names: list[str],
        overwrite: bool,
        is_done: Callable[[str, dict], bool],
        changes: Callable[[dict], str],
        stray: Callable[[str], bool] | None = None,
    ) -> Resume:
        """Decide, without writing anything, how this run of the plan `fingerprint` (units `names`)
        starts; `clean(resume)` then clears the way.

        Same plan: resume, `done` the recorded units `is_done(name, record)` accepts. Another
        plan, or planned names present with no manifest recording them: an error naming
        `changes(old manifest)` unless `overwrite`, which will remove the earlier plan's units
        (names from its manifest only; with an unreadable manifest, the files `stray(name)`
        accepts) and this plan's."""
        old, corrupt = self.read(overwrite=overwrite)
        if old is not None and old.get("fingerprint") == fingerprint and not overwrite:
            units = self.units_of(old)
            return Resume(manifest=old, done={n: units[n] for n in names if n in units and is_done(n, units[n])})
        if old is not None and not overwrite:
            raise EngineError(
                f"{self.option}: {self.folder} holds output of a different plan ({changes(old)}); "
                f"use --overwrite to replace it, or another --{self.option}"
            )
        if overwrite:
            victims = set(names) | (set(self.units_of(old)) if old is not None else set())
            if corrupt and stray is not None and self.folder.is_dir():
                victims |= {self._final_name(p.name) for p in self.folder.iterdir() if stray(self._final_name(p.name))}
            return Resume(manifest=None, victims=victims)
        taken = [n for n in names if (self.folder / n).exists()]
        if taken:
            raise EngineError(
                f"{self.option}: {self.folder} already holds {taken[0]} ({len(taken)} of this run's "
                f"names) and no {self.manifest_name} records it; use --overwrite to replace "
                f"them, or another --{self.option}"
            )
        return Resume(manifest=None)

    def clean(self, resume: Resume, names: list[str], *, protect: frozenset = frozenset()) -> None:
        """Remove what `--overwrite` replaces (never a path in `protect`, absolute paths) and the
        temporary files a killed run left of `names`."""
        resume.removed = self._remove(resume.victims, protect)
        if resume.removed:
            _logger.info("--overwrite: removed %d files of an earlier run in %s", resume.removed, self.folder)
        for name in names:
            (self.folder / (name + self.temp_suffix)).unlink(missing_ok=True)

    def _final_name(self, name: str) -> str:
        return name[: -len(self.temp_suffix)] if name.endswith(self.temp_suffix) else name

    def _remove(self, names: set, protect: frozenset) -> int:
        removed = 0
        for name in names:
            if not name or Path(name).name != name:  # only plain names inside the folder
                continue
            for path in (self.folder / name, self.folder / (name + self.temp_suffix)):
                if os.path.abspath(path) not in protect and path.is_file():
                    path.unlink()
                    removed += 1
        return removed

    def unit(self, name: str):
        """A binary handle on the unit's temporary file, renamed to `name` when the block succeeds."""
        return atomic_file(self.folder / name, suffix=self.temp_suffix)

    def temp_path(self, name: str) -> Path:
        return self.folder / (name + self.temp_suffix)

    def save(self, manifest: dict, *, sort_keys: bool = False) -> None:
        write_json_atomic(self.manifest_path, manifest, suffix=self.temp_suffix, sort_keys=sort_keys)


def records_problem(
    records, *, name: str, expected: type, check: Callable[[object], bool] | None = None, what: str = "an object"
) -> str | None:
    """Shape check of one manifest field holding unit records (a list or a dict of objects)."""
    if not isinstance(records, expected):
        return f"{name!r} is {json_kind(records)}, expected {json_kind(expected())}"
    items = records.items() if isinstance(records, dict) else enumerate(records)
    for key, item in items:
        if not isinstance(item, dict) or (check is not None and not check(item)):
            return f"{name}[{key!r}] is {json_kind(item)}, expected {what}"
    return None


# ----------------------------------------------------------------------------- folders swapped whole


@dataclass
class FolderSwap:
    """A folder `out` replaced whole: `stage()` makes a hidden sibling to build in, `swap_in()`
    puts it at `out`. `marker` marks folders this command made; `outputs` are the glob patterns
    of what it writes (everything else in an earlier folder is the user's and is kept)."""

    out: Path
    command: str
    marker: str
    outputs: tuple[str, ...]
    held: list = field(default_factory=list)

    def check(self) -> None:
        """Refuse a file, or a non-empty folder this command did not make, before any work."""
        if self.out.exists() and not self.out.is_dir():
            raise EngineError(f"out: {self.out} is a file; expected a folder for the {self.command}")
        if self.out.is_dir() and any(self.out.iterdir()) and not (self.out / self.marker).exists():
            raise EngineError(
                f"out: {self.out} exists and is not an engine {self.command} folder (no "
                f"{self.marker}); give an empty or new --out"
            )

    def is_output(self, name: str) -> bool:
        return name == self.marker or any(fnmatch.fnmatchcase(name, p) for p in self.outputs)

    def _hidden(self, what: str) -> Path:
        """`.<out>.engine-<command>-<new|old>-<host>-<pid>-<random>` (host and pid for a person
        reading the folder; whether its run is alive is told by the lock it holds)."""
        host = socket.gethostname().replace("-", "_") or "host"
        return (
            self.out.parent / f".{self.out.name}.engine-{self.command}-{what}-{host}-{os.getpid()}-"
            f"{uuid.uuid4().hex[:12]}"
        )

    def _dead(self) -> list[tuple[str, Path, int]]:
        """(new|old, folder, fd of its lock, now ours) left by runs that no longer hold their lock."""
        if not self.out.parent.is_dir():
            return []
        prefix = f".{self.out.name}.engine-{self.command}-"
        found = []
        for path in self.out.parent.glob(f"{glob.escape(prefix)}*"):
            what = path.name[len(prefix) :].split("-", 1)[0]
            if what not in ("new", "old") or not path.is_dir() or path.is_symlink():
                continue
            fd = lock_folder(path, wait=False)
            if fd is not None:
                found.append((what, path, fd))
        return found

    def recover(self) -> list[str]:
        """Undo what a killed run left next to `out`: the earlier folder put back if the run died
        inside the swap, the user's files returned (as `NAME.recovered-K` when the name is taken),
        a dead run's folder removed once nothing of the user's is left in it. Returns what was done."""
        done = []
        dead = self._dead()
        try:
            if not self.out.exists():
                olds = sorted((p for what, p, _ in dead if what == "old"), key=lambda p: p.stat().st_mtime)
                if olds:
                    os.rename(olds[-1], self.out)
                    done.append(f"restored the earlier {self.command} from {olds[-1].name}")
            for _, path, _ in dead:
                if path.exists():
                    done.extend(self._empty_dead(path))
        finally:
            for _, _, fd in dead:
                os.close(fd)
        return done

    def _empty_dead(self, path: Path) -> list[str]:
        done, kept = [], []
        for entry in sorted(path.iterdir()):
            if self.is_output(entry.name):
                continue
            target = free_name(self.out, entry.name) if self.out.is_dir() else None
            try:
                if target is not None:
                    os.rename(entry, target)  # the user's own files, moved by the swap
            except OSError:
                target = None
            if target is None:
                kept.append(entry.name)
            else:
                done.append(
                    f"moved {entry.name} back into {self.out}"
                    + (f" as {target.name}" if target.name != entry.name else "")
                )
        if kept:
            return done + [f"kept {path.name}: it holds {', '.join(kept[:3])} that could not be moved into {self.out}"]
        shutil.rmtree(path, ignore_errors=True)
        return done + [f"removed {path.name}"]

    def stage(self, subfolders: tuple[str, ...] = ()) -> Path:
        """A new, empty folder next to `out` (same parent: the swap is a rename), marked, and locked
        for as long as this run lives (a later run tells it from debris by that lock)."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        stage = self._hidden("new")
        stage.mkdir()
        for name in subfolders:
            (stage / name).mkdir()
        (stage / self.marker).write_text(
            f"made by engine {self.command}; a rerun replaces this folder's {self.command}\n"
        )
        self.held.append(lock_folder(stage, wait=False))
        return stage

    def swap_in(self, stage: Path) -> None:
        """Put the finished `stage` at `out`: the earlier folder is renamed away, its entries that
        are not outputs move into the new one, the new one is renamed in and the earlier one
        deleted. If a rename fails, the earlier folder is put back as it was."""
        if not self.out.exists():
            os.rename(stage, self.out)
            return
        self.held.append(lock_folder(self.out, wait=False))  # the earlier folder, while it is renamed away
        old = self._hidden("old")
        os.rename(self.out, old)
        moved = []
        try:
            for entry in sorted(old.iterdir()):
                if not self.is_output(entry.name):
                    os.rename(entry, stage / entry.name)
                    moved.append(entry.name)
            os.rename(stage, self.out)
        except BaseException:
            for name in moved:
                os.rename(stage / name, old / name)
            os.rename(old, self.out)
            raise
        shutil.rmtree(old, ignore_errors=True)

    def release(self) -> None:
        for fd in self.held:
            if fd is not None:
                os.close(fd)
        self.held.clear()


def free_name(folder: Path, name: str) -> Path | None:
    """`folder/name`, or `folder/name.recovered-K` for the first K free, None after 99."""
    for candidate in [name] + [f"{name}.recovered-{k}" for k in range(1, 100)]:
        if not (folder / candidate).exists():
            return folder / candidate
    return None
