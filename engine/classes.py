"""Class files (names, aliases, descriptions, templates, suffix) and built-in sets (imagenet1k,
shapes) → prompts (every template x every description) → text features (C, P, D) with a mask.
The file format: docs/commands.md#prompts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.runtime import EngineError

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassSet:
    """Class names and the prompts of each class (ragged: classes may differ in prompt count)."""

    name: str
    class_names: tuple[str, ...]
    prompts: tuple[tuple[str, ...], ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def max_prompts(self) -> int:
        return max(len(p) for p in self.prompts)

    def fingerprint(self) -> str:
        """sha256 of names and prompts: changes whenever the text features would."""
        body = json.dumps([self.class_names, self.prompts]).encode()
        return hashlib.sha256(body).hexdigest()


def _builtin_imagenet() -> dict:
    from open_clip import zero_shot_metadata as meta

    templates = [t("{name}") for t in meta.OPENAI_IMAGENET_TEMPLATES]
    return {
        "name": "imagenet1k",
        "templates": templates,
        "suffix": "",
        "classes": [{"index": i, "name": n} for i, n in enumerate(meta.IMAGENET_CLASSNAMES)],
    }


def _builtin_shapes(spec: str) -> dict:
    from engine import synthetic

    _, _, count = spec.partition(":")
    try:
        num = int(count) if count else 20
    except ValueError:
        raise EngineError(f"classes: got {spec!r}, expected shapes or shapes:N") from None
    return synthetic.class_file(num)


BUILTIN = {"imagenet1k": _builtin_imagenet, "shapes": _builtin_shapes}


def load_class_document(spec: str) -> dict:
    """The raw class document for a path (JSON/YAML) or a built-in name."""
    base = spec.split(":", 1)[0]
    path = Path(spec)
    if path.suffix.lower() in (".json", ".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise EngineError(f"classes: file {spec!r} does not exist")
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise EngineError(
                    f"classes: {spec!r} is YAML but PyYAML is not installed; use JSON or `pip install pyyaml`"
                ) from None
            return yaml.safe_load(text)
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise EngineError(f"classes: {spec!r} is not valid JSON ({err})") from None
    if base in BUILTIN:
        return BUILTIN[base](spec) if base == "shapes" else BUILTIN[base]()
    raise EngineError(f"classes: got {spec!r}, expected a .json/.yaml file or one of {', '.join(BUILTIN)}")


def _class_prompts(entry: dict, templates: list[str], suffix: str) -> tuple[str, ...]:
    names = [entry["name"], *entry.get("aliases", [])]
    descriptions = entry.get("descriptions") or []
    prompts = []
    for name in names:
        for template in templates:
            head = template.format(name=name)
            if descriptions:
                prompts.extend(f"{head} {d}{suffix}" for d in descriptions)
            else:
                prompts.append(f"{head}{suffix}")
    return tuple(dict.fromkeys(prompts))  # de-duplicated, order kept


def parse_class_document(doc: dict, *, source: str = "<document>") -> ClassSet:
    """Validate a class document and expand it into prompts."""
    if not isinstance(doc, dict) or not isinstance(doc.get("classes"), list) or not doc["classes"]:
        raise EngineError(f"classes: {source} needs a non-empty list under 'classes'")
    templates = doc.get("templates") or ["a photo of a {name}"]
    for t in templates:
        try:
            ok = isinstance(t, str) and "{name}" in t and t.format(name="x") is not None
        except (KeyError, IndexError, ValueError):
            ok = False
        if not ok:
            raise EngineError(
                f"classes: {source}: every template must be a string with {{name}} as its only placeholder; got {t!r}"
            )
    suffix = doc.get("suffix", ".")
    entries = doc["classes"]
    if not all(isinstance(e, dict) for e in entries):
        bad = next(e for e in entries if not isinstance(e, dict))
        raise EngineError(f'classes: {source}: each class must be an object like {{"name": ...}}, got {bad!r}')
    indices = [e.get("index", i) for i, e in enumerate(entries)]
    if sorted(indices) != list(range(len(entries))):
        raise EngineError(
            f"classes: {source}: indices must be 0..{len(entries) - 1} exactly once; got {sorted(indices)[:10]}..."
        )
    ordered = [entries[indices.index(k)] for k in range(len(entries))]
    for k, entry in enumerate(ordered):
        if not isinstance(entry.get("name"), str) or not entry["name"].strip():
            raise EngineError(f"classes: {source}: class {k} has no name")
        for field in ("aliases", "descriptions"):
            value = entry.get(field, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise EngineError(
                    f"classes: {source}: class {k} ({entry['name']}): {field} must be a list of strings, got {value!r}"
                )
    return ClassSet(
        name=str(doc.get("name", source)),
        class_names=tuple(e["name"] for e in ordered),
        prompts=tuple(_class_prompts(e, templates, suffix) for e in ordered),
    )


def load_classes(spec: str) -> ClassSet:
    """A ClassSet from a class file path or a built-in name (`imagenet1k`, `shapes[:N]`)."""
    return parse_class_document(load_class_document(spec), source=spec)


@torch.inference_mode()
def encode_prompts(
    class_set: ClassSet, model, tokenizer, *, device: torch.device, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Text features (C, P, D) float16, unit rows, zero-padded, and mask (C, P) bool."""
    flat = [p for prompts in class_set.prompts for p in prompts]
    chunks = []
    for start in range(0, len(flat), batch_size):
        tokens = tokenizer(flat[start : start + batch_size]).to(device)
        chunks.append(model.encode_text(tokens, normalize=True).float().cpu())
    encoded = torch.cat(chunks).numpy()
    c, p = class_set.num_classes, class_set.max_prompts
    features = np.zeros((c, p, encoded.shape[1]), dtype=np.float16)
    mask = np.zeros((c, p), dtype=bool)
    counts = np.array([len(x) for x in class_set.prompts])
    rows = np.repeat(np.arange(c), counts)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(counts) - counts, counts)
    features[rows, cols] = encoded.astype(np.float16)
    mask[rows, cols] = True
    return features, mask
