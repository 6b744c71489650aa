"""Model registry: open_clip architectures with pretrained tags or local checkpoints, and the
offline model `shapes-tiny` that ships with the engine.

    load_model("shapes-tiny")                                 # offline, bundled
    load_model("ViT-B-32", "laion2b_s34b_b79k")              # downloads (needs the network)
    load_model("ViT-B-32", "/models/vit-b-32.safetensors")    # a local checkpoint file
    load_model("/models/my-clip-dir")                         # a folder with open_clip_config.json
    load_model("ViT-B-32", "random")                          # random weights: timing only

Every model gets a stable identity (architecture, weights tag or file sha256, preprocessing)
that the cache records, so features from different models are never mixed.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.runtime import EngineError

_logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED = {"shapes-tiny": ASSETS / "shapes-tiny"}
RANDOM = "random"
_PREPROCESS_KEYS = ("size", "mean", "std", "interpolation", "resize_mode")
_PROBE_HOSTS = ("huggingface.co", 443)


@dataclass
class LoadedModel:
    """A CLIP model in eval mode with its image transform, tokenizer and identity."""

    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    identity: dict
    embed_dim: int

    def to(self, device: torch.device) -> LoadedModel:
        self.model.to(device)
        return self


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so large checkpoints are read once."""
    stat = os.stat(path)
    return _sha256_cached(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, _size: int, _mtime_ns: int, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def list_model_names() -> list[str]:
    """Bundled offline models, then every open_clip architecture."""
    import open_clip

    return sorted(BUNDLED) + sorted(open_clip.list_models())


def list_pretrained(name: str) -> list[str]:
    import open_clip

    if name in BUNDLED:
        return ["bundled"]
    return list(open_clip.list_pretrained_tags_by_model(name))


def _unknown_model(name: str) -> EngineError:
    names = list_model_names()
    close = difflib.get_close_matches(name, names, n=8, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return EngineError(
        f"model: got {name!r}, which is neither a bundled model ({', '.join(BUNDLED)}), "
        f"an open_clip architecture, nor a folder with open_clip_config.json.{hint} "
        f"`engine models` lists all {len(names)} choices."
    )


def _reachable(host: tuple[str, int], timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(host, timeout=timeout):
            return True
    except OSError:
        return False


def _cached_tag_file(tag_cfg: dict) -> str | None:
    """The locally cached weights file of an open_clip pretrained tag, if any."""
    hub = tag_cfg.get("hf_hub", "")
    if not hub:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo_id = "/".join(hub.strip("/").split("/")[:2])
    for filename in (
        "open_clip_model.safetensors",
        "open_clip_pytorch_model.bin",
        "open_clip_pytorch_model.safetensors",
    ):
        found = try_to_load_from_cache(repo_id, filename)
        if isinstance(found, str):
            return found
    return None


def _weights_unavailable(name: str, tag: str, why: str) -> EngineError:
    return EngineError(
        f"pretrained: weights for {name} {tag!r} cannot be fetched ({why}). Download them on a "
        f"machine with network access (open_clip.create_model('{name}', pretrained='{tag}') or the "
        f"model's hub page) and pass the file: --model {name} --pretrained /path/to/weights.safetensors"
    )


def _resolve_open_clip(name: str, pretrained: str | None, probe: bool) -> tuple[dict, dict]:
    """(kwargs for open_clip.create_model_and_transforms, identity) for an architecture name."""
    import open_clip

    if pretrained is None:
        raise EngineError(
            f"pretrained: {name} needs --pretrained TAG|PATH (tags: "
            f"{', '.join(list_pretrained(name)) or 'none'}), or 'random' for timing only; "
            "no model is ever silently randomly initialised"
        )
    if pretrained == RANDOM:
        return {"model_name": name}, {"model": name, "pretrained": RANDOM}
    if os.path.isfile(pretrained):
        digest = sha256_file(pretrained)
        return (
            {"model_name": name, "pretrained": pretrained},
            {"model": name, "pretrained": f"file:{Path(pretrained).name}", "sha256": digest},
        )
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag_cfg:
        raise EngineError(
            f"pretrained: got {pretrained!r} for {name}, which is neither a file nor a known tag "
            f"(tags: {', '.join(list_pretrained(name)) or 'none'})"
        )
    identity = {"model": name, "pretrained": pretrained}
    if probe and not _reachable(_PROBE_HOSTS):
        cached = _cached_tag_file(tag_cfg)
        if cached is None:
            raise _weights_unavailable(name, pretrained, "no network and not in the local cache")
        force = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
        return {"model_name": name, "pretrained": cached, "force_preprocess_cfg": force}, identity
    return {"model_name": name, "pretrained": pretrained}, identity


def resolve(name: str, pretrained: str | None = None, *, probe: bool = True) -> tuple[dict, dict]:
    """Map a model name and weights spec to open_clip arguments and a partial identity.

    `probe`: check that tagged weights can be had (network or local cache) and fail fast if not.
    """
    import open_clip

    if name in BUNDLED:
        folder = BUNDLED[name]
        weights = folder / "open_clip_model.safetensors"
        if pretrained not in (None, "bundled"):
            if not os.path.isfile(pretrained):
                raise EngineError(f"pretrained: got {pretrained!r} for {name}; expected nothing, 'bundled' or a file")
            weights = Path(pretrained)
        if not weights.is_file():
            raise EngineError(
                f"model: the bundled weights of {name} are missing at {weights}; "
                "reinstall the engine or retrain with scripts/train_shapes_tiny.py"
            )
        kwargs = {"model_name": f"local-dir:{folder}", "pretrained": str(weights)}
        return kwargs, {"model": name, "pretrained": f"file:{weights.name}", "sha256": sha256_file(weights)}
    if name.startswith(("local-dir:", "hf-hub:")) or Path(name, "open_clip_config.json").is_file():
        spec = name if name.startswith(("local-dir:", "hf-hub:")) else f"local-dir:{Path(name).resolve()}"
        kwargs = {"model_name": spec}
        if pretrained:
            kwargs["pretrained"] = pretrained
        return kwargs, {"model": spec, "pretrained": pretrained or "folder"}
    if name in open_clip.list_models():
        return _resolve_open_clip(name, pretrained, probe)
    raise _unknown_model(name)


class _DropRandomInitNotice(logging.Filter):
    """open_clip logs 'initialized randomly' before we load the checkpoint ourselves."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "initialized randomly" not in msg and "no CLIP weights found" not in msg


def _create(kwargs: dict):
    import open_clip

    kwargs = dict(kwargs)
    weights = kwargs.pop("pretrained", None)
    model_name = kwargs.pop("model_name")
    schema = model_name.startswith(("local-dir:", "hf-hub:"))
    if schema and weights:  # open_clip ignores `pretrained` with a schema: load the file ourselves
        quiet = _DropRandomInitNotice()
        logging.getLogger().addFilter(quiet)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, load_weights=False, **kwargs)
        finally:
            logging.getLogger().removeFilter(quiet)
        open_clip.load_checkpoint(model, weights)
    else:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights, **kwargs)
    return model, preprocess, open_clip.get_tokenizer(model_name)


def load_model(name: str, pretrained: str | None = None, *, device: torch.device | str = "cpu") -> LoadedModel:
    """Build `name` with weights `pretrained`, in eval mode on `device`."""
    kwargs, identity = resolve(name, pretrained)
    try:
        model, preprocess, tokenizer = _create(kwargs)
    except EngineError:
        raise
    except (RuntimeError, OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "download" in first.lower() or "connection" in first.lower() or "hub" in first.lower():
            raise _weights_unavailable(name, str(pretrained), first) from None
        raise EngineError(f"model: could not build {name} with {pretrained!r}: {first}") from None
    model.eval().to(device)
    pp = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    identity["preprocess"] = {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in pp.items() if k in _PREPROCESS_KEYS
    }
    with torch.inference_mode():
        embed_dim = int(model.encode_text(tokenizer(["x"]).to(device)).shape[1])
    identity["embed_dim"] = embed_dim
    return LoadedModel(model=model, preprocess=preprocess, tokenizer=tokenizer, identity=identity, embed_dim=embed_dim)


def decode_of(identity: dict) -> str:
    """How a cache's images were decoded: "reduced" (JPEG DCT scaling) or "exact" (caches made
    before decoding was recorded decoded whole)."""
    return identity.get("preprocess", {}).get("decode", "exact")


def same_model(a: dict, b: dict, *, images: bool = True) -> bool:
    """True when two identities describe the same weights and preprocessing; `images=False`
    ignores how images were decoded (text features do not depend on it)."""
    keys = ("model", "pretrained", "sha256", "preprocess", "embed_dim")

    def norm(identity: dict, key: str):
        value = identity.get(key)
        if key == "preprocess" and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k != "decode"}
            if images:
                value["decode"] = decode_of(identity)
        return json.dumps(value, sort_keys=True)

    return all(norm(a, k) == norm(b, k) for k in keys)


def describe(identity: dict) -> str:
    extra = f" sha256={identity['sha256'][:12]}" if identity.get("sha256") else ""
    return f"{identity.get('model')} ({identity.get('pretrained')}{extra})"
