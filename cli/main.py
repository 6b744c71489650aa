"""`engine` command line: each command parses, builds a config, calls one engine function and
prints a short summary (or one JSON object with --json). Progress goes to stderr."""
from __future__ import annotations

import functools
import json
import logging
import sys

import click

from engine.runtime import EngineError, set_threads

_logger = logging.getLogger("engine")


def _emit(summary: dict, as_json: bool, lines) -> None:
    if as_json:
        click.echo(json.dumps(summary, default=_jsonable))
    else:
        for line in lines(summary):
            click.echo(line)


def _jsonable(value):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:
        pass
    return str(value)


def handle_errors(fn):
    """Bad input → one line on stderr and exit status 2; nothing else is printed."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EngineError as err:
            click.echo(f"engine: error: {err}", err=True)
            sys.exit(2)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--threads", type=int, default=None, envvar="ENGINE_THREADS",
              help="torch intra-op threads (default: the cores this process may use; env ENGINE_THREADS).")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
@click.version_option(package_name="engine", message="engine %(version)s")
def cli(threads: int | None, verbose: int) -> None:
    """Cache CLIP features of WebDataset shards once, then select clean samples (CLIPCleaner),
    diagnose label noise with FAISS, and train a MixFix classifier on the cached features."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        set_threads(threads)
    except EngineError as err:
        click.echo(f"engine: error: {err}", err=True)
        sys.exit(2)


# ---------------------------------------------------------------- make-shards
@cli.command("make-shards")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--classes", "num_classes", type=int, default=20, show_default=True, help="Number of shape classes (2-54).")
@click.option("--per-shard", type=int, default=500, show_default=True)
@click.option("--shards", type=int, default=4, show_default=True)
@click.option("--noise", type=click.Choice(["none", "sym", "hard", "mix"]), default="mix", show_default=True,
              help="sym: uniform over all classes; hard: flip to the close partner; mix: half each.")
@click.option("--rate", type=float, default=0.4, show_default=True, help="Share of samples whose label is corrupted.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--prefix", default="shapes", show_default=True, help="Shard file and key prefix.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@handle_errors
def make_shards(out_dir, num_classes, per_shard, shards, noise, rate, seed, prefix, as_json):
    """Write the procedural shapes dataset as WebDataset shards plus classes.json.

    \b
    Example:
      engine make-shards shards/ --classes 20 --per-shard 500 --shards 4 --noise mix --rate 0.4
    """
    from engine.runtime import progress
    from engine.synthetic import ShapesConfig, write_shards

    config = ShapesConfig(classes=num_classes, per_shard=per_shard, shards=shards, noise=noise, rate=rate,
                          seed=seed, prefix=prefix)
    with progress(total=shards * per_shard, desc="make-shards", unit="img") as bar:
        summary = write_shards(out_dir, config, progress=bar.update)
    _emit(summary, as_json, lambda s: [
        f"wrote {s['samples']} images of {s['classes']} classes in {len(s['shards'])} shards to {s['out_dir']}",
        f"label noise: {s['noisy']} samples ({s['noise_rate']:.1%}, {noise}); classes: {s['classes_file']}"])


# ---------------------------------------------------------------- embed
@cli.command("embed")
@click.argument("shards", nargs=-1, required=True)
@click.option("--cache", default="feats.zarr", show_default=True, help="Feature cache (a Zarr v3 directory).")
@click.option("--model", default="shapes-tiny", show_default=True, help="open_clip architecture, a model folder, or shapes-tiny.")
@click.option("--pretrained", default=None, help="Pretrained tag (e.g. laion2b_s34b_b79k) or a local weights file.")
@click.option("--classes", default=None, help="Class file (JSON/YAML) or built-in name (imagenet1k, shapes[:N]).")
@click.option("--label-key", default="cls", show_default=True, help="Sample field with the label, or json:FIELD.")
@click.option("--true-label-key", default=None, help="Sample field with the true label (evaluation only).")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True, help="DataLoader workers decoding images.")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--strict", is_flag=True, help="Stop at the first bad sample instead of skipping it.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@handle_errors
def embed(shards, cache, model, pretrained, classes, label_key, true_label_key, batch_size, workers,
          precision, device, strict, as_json):
    """Embed every image of SHARDS into the cache, exactly once and resumably.

    \b
    Example:
      engine embed 'shards/shapes-{000000..000003}.tar' --cache feats.zarr \\
          --classes shards/classes.json --true-label-key true_cls
    """
    from engine.embed import EmbedConfig, embed_shards
    from engine.runtime import distributed_context

    config = EmbedConfig(model=model, pretrained=pretrained, classes=classes, label_key=label_key,
                         true_label_key=true_label_key, batch_size=batch_size, workers=workers,
                         precision=precision, device=device, strict=strict)
    rank, world = distributed_context()
    summary = embed_shards(list(shards), cache, config, rank=rank, world_size=world)
    _emit(summary, as_json, _embed_lines)
    if summary["failed"]:
        click.echo(f"engine: error: {len(summary['failed'])} shard(s) failed; rerun the same command to retry them: "
                   + "; ".join(f"{f['url']}: {f['error']}" for f in summary["failed"][:3]), err=True)
        sys.exit(1)


def _embed_lines(s: dict):
    sh = s["shards"]
    yield (f"cache {s['cache']}: {s['rows']} rows ({s['new_rows']} new) | shards: {sh.get('done', 0)} done, "
           f"{sh['skipped']} skipped, {sh.get('failed', 0)} failed")
    yield (f"bad samples: {s['bad_samples']}, missing labels: {s['missing_labels']} | "
           f"{s['images_per_s']} img/s on {s['device']} ({s['precision']}) | model {s['model']}")
    for b in s["bad_examples"][:5]:
        yield f"  bad: {b['key']}: {b['reason']}"


# ---------------------------------------------------------------- prompts / import / models
@cli.command("prompts")
@click.option("--cache", default="feats.zarr", show_default=True)
@click.option("--classes", required=True, help="Class file (JSON/YAML) or built-in name (imagenet1k, shapes[:N]).")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def prompts(cache, classes, device, as_json):
    """Recompute the text features (class prompts) of a cache; image features are untouched.

    \b
    Example:
      engine prompts --cache feats.zarr --classes better-prompts.json
    """
    from engine.embed import write_prompts

    summary = write_prompts(cache, classes, device=device)
    _emit(summary, as_json, lambda s: [
        f"text features for {s['classes']} classes, {s['prompts']} prompts (max {s['max_prompts']} per class) "
        f"written to {s['cache']}"])


@cli.command("import")
@click.argument("npz", type=click.Path(exists=True, dir_okay=False))
@click.option("--cache", required=True, help="New cache to create.")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def import_(npz, cache, as_json):
    """Create a cache from your own features (.npz with features, labels[, keys, true_labels,
    text_features, text_mask, class_names]).

    \b
    Example:
      engine import my_features.npz --cache feats.zarr
    """
    from engine.importer import import_npz

    summary = import_npz(npz, cache)
    _emit(summary, as_json, lambda s: [
        f"imported {s['rows']} rows of dim {s['dim']} into {s['cache']}"
        + (f" ({s['renormalised']} rows were not unit length and were normalised)" if s["renormalised"] else "")])


@cli.command("models")
@click.option("--json", "as_json", is_flag=True)
def models_(as_json):
    """List model names: the bundled offline models and every open_clip architecture."""
    from engine.models import BUNDLED, list_model_names

    names = list_model_names()
    _emit({"bundled": sorted(BUNDLED), "models": names}, as_json, lambda s: s["models"])


# ---------------------------------------------------------------- demo
@cli.command("demo")
@click.option("--workdir", default="demo-run", show_default=True, type=click.Path(file_okay=False),
              help="Where shards, caches, selection, report and head are written.")
@click.option("--classes", "num_classes", type=int, default=20, show_default=True)
@click.option("--epochs", type=int, default=30, show_default=True, help="MixFix epochs.")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def demo(workdir, num_classes, epochs, as_json):
    """Run the whole job offline on the shapes dataset with the bundled tiny CLIP.

    \b
    Example:
      engine demo --workdir demo-run
    """
    from engine.demo import DemoConfig, run_demo, summary_lines

    summary = run_demo(workdir, DemoConfig(classes=num_classes, epochs=epochs))
    _emit(summary, as_json, summary_lines)


def main() -> None:
    cli(prog_name="engine")


if __name__ == "__main__":
    main()
