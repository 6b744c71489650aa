"""`engine pack`: image folders, file lists (and Hugging Face datasets) → WebDataset shards for
`engine embed`. A plan (files, labels, their sizes and times) is fingerprinted; every image is
decoded before it is written (JPEG/PNG/WebP bytes kept, others converted to PNG, bad files
skipped and listed); shards are written by a process pool through `engine.outputs.UnitFolder`,
so a rerun of the same plan resumes. A Hugging Face dataset's plan is one split's rows, read in
record batches (`engine.hf`). Recipes: docs/datasets.md; options: docs/commands.md#pack.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.files import atomic_file, json_kind, write_json_atomic
from engine.outputs import UnitFolder, records_problem
from engine.runtime import EngineError, available_cores, engine_version

_logger = logging.getLogger(__name__)

MANIFEST = "pack.json"
CLASSES = "classes.json"
PARTIAL = ".partial"
FORMAT_VERSION = 1
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
)
_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B"})  # PNG stores these as they are
_KEY_UNSAFE = re.compile(r"[/\\.\s]")  # webdataset splits a member name at its first dot
_LIST_LINE = re.compile(r"(.+?)[\s,]+([^\s,]+)")
_BUFFER_NAME = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")
_TAR_MTIME = 0
_SAVE_EVERY_S = 2.0
_EXAMPLES = 5


@dataclass(frozen=True)
class PackConfig:
    list_file: str | None = None  # `PATH LABEL` lines; None: ROOT/<class>/<image> (or label_from_name)
    true_list: str | None = None  # same format: true labels, stored as `true_cls`
    subset: str | None = None  # one path a line: pack only these, in this order
    label_from_name: str | None = None  # regex with one group: the label from each file name
    class_names: str | None = None  # one class name a line, line i names class i
    per_shard: int = 1000
    prefix: str | None = None  # default: ROOT's folder name
    shuffle: int | None = None  # seed of a local generator that permutes the files
    workers: int | None = None  # default: min(cores, 8)
    overwrite: bool = False
    strict: bool = False  # stop at the first unreadable image instead of skipping it
    # a Hugging Face dataset (engine.hf): columns found from its features unless named
    split: str | None = None  # needed where the layout has several
    image_column: str | None = None
    label_column: str | None = None
    key_column: str | None = None  # default: keys from the row index, `{split}_{row:06d}`
    true_label_column: str | None = None  # stored as `true_cls`
    batch_size: int = 256  # rows read at a time (memory: about this many images per worker)

    @property
    def hf_options(self) -> dict:
        return {
            "split": self.split,
            "image-column": self.image_column,
            "label-column": self.label_column,
            "key-column": self.key_column,
            "true-label-column": self.true_label_column,
        }

    @property
    def file_options(self) -> dict:
        """The options that apply to image files only, not to a Hugging Face dataset's rows."""
        return {
            "list": self.list_file,
            "true-list": self.true_list,
            "subset": self.subset,
            "label-from-name": self.label_from_name,
            "shuffle": self.shuffle,
        }

    def __post_init__(self):
        if self.per_shard < 1:
            raise EngineError(f"per-shard: got {self.per_shard}, expected a positive integer")
        if self.batch_size < 1:
            raise EngineError(f"batch-size: got {self.batch_size}, expected a positive integer")
        given = next((name for name, value in self.hf_options.items() if value is not None), None)
        files_only = next((name for name, value in self.file_options.items() if value is not None), None)
        if given is not None and files_only is not None:
            raise EngineError(f"{files_only}: cannot be combined with --{given} (a Hugging Face dataset)")
        if self.shuffle is not None and self.shuffle < 0:
            raise EngineError(f"shuffle: got {self.shuffle}, expected a seed of 0 or more")
        if self.workers is not None and self.workers < 1:
            raise EngineError(f"workers: got {self.workers}, expected a positive integer")
        if self.list_file is not None and self.label_from_name is not None:
            raise EngineError("label-from-name: cannot be combined with --list (labels come from one place)")
        if self.prefix is not None and (not self.prefix or re.search(r"[/\\\s]", self.prefix)):
            raise EngineError(f"prefix: got {self.prefix!r}, expected a file name part without slashes or spaces")
        if self.label_from_name is not None:
            name_pattern(self.label_from_name)


def name_pattern(regex: str) -> re.Pattern:
    """`--label-from-name` compiled; it must have exactly one group (the integer label)."""
    try:
        pattern = re.compile(regex)
    except re.error as err:
        raise EngineError(f"label-from-name: {regex!r} is not a valid regular expression ({err})") from None
    if pattern.groups != 1:
        raise EngineError(
            f"label-from-name: {regex!r} has {pattern.groups} groups, expected exactly one "
            r"(the label), e.g. '(\d+)_\d+\.jpg'"
        )
    return pattern


# ---------------------------------------------------------------- list files


def _list_lines(path: str | os.PathLike, option: str):
    """(line number, stripped line) of a list file, skipping blank lines and # comments."""
    if os.path.isdir(path):
        raise EngineError(f"{option}: {str(path)!r} is a directory, expected a file")
    if not os.path.isfile(path):
        raise EngineError(f"{option}: {str(path)!r} does not exist")
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as handle:
        for number, raw in enumerate(handle, 1):
            line = raw.strip()
            if line and not line.startswith("#"):
                yield number, line


def _relative(path: str, where: str) -> str:
    rel = posixpath.normpath(path.strip())
    if posixpath.isabs(rel) or rel == ".." or rel.startswith("../") or rel == ".":
        raise EngineError(f"{where}: path {path!r} must be relative to ROOT and inside it")
    return rel


def read_list(path: str | os.PathLike, *, option: str = "list") -> dict[str, int]:
    """{relative path: label} from `PATH LABEL` lines (whitespace or comma between), in file order.

    Blank lines and `#` comments are skipped; a malformed line, a label that is not a
    non-negative integer, or a path listed twice is an EngineError naming file and line.
    """
    labels: dict[str, int] = {}
    first: dict[str, int] = {}
    for number, line in _list_lines(path, option):
        where = f"{option}: {path}:{number}"
        match = _LIST_LINE.fullmatch(line)
        if match is None:
            raise EngineError(f"{where}: expected 'PATH LABEL' (a space or comma between), got {line!r}")
        rel, token = _relative(match.group(1), where), match.group(2)
        try:
            label = int(token)
        except ValueError:
            raise EngineError(f"{where}: label {token!r} is not an integer") from None
        if label < 0:
            raise EngineError(f"{where}: label {label} is negative, expected 0 or more")
        if rel in labels:
            raise EngineError(f"{where}: {rel!r} is listed again (first on line {first[rel]})")
        labels[rel], first[rel] = label, number
    return labels


def read_paths(path: str | os.PathLike, *, option: str = "subset") -> list[str]:
    """Relative paths, one a line, in file order, unique. A path is the whole line (spaces
    included); a line that ends in an integer field (`PATH LABEL`, as in a `--list` file) is read
    as `--list` lines are, and the label is dropped."""
    seen: dict[str, int] = {}
    for number, line in _list_lines(path, option):
        match = _LIST_LINE.fullmatch(line)
        text = match.group(1) if match is not None and _is_int(match.group(2)) else line
        rel = _relative(text, f"{option}: {path}:{number}")
        if rel in seen:
            raise EngineError(f"{option}: {path}:{number}: {rel!r} is listed again (first on line {seen[rel]})")
        seen[rel] = number
    return list(seen)


def _is_int(token: str) -> bool:
    try:
        int(token)
    except ValueError:
        return False
    return True


def read_class_names(path: str | os.PathLike) -> list[str]:
    """One class name a line: line i (blank lines and # comments skipped) names class i."""
    names = [line for _, line in _list_lines(path, "class-names")]
    if not names:
        raise EngineError(f"class-names: {str(path)!r} holds no names")
    return names


# ---------------------------------------------------------------- scanning ROOT


def _image_files(root: Path, sub: str = "") -> tuple[list[str], list[str]]:
    """(image files, other files) under root/sub as sorted POSIX paths relative to root.

    Symbolic links to folders are followed, each real folder once (the first in sorted walk
    order), so a link cycle or a second link to the same folder adds nothing."""
    images, others = [], []
    visited: set[str] = set()
    for folder, dirs, files in os.walk(root / sub, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:
            _logger.warning("skipped %s: the folder %s is already scanned (symbolic link)", folder, real)
            dirs[:] = []
            continue
        visited.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        base = Path(folder).relative_to(root).as_posix()
        for name in files:
            rel = name if base == "." else f"{base}/{name}"
            (images if posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS else others).append(rel)
    return sorted(images), sorted(others)


def scan_image_folder(root: Path) -> tuple[dict[str, int], list[str], list[str]]:
    """ROOT/<class>/<image> (torchvision's ImageFolder): ({path: label}, class folders, ignored files).

    Classes are the sorted non-hidden sub-folders → 0..C-1; files without an image extension
    and files directly in ROOT are ignored (returned, so they can be counted)."""
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise EngineError(
            f"root: {str(root)!r} has no class folders (expected ROOT/<class>/<image>); "
            "give --list FILE or --label-from-name REGEX for other layouts"
        )
    labels: dict[str, int] = {}
    ignored = [e.name for e in os.scandir(root) if e.is_file()]
    for label, folder in enumerate(folders):
        images, others = _image_files(root, folder)
        labels.update((rel, label) for rel in images)
        ignored.extend(others)
        if not images:
            _logger.warning("class folder %s holds no images (class %d stays, with no samples)", folder, label)
    return labels, folders, sorted(ignored)


def scan_by_name(root: Path, regex: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Every image file under ROOT, labelled by the regex's group on its file name:
    ({path: label}, [(path, reason)] for names that give no label)."""
    pattern = name_pattern(regex)
    labels, unlabelled = {}, []
    for rel in _image_files(root)[0]:
        match = pattern.search(posixpath.basename(rel))
        group = match.group(1) if match else None
        if group is not None and group.isascii() and group.isdigit():
            labels[rel] = int(group)
        else:
            found = "no match" if match is None else f"group {group!r}"
            unlabelled.append((rel, f"no label from the file name ({found} for --label-from-name {regex!r})"))
    return labels, unlabelled


# ---------------------------------------------------------------- the plan


def safe_key(text: str) -> str:
    """`text` with `/`, `\\`, `.` and white space replaced by `_` (webdataset splits member names
    at the first dot)."""
    return _KEY_UNSAFE.sub("_", text)


def make_key(rel: str) -> str:
    """The sample key of a relative path: the path without its extension, made safe (`safe_key`)."""
    return safe_key(rel[: len(rel) - len(posixpath.splitext(rel)[1])])


def where(name: str | int) -> str:
    """How messages name an entry: its path, or `row N` for a row of a Hugging Face dataset."""
    return f"row {name}" if isinstance(name, int) else name


@dataclass
class Plan:
    """What will be written: `entries` [(name, key, label or None, true label or None)] in shard
    order, `name` being a path under ROOT, or a row index of a Hugging Face dataset (`rows`: the
    reader's spec, `origin`: its data files, split and columns, part of the fingerprint)."""

    root: str
    prefix: str
    per_shard: int
    source: str
    entries: list
    unlabelled: list = field(default_factory=list)  # [(path, reason)]: bad before any shard
    class_names: list | None = None
    class_fields: list | None = None  # per class, more fields for classes.json ({"folder": ...})
    notes: dict = field(default_factory=dict)
    stats: list = field(default_factory=list)  # (size, mtime_ns) of each entry's file, None: missing
    fingerprint: str = ""
    rows: dict | None = None
    origin: dict | None = None

    @property
    def num_shards(self) -> int:
        return -(-len(self.entries) // self.per_shard)

    def shard_name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"

    def shard_entries(self, index: int) -> list:
        return self.entries[index * self.per_shard : (index + 1) * self.per_shard]


def _default_prefix(root: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", root.resolve().name).strip("_") or "pack"


def _readable(names: list[str]) -> list[str]:
    """Class names for prompts: underscores become spaces (`apple_pie` → `apple pie`)."""
    return [n.replace("_", " ").strip() or n for n in names]


def is_hf_root(root: str | os.PathLike, config: PackConfig) -> bool:
    """Whether ROOT is read as a Hugging Face dataset: a Hugging Face option is given, or no label
    source is and ROOT looks like one (`engine.hf.is_dataset`)."""
    from engine import hf

    if any(value is not None for value in config.hf_options.values()):
        return True
    return config.list_file is None and config.label_from_name is None and hf.is_dataset(root)


def _labels(root: Path, config: PackConfig) -> tuple[str, dict, list, list | None, dict]:
    """(source, {path: label}, unlabelled, class folders, notes) from the chosen label source."""
    if config.list_file is not None:
        return "list", read_list(config.list_file), [], None, {}
    if config.label_from_name is not None:
        labels, unlabelled = scan_by_name(root, config.label_from_name)
        return "file-name", labels, unlabelled, None, {}
    labels, folders, ignored = scan_image_folder(root)
    return "image-folder", labels, [], folders, {"ignored": {"count": len(ignored), "examples": ignored[:_EXAMPLES]}}


def _restrict(labels: dict, unlabelled: list, subset: list[str]) -> tuple[dict, list]:
    """Only the subset's paths, in its order; subset paths without a label become unlabelled."""
    reasons = dict(unlabelled)
    kept, missing = {}, []
    for rel in subset:
        if rel in labels:
            kept[rel] = labels[rel]
        else:
            missing.append((rel, reasons.get(rel, "in --subset but has no label (not in --list or not found)")))
    return kept, missing


def build_plan(root: str | os.PathLike, config: PackConfig) -> Plan:
    """The ordered files (or dataset rows) and labels to pack; validates every input before any work."""
    if is_hf_root(root, config):
        return build_rows_plan(root, config)
    root_path = Path(root)
    if not root_path.is_dir():
        raise EngineError(f"root: {str(root)!r} is not a directory")
    source, labels, unlabelled, folders, notes = _labels(root_path, config)
    if config.subset is not None:
        labels, unlabelled = _restrict(labels, unlabelled, read_paths(config.subset))
    true = read_list(config.true_list, option="true-list") if config.true_list is not None else {}
    if true:
        notes["true_list_unmatched"] = sum(rel not in labels for rel in true)
    names = read_class_names(config.class_names) if config.class_names is not None else None
    if names is None and folders is not None:
        names = _readable(folders)
    _check_label_range(labels, names, config)
    paths = list(labels)
    if config.shuffle is not None:
        import numpy as np

        paths = [paths[i] for i in np.random.default_rng(config.shuffle).permutation(len(paths))]
    entries = [(rel, make_key(rel), labels[rel], true.get(rel)) for rel in paths]
    if not entries:
        raise EngineError(f"root: no images to pack under {str(root)!r} ({source}; {len(unlabelled)} without a label)")
    _check_keys(entries)
    plan = Plan(
        root=str(root_path.resolve()),
        prefix=config.prefix or _default_prefix(root_path),
        per_shard=config.per_shard,
        source=source,
        entries=entries,
        unlabelled=unlabelled,
        class_names=names,
        class_fields=[{"folder": f} for f in folders] if folders is not None else None,
        notes=notes,
        stats=[_file_stat(root_path, e[0]) for e in entries],
    )
    plan.fingerprint = fingerprint(plan)
    return plan


def build_rows_plan(root: str | os.PathLike, config: PackConfig) -> Plan:
    """The plan of one split of a Hugging Face dataset (`engine.hf`): its rows in order, the
    labels from the label column (-1, HF's "no label", stays missing), keys from `key_column` or
    `{split}_{row:06d}`, and each image stored by path `stat`ed like a file."""
    from engine import hf

    for option, value in config.file_options.items():
        if value is not None:
            raise EngineError(
                f"{option}: not available for a Hugging Face dataset ({root}), whose rows are read in order "
                "in batches; choose the rows and labels with `datasets` and save_to_disk first"
            )
    source = hf.open_source(
        root,
        split=config.split,
        image_column=config.image_column,
        label_column=config.label_column,
        key_column=config.key_column,
        true_label_column=config.true_label_column,
    )
    width = max(6, len(str(max(source.num_rows - 1, 0))))
    entries, stats = [], []
    for row, found in enumerate(hf.scan_rows(source, batch_size=config.batch_size)):
        entries.append((row, _row_key(found.key, row, source, width), found.label, found.true_label))
        stats.append(("stored", "-") if found.path is None else _file_stat(Path(source.base), found.path))
    if not entries:
        raise EngineError(f"root: split {source.split!r} of {str(root)!r} has no rows")
    names = read_class_names(config.class_names) if config.class_names is not None else None
    original = list(source.class_names) if names is None and source.class_names else None
    names = names if names is not None else (_readable(original) if original else None)
    _check_row_labels(entries, names, source, config)
    base = Path(source.base)
    plan = Plan(
        root=os.path.abspath(str(root)),
        prefix=config.prefix or f"{_default_prefix(base)}-{source.split}",
        per_shard=config.per_shard,
        source=f"hf-{source.kind}",
        entries=entries,
        class_names=names,
        class_fields=[{"label_name": n} for n in original] if original else None,
        notes={"missing_labels": sum(e[2] is None for e in entries)},
        stats=stats,
        rows={**source.spec(), "batch_size": config.batch_size},
        origin=source.record(),
    )
    _check_keys(entries)
    plan.fingerprint = fingerprint(plan)
    return plan


def _row_key(value, row: int, source, width: int) -> str:
    if source.key is None:
        return f"{safe_key(source.split)}_{row:0{width}d}"
    key = safe_key(str(value)) if value is not None else ""
    if not key:
        raise EngineError(f"key-column: row {row} has no value in {source.key!r} (got {value!r})")
    return key


def _check_row_labels(entries: list, names: list | None, source, config: PackConfig) -> None:
    if names is None:
        return
    for column, position in ((source.label, 2), (source.true_label, 3)):
        top = max((e for e in entries if e[position] is not None), key=lambda e: e[position], default=None)
        if top is not None and top[position] >= len(names):
            given = f"--class-names {config.class_names}" if config.class_names else "its ClassLabel"
            raise EngineError(
                f"{'label-column' if position == 2 else 'true-label-column'}: row {top[0]} has the label "
                f"{top[position]} in {column!r}, but {given} names {len(names)} classes"
            )


def _check_label_range(labels: dict, names: list | None, config: PackConfig) -> None:
    if names is None or not labels or config.class_names is None:
        return
    rel, top = max(labels.items(), key=lambda item: item[1])
    if top >= len(names):
        raise EngineError(f"class-names: {config.class_names} names {len(names)} classes, but {rel!r} has label {top}")


def _check_keys(entries: list) -> None:
    owner: dict[str, str] = {}
    for rel, key, _, _ in entries:
        if key in owner:
            raise EngineError(
                f"keys: {where(owner[key])!r} and {where(rel)!r} both become the sample key {key!r}; rename one of them"
            )
        owner[key] = rel


def _file_stat(root: Path, rel: str) -> tuple[int, int] | None:
    """(size, mtime in ns) of ROOT/rel, None when it cannot be stat'ed (it is then skipped as unreadable)."""
    try:
        info = os.stat(root / rel)
    except (OSError, ValueError):
        return None
    return info.st_size, info.st_mtime_ns


def fingerprint(plan: Plan) -> str:
    """sha256 of everything that decides the shards' contents: root, per_shard, prefix, and the
    ordered (path, label, true label, file size, file mtime) entries and unlabelled paths, so a
    replaced or touched image changes the plan."""
    header = {"format": FORMAT_VERSION, "root": plan.root, "per_shard": plan.per_shard, "prefix": plan.prefix}
    if plan.origin is not None:  # a Hugging Face dataset: its data files (sizes, mtimes), split and columns
        header["origin"] = plan.origin
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    stats = plan.stats or [None] * len(plan.entries)
    for (rel, _, label, true), stat in zip(plan.entries, stats):
        size, mtime = stat if stat is not None else ("-", "-")
        digest.update(f"{rel}\t{label}\t{true}\t{size}\t{mtime}\n".encode("utf-8", "surrogateescape"))
    for rel, reason in plan.unlabelled:
        digest.update(f"!{rel}\t{reason}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


# ---------------------------------------------------------------- images and shards (worker side)


def sniff_format(data: bytes) -> str | None:
    """`jpg`, `png` or `webp` from the magic bytes; None for anything else."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _reason(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    text = _BUFFER_NAME.sub("", text)  # PIL names the in-memory buffer by its address
    return f"{type(err).__name__}: {text}"[:200] if text else type(err).__name__


def _to_png(image) -> bytes:
    """PNG bytes of a decoded image; modes PNG cannot hold (CMYK, YCbCr, 32-bit) become RGB(A)."""
    if image.mode == "I" and image.getextrema()[0] >= 0 and image.getextrema()[1] < 65536:
        image = image.convert("I;16")
    elif image.mode not in _PNG_MODES:
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", icc_profile=image.info.get("icc_profile"))
    return buffer.getvalue()


def encode_image(data: bytes) -> tuple[str, bytes]:
    """(extension, bytes) to store for one file: JPEG/PNG/WebP bytes unchanged, other formats PIL
    decodes converted to PNG. Raises ValueError with a one-line reason when the file does not
    decode completely."""
    from PIL import Image

    ext = sniff_format(data)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return (ext, data) if ext is not None else ("png", _to_png(image))
    except Exception as err:  # PIL raises many types for bad data
        raise ValueError(f"not a decodable image: {_reason(err)}") from None


def _sample(key: str, label: int | None, true: int | None, data: bytes) -> tuple[dict, bool] | str:
    """(sample dict, whether the image was converted), or the reason the image is skipped. A
    missing label (None) writes no `cls`."""
    try:
        ext, payload = encode_image(data)
    except ValueError as err:
        return str(err)
    sample = {"__key__": key, ext: payload}
    if label is not None:
        sample["cls"] = str(label).encode()
    if true is not None:
        sample["true_cls"] = str(true).encode()
    return sample, payload is not data


def _file_images(task: dict):
    """Each entry's file bytes, or the reason it cannot be read."""
    for rel, *_ in task["entries"]:
        try:
            with open(os.path.join(task["root"], rel), "rb") as handle:
                yield handle.read()
        except OSError as err:
            yield f"unreadable: {type(err).__name__}: {err.strerror or err}"


def _row_images(task: dict):
    """Each entry's image bytes from a Hugging Face dataset (consecutive rows, read in batches)."""
    from engine.hf import read_images

    rows = [entry[0] for entry in task["entries"]]
    assert rows == list(range(rows[0], rows[0] + len(rows))), "a shard of a dataset holds consecutive rows"
    spec = task["rows"]
    yield from read_images(spec, start=rows[0], stop=rows[-1] + 1, batch_size=spec["batch_size"])


def write_shard(task: dict) -> dict:
    """Verify and write one shard (`task`: index, path, root, entries, and `rows` for a Hugging
    Face dataset) to PATH.partial, then rename it into place. Runs in a worker process; returns
    the shard's record."""
    import webdataset as wds

    final = Path(task["path"])
    bad, formats, converted = [], {}, 0
    images = _row_images(task) if task.get("rows") else _file_images(task)
    with atomic_file(final, suffix=PARTIAL) as handle:
        with wds.TarWriter(handle, format="PAX_FORMAT", mtime=_TAR_MTIME) as sink:
            for (name, key, label, true), data in zip(task["entries"], images, strict=True):
                made = data if isinstance(data, str) else _sample(key, label, true, data)
                if isinstance(made, str) and task.get("strict"):
                    raise EngineError(f"--strict: {where(name)}: {made}")
                if isinstance(made, str):
                    bad.append((name, made))
                    continue
                sample, was_converted = made
                ext = next(k for k in sample if k in ("jpg", "png", "webp"))
                formats[ext] = formats.get(ext, 0) + 1
                converted += was_converted
                sink.write(sample)
    return {
        "index": task["index"],
        "name": final.name,
        "entries": len(task["entries"]),
        "samples": len(task["entries"]) - len(bad),
        "bytes": final.stat().st_size,
        "formats": formats,
        "converted": converted,
        "bad": bad,
    }


# ---------------------------------------------------------------- the output folder (main process)


def _new_manifest(plan: Plan, config: PackConfig) -> dict:
    given = {
        name: (os.path.abspath(value) if value is not None else None)
        for name, value in (
            ("list", config.list_file),
            ("true_list", config.true_list),
            ("subset", config.subset),
            ("class_names", config.class_names),
        )
    }
    record = {
        "root": plan.root,
        "source": plan.source,
        **given,
        "label_from_name": config.label_from_name,
        "per_shard": plan.per_shard,
        "prefix": plan.prefix,
        "shuffle": config.shuffle,
        "files": len(plan.entries) + len(plan.unlabelled),
        "labelled": sum(e[2] is not None for e in plan.entries),
        "with_true_label": sum(e[3] is not None for e in plan.entries),
        **plan.notes,
    }
    if plan.origin is not None:
        record["hf"] = plan.origin
    return {
        "format": FORMAT_VERSION,
        "engine_version": engine_version(),
        "fingerprint": plan.fingerprint,
        "plan": record,
        "classes": plan.class_names,
        "complete": False,
        "shards": [
            {"name": plan.shard_name(i), "entries": len(plan.shard_entries(i)), "status": "pending"}
            for i in range(plan.num_shards)
        ],
        "bad": [{"path": rel, "reason": reason, "shard": None} for rel, reason in plan.unlabelled],
    }


def _shape_problem(manifest) -> str | None:
    """What makes a parsed pack.json unusable (the fields this module reads), or None."""
    if not isinstance(manifest, dict):
        return f"the top level is {json_kind(manifest)}, expected an object"
    for name, expected in (("shards", list), ("plan", dict), ("bad", list)):
        if name in manifest or name == "shards":
            problem = (
                records_problem(manifest.get(name), name=name, expected=expected)
                if expected is list
                else (
                    None
                    if isinstance(manifest[name], dict)
                    else f"{name!r} is {json_kind(manifest[name])}, expected an object"
                )
            )
            if problem:
                return problem
    return None


def _folder(out: Path) -> UnitFolder:
    return UnitFolder(
        out,
        command="pack",
        manifest_name=MANIFEST,
        kind="a pack manifest",
        format=FORMAT_VERSION,
        shape_problem=_shape_problem,
        temp_suffix=PARTIAL,
        units_of=lambda m: {str(r.get("name", "")): r for r in m["shards"] if r.get("name")},
    )


def _save_manifest(out: Path, manifest: dict) -> None:
    manifest["bad"].sort(key=lambda b: b["shard"] or "")  # stable: plan order within a shard
    manifest["complete"] = all(s["status"] == "done" for s in manifest["shards"])
    _folder(out).save(manifest)


def _plan_changes(old: dict, new: dict) -> str:
    fields = (
        "root",
        "source",
        "list",
        "true_list",
        "subset",
        "label_from_name",
        "per_shard",
        "prefix",
        "shuffle",
        "files",
    )
    changed = [f"{f} {old.get(f)!r} -> {new.get(f)!r}" for f in fields if old.get(f) != new.get(f)]
    old_hf, new_hf = old.get("hf") or {}, new.get("hf") or {}
    for f in ("split", "columns"):
        if old_hf.get(f) != new_hf.get(f):
            changed.append(f"{f} {old_hf.get(f)!r} -> {new_hf.get(f)!r}")
    if old_hf.get("files") != new_hf.get("files") and not changed:
        changed.append("the dataset's data files changed (their number, sizes or modification times)")
    return "; ".join(changed) or "the files, their labels, or their sizes or modification times changed"


def _is_done(out: Path, record: dict) -> bool:
    """A finished shard's record (all the fields a summary reads) whose file is still in place."""
    numbers = all(type(record.get(k)) is int for k in ("entries", "samples", "bytes", "converted"))
    formats = record.get("formats")
    if (
        record.get("status") != "done"
        or not numbers
        or not isinstance(formats, dict)
        or not all(type(v) is int for v in formats.values())
    ):
        return False
    path = out / record["name"]
    return path.is_file() and path.stat().st_size == record["bytes"]


def _bad_record_ok(bad: dict) -> bool:
    return isinstance(bad.get("path"), str) and isinstance(bad.get("reason"), str)


def _prepare_out(out: Path, plan: Plan, config: PackConfig) -> dict:
    """The manifest to work from: fresh, with the shards the previous run of this plan finished
    (recorded, still in place, with readable bad-file records) carried over."""
    fresh = _new_manifest(plan, config)
    folder, names = _folder(out), [s["name"] for s in fresh["shards"]]
    resume = folder.start(
        fingerprint=plan.fingerprint,
        names=names,
        overwrite=config.overwrite,
        is_done=lambda name, record: _is_done(out, record),
        changes=lambda old: _plan_changes(old.get("plan", {}), fresh["plan"]),
    )
    folder.clean(resume, names)
    if config.overwrite:
        (out / CLASSES).unlink(missing_ok=True)
    old_bad = (resume.manifest or {}).get("bad", [])
    for index, record in enumerate(fresh["shards"]):
        done = resume.done.get(record["name"])
        bad = [b for b in old_bad if isinstance(b, dict) and b.get("shard") == record["name"]]
        if done is not None and all(_bad_record_ok(b) for b in bad):
            fresh["shards"][index] = done
            fresh["bad"].extend(bad)
    return fresh


def _write_classes(out: Path, plan: Plan) -> str | None:
    """OUT/classes.json in engine.classes' format, when class names are known."""
    if not plan.class_names:
        return None
    classes = [{"index": i, "name": name} for i, name in enumerate(plan.class_names)]
    for entry, more in zip(classes, plan.class_fields or []):
        entry.update(more)
    doc = {"name": plan.prefix, "templates": ["a photo of a {name}"], "suffix": ".", "classes": classes}
    write_json_atomic(out / CLASSES, doc, suffix=PARTIAL)
    return str(out / CLASSES)


# ---------------------------------------------------------------- running


def default_workers() -> int:
    return min(available_cores(), 8)


def _checked(call, task: dict) -> dict:
    """A shard's record; an OS error (disk full, permissions) or a dead worker becomes an EngineError."""
    from concurrent.futures.process import BrokenProcessPool

    try:
        return call()
    except OSError as err:
        raise EngineError(f"out: writing {task['path']} failed: {_reason(err)}; rerun to resume") from None
    except BrokenProcessPool:
        raise EngineError(
            f"out: a worker died while writing {task['path']} (out of memory? or a script "
            "calling pack_dataset without an `if __name__ == '__main__':` guard); "
            "rerun to resume"
        ) from None


def _ignore_interrupt() -> None:
    """Workers leave Ctrl-C to the main process, which lets running shards finish and stops."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _start_method() -> str:
    """How the pool starts its workers. `fork` is the cheapest, but forking a process that has
    torch loaded (native thread pools, maybe CUDA) can deadlock a child, so: `fork` only on Linux
    and only while torch is not imported, else `forkserver` (a fresh server process that has run
    nothing forks the workers; it costs about a second, once per process), or `spawn` where there is
    no forkserver. Workers get plain, picklable arguments (write_shard, a task dict)."""
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    if sys.platform.startswith("linux") and "fork" in methods and "torch" not in sys.modules:
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"


@contextlib.contextmanager
def _results(tasks: list[dict], workers: int):
    """An iterator of shard records as shards finish: inline for one worker, else a process pool
    (started before the progress bar starts any thread)."""
    if workers <= 1:
        yield (_checked(lambda t=t: write_shard(t), t) for t in tasks)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context(_start_method())
    if context.get_start_method() == "forkserver":  # the server imports this module once, not every worker
        context.set_forkserver_preload(["__main__", __name__])
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_ignore_interrupt)
    try:
        futures = {pool.submit(write_shard, task): task for task in tasks}
        yield (_checked(future.result, futures[future]) for future in as_completed(futures))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _record(manifest: dict, record: dict) -> None:
    manifest["shards"][record["index"]] = {
        "name": record["name"],
        "entries": record["entries"],
        "status": "done",
        "samples": record["samples"],
        "bytes": record["bytes"],
        "formats": record["formats"],
        "converted": record["converted"],
        "bad": len(record["bad"]),
    }
    for name, reason in record["bad"]:
        _logger.info("skipped %s: %s", where(name), reason)
        bad = {"path": where(name), "reason": reason, "shard": record["name"]}
        if isinstance(name, int):
            bad["row"] = name
        manifest["bad"].append(bad)


def _write_pending(tasks: list[dict], workers: int, manifest: dict, out: Path, show_progress: bool | None) -> None:
    from engine.runtime import progress

    saved = time.monotonic()
    with _results(tasks, workers) as results:
        with progress(
            total=sum(len(t["entries"]) for t in tasks),
            desc="pack",
            unit="img",
            disable=None if show_progress is None else not show_progress,
        ) as bar:
            for record in results:
                _record(manifest, record)
                bar.update(record["entries"])
                if time.monotonic() - saved > _SAVE_EVERY_S:
                    _save_manifest(out, manifest)
                    saved = time.monotonic()


def pack_dataset(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: PackConfig | None = None,
    *,
    show_progress: bool | None = None,
) -> dict:
    """Write ROOT's images as WebDataset shards `OUT/{prefix}-{000000}.tar` plus `pack.json`
    (and `classes.json` when class names are known); returns a summary dict.

    Each sample holds `__key__` (from the relative path; for a Hugging Face dataset `SPLIT_ROW`
    or the key column), the image (`jpg`/`png`/`webp`), `cls` (ASCII integer; absent for a row
    without a label) and `true_cls` when a true label is known. Resumable per shard.
    """
    started = time.perf_counter()
    config = config or PackConfig()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EngineError(f"out: {str(out)!r} exists and is not a directory")
    folder_layout = config.list_file is None and config.label_from_name is None and not is_hf_root(root, config)
    if folder_layout and Path(root).is_dir() and out.resolve().is_relative_to(Path(root).resolve()):
        raise EngineError(
            f"out: {str(out)!r} is inside ROOT, where it would become a class folder; choose an --out outside ROOT"
        )
    plan = build_plan(root, config)
    if config.strict and plan.unlabelled:
        rel, reason = plan.unlabelled[0]
        raise EngineError(f"--strict: {rel}: {reason} ({len(plan.unlabelled)} such files)")
    out.mkdir(parents=True, exist_ok=True)
    with _folder(out).lock():
        manifest = _prepare_out(out, plan, config)
        classes_file = _write_classes(out, plan)
        pending = [i for i, s in enumerate(manifest["shards"]) if s["status"] != "done"]
        tasks = [
            {
                "index": i,
                "path": str(out / plan.shard_name(i)),
                "root": plan.root,
                "entries": plan.shard_entries(i),
                "strict": config.strict,
                "rows": plan.rows,
            }
            for i in pending
        ]
        workers = min(config.workers or default_workers(), max(1, len(tasks)))
        _save_manifest(out, manifest)
        try:
            _write_pending(tasks, workers, manifest, out, show_progress)
        finally:
            _save_manifest(out, manifest)
    seconds = time.perf_counter() - started
    processed = sum(len(t["entries"]) for t in tasks)
    return _summary(
        plan, manifest, out, classes_file, written=len(tasks), processed=processed, workers=workers, seconds=seconds
    )


def _summary(
    plan: Plan,
    manifest: dict,
    out: Path,
    classes_file: str | None,
    *,
    written: int,
    processed: int,
    workers: int,
    seconds: float,
) -> dict:
    done = [s for s in manifest["shards"] if s["status"] == "done"]
    formats: dict[str, int] = {}
    for shard in done:
        for ext, count in shard["formats"].items():
            formats[ext] = formats.get(ext, 0) + count
    total = len(manifest["shards"])
    return {
        "out_dir": str(out),
        "manifest": str(out / MANIFEST),
        "shard_pattern": str(out / f"{plan.prefix}-*.tar"),
        "fingerprint": plan.fingerprint,
        "source": plan.source,
        "shards": {"total": total, "written": written, "skipped": total - written},
        "files": len(plan.entries) + len(plan.unlabelled),
        "samples": sum(s["samples"] for s in done),
        "formats": formats,
        "converted": sum(s["converted"] for s in done),
        "bad": len(manifest["bad"]),
        "bad_examples": manifest["bad"][:_EXAMPLES],
        "classes": len(plan.class_names) if plan.class_names else None,
        "classes_file": classes_file,
        "with_true_label": manifest["plan"]["with_true_label"],
        "missing_labels": plan.notes.get("missing_labels", 0),
        "ignored": plan.notes.get("ignored", {}).get("count", 0),
        "workers": workers,
        "seconds": round(seconds, 3),
        "images_per_s": round(processed / seconds, 1) if processed else 0.0,
        **({"hf": _hf_summary(plan)} if plan.origin is not None else {}),
    }


def _hf_summary(plan: Plan) -> dict:
    return {"split": plan.origin["split"], "columns": plan.origin["columns"], "data_files": len(plan.origin["files"])}
