"""`engine` command line: each command parses, builds a config, calls one engine function and
prints a short summary (or one JSON object with --json). Progress goes to stderr. Options that
several commands share are declared once below, with defaults taken from the configs."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys

import click

from engine.classifiers import CLASSIFIERS
from engine.demo import DemoConfig
from engine.export import ShardExportConfig
from engine.index import IndexConfig
from engine.pack import PackConfig
from engine.report import ReportConfig
from engine.runtime import EngineError, set_threads
from engine.select import MODES, SelectConfig
from engine.synthetic import ShapesConfig
from engine.train import TrainConfig

_logger = logging.getLogger("engine")
DEFAULT_CACHE = "feats.zarr"


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


_VERBOSITY = {"level": 0}


def _fail(message: str, status: int = 2):
    click.echo(f"engine: error: {message}", err=True)
    sys.exit(status)


def handle_errors(fn):
    """Every failure → one line on stderr and exit status 2 (130 on Ctrl-C); a traceback only
    with -vv. What was finished before the failure stays (every stage commits as it goes)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EngineError as err:
            _fail(str(err))
        except KeyboardInterrupt:
            _fail("interrupted; rerun the same command to resume", 130)
        except OSError as err:
            if _VERBOSITY["level"] >= 2:
                raise
            _fail(_os_error(err))
        except Exception as err:  # noqa: BLE001 - the promise is one line, whatever went wrong
            if _VERBOSITY["level"] >= 2:
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            _fail(f"unexpected {type(err).__name__}: {first} (rerun with -vv for the traceback)")

    return wrapper


def _os_error(err: OSError) -> str:
    import errno

    where = f" {err.filename}" if getattr(err, "filename", None) else ""
    if err.errno == errno.ENOSPC:
        return f"disk full while writing{where}; free some space and rerun: finished work is kept"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"not allowed to write{where} ({err.strerror})"
    return f"{err.strerror or type(err).__name__}{where}"


def _not_empty(ctx, param, value):
    """Empty strings are never a path, key or name."""
    if isinstance(value, str) and value.strip() == "":
        raise click.BadParameter(f"got {value!r}, expected a non-empty value", ctx=ctx, param=param)
    if isinstance(value, tuple) and any(isinstance(v, str) and not v.strip() for v in value):
        raise click.BadParameter("got an empty value, expected non-empty values", ctx=ctx, param=param)
    return value


# ---------------------------------------------------------------- the shared vocabulary
def default_of(config_class, name: str):
    """The default of field `name` of a config dataclass (so the CLI never writes it twice)."""
    for f in dataclasses.fields(config_class):
        if f.name == name:
            return f.default if f.default is not dataclasses.MISSING else f.default_factory()
    raise KeyError(f"{config_class.__name__} has no field {name!r}")


def from_config(config_class, name: str, *decls, **kwargs):
    """An option whose default (and type, for numbers) comes from `config_class.name`."""
    default = default_of(config_class, name)
    if isinstance(default, bool):
        kwargs.setdefault("is_flag", True)
    elif isinstance(default, (int, float)) and "type" not in kwargs:
        kwargs["type"] = type(default)
    kwargs.setdefault("show_default", default is not None and not isinstance(default, bool))
    return click.option(*(decls or (f"--{name.replace('_', '-')}",)), name, default=default, **kwargs)


def cache_option(
    help: str = "Feature cache: a Zarr v3 directory or an fsspec URL (s3://bucket/feats.zarr).",
    *,
    required: bool = False,
):
    kwargs = {"required": True} if required else {"default": DEFAULT_CACHE, "show_default": True}
    return click.option("--cache", help=help, callback=_not_empty, **kwargs)


def device_option(help: str = "auto, cpu, cuda or cuda:N."):
    return click.option("--device", default="auto", show_default=True, help=help)


def seed_option(help: str = "Seed of every random choice (recorded in the outputs)."):
    return click.option("--seed", type=int, default=0, show_default=True, help=help)


def json_option():
    return click.option(
        "--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of the summary."
    )


def out_option(what: str, help: str, *, required: bool = False, default=None):
    """--out: where the command writes its main output; `what` is "file" or "folder"."""
    path = click.Path(dir_okay=False) if what == "file" else click.Path(file_okay=False)
    kwargs = (
        {} if default is None else {"default": default, "show_default": True}
    )  # an explicit None would satisfy `required`
    return click.option("--out", required=required, type=path, help=f"{help} ({what}).", callback=_not_empty, **kwargs)


def k_option(default: int, help: str):
    return click.option("-k", "k", type=int, default=default, show_default=True, help=help)


def strict_option(what: str):
    return click.option(
        "--strict",
        is_flag=True,
        help=f"Stop at the first bad {what} instead of skipping it (skipped ones are counted and listed).",
    )


def num_classes_option(default: int):
    return click.option(
        "--num-classes",
        "num_classes",
        type=int,
        default=default,
        show_default=True,
        help="Number of shape classes (2-54).",
    )


class _Group(click.Group):
    """Usage errors (unknown option, bad value) as one line and exit status 2, like every other error."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.Exit as done:
            sys.exit(done.exit_code)
        except click.Abort:
            click.echo("engine: error: aborted", err=True)
            sys.exit(130)
        except click.ClickException as err:
            where = (
                f"{err.ctx.command_path}: " if getattr(err, "ctx", None) and err.ctx.command_path != "engine" else ""
            )
            click.echo(f"engine: error: {where}{err.format_message()}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--threads",
    type=int,
    default=None,
    envvar="ENGINE_THREADS",
    help="torch intra-op threads (default: the cores this process may use; env ENGINE_THREADS).",
)
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
@click.version_option(package_name="engine", message="engine %(version)s")
def cli(threads: int | None, verbose: int) -> None:
    """Cache CLIP features of WebDataset shards once, then select clean samples (CLIPCleaner),
    diagnose label noise with FAISS, and train a MixFix classifier on the cached features."""
    _VERBOSITY["level"] = verbose
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        set_threads(threads)
    except EngineError as err:
        click.echo(f"engine: error: {err}", err=True)
        sys.exit(2)


# ---------------------------------------------------------------- make-shards


@cli.command("make-shards")
@out_option("folder", "Where the shards and classes.json are written", required=True)
@num_classes_option(default_of(ShapesConfig, "classes"))
@from_config(ShapesConfig, "per_shard", help="Images per shard.")
@from_config(ShapesConfig, "shards", help="Number of shards.")
@click.option(
    "--noise",
    type=click.Choice(["none", "sym", "hard", "mix"]),
    default="mix",
    show_default=True,
    help="sym: uniform over all classes; hard: flip to the close partner; mix: half each.",
)
@from_config(ShapesConfig, "rate", help="Share of samples whose label is corrupted.")
@seed_option()
@from_config(ShapesConfig, "prefix", help="Shard file and key prefix.")
@json_option()
@handle_errors
def make_shards(out, num_classes, per_shard, shards, noise, rate, seed, prefix, as_json):
    """Write the procedural shapes dataset as WebDataset shards plus classes.json.

    \b
    Example:
      engine make-shards --out shards/ --num-classes 20 --per-shard 500 --shards 4 --noise mix --rate 0.4
    """
    from engine.runtime import progress
    from engine.synthetic import ShapesConfig, write_shards

    config = ShapesConfig(
        classes=num_classes, per_shard=per_shard, shards=shards, noise=noise, rate=rate, seed=seed, prefix=prefix
    )
    with progress(total=shards * per_shard, desc="make-shards", unit="img") as bar:
        summary = write_shards(out, config, progress=bar.update)
    _emit(
        summary,
        as_json,
        lambda s: [
            f"wrote {s['samples']} images of {s['classes']} classes in {len(s['shards'])} shards to {s['out_dir']}",
            f"label noise: {s['noisy']} samples ({s['noise_rate']:.1%}, {noise}); classes: {s['classes_file']}",
        ],
    )


# ---------------------------------------------------------------- embed
@cli.command("embed")
@click.argument("shards", nargs=-1, required=True, callback=_not_empty)
@cache_option()
@click.option(
    "--model",
    default="shapes-tiny",
    show_default=True,
    callback=_not_empty,
    help="open_clip architecture, a model folder, or shapes-tiny.",
)
@click.option(
    "--pretrained",
    default=None,
    callback=_not_empty,
    help="Pretrained tag (e.g. laion2b_s34b_b79k) or a local weights file.",
)
@click.option(
    "--classes",
    default=None,
    callback=_not_empty,
    help="Class file (JSON/YAML) or built-in name (imagenet1k, shapes[:N]).",
)
@click.option(
    "--label-key",
    default="cls",
    show_default=True,
    callback=_not_empty,
    help="Sample field with the label, or json:FIELD.",
)
@click.option(
    "--true-label-key",
    default=None,
    callback=_not_empty,
    help="Sample field with the true label (evaluation only).",
)
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option(
    "--workers",
    type=int,
    default=None,
    help="Worker processes decoding images (default: half the cores on CPU, up to 8 on GPU).",
)
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True)
@device_option()
@strict_option("sample")
@click.option(
    "--exact-decode",
    is_flag=True,
    help="Decode JPEGs at full size (default: at the smallest DCT scale that keeps both sides >= 1.25x the "
    "model's input, several times faster on photos; a cache keeps one mode).",
)
@click.option(
    "--no-gpu-decode",
    is_flag=True,
    help="With a CUDA device, decode JPEGs on the CPU workers instead of on the GPU (nvJPEG).",
)
@json_option()
@handle_errors
def embed(
    shards,
    cache,
    model,
    pretrained,
    classes,
    label_key,
    true_label_key,
    batch_size,
    workers,
    precision,
    device,
    strict,
    exact_decode,
    no_gpu_decode,
    as_json,
):
    """Embed every image of SHARDS into the cache, exactly once and resumably.

    \b
    Example:
      engine embed 'shards/shapes-{000000..000003}.tar' --cache feats.zarr \\
          --classes shards/classes.json --true-label-key true_cls

    \b
    Several GPUs or machines: the same command under torchrun, every rank into one cache:
      torchrun --standalone --nproc_per_node 8 -m engine embed 'shards/{000000..000999}.tar' \\
          --cache s3://bucket/feats.zarr --model ViT-B-32 --pretrained laion2b_s34b_b79k
    """
    from engine.embed import EmbedConfig, embed_shards
    from engine.runtime import distributed_context

    config = EmbedConfig(
        model=model,
        pretrained=pretrained,
        classes=classes,
        label_key=label_key,
        true_label_key=true_label_key,
        batch_size=batch_size,
        workers=workers,
        precision=precision,
        device=device,
        strict=strict,
        exact_decode=exact_decode,
        gpu_decode=not no_gpu_decode,
    )
    rank, world = distributed_context()
    summary = embed_shards(list(shards), cache, config, rank=rank, world_size=world)
    if rank == 0:  # under torchrun every rank returns the same all-ranks summary; print it once
        _emit(summary, as_json, _embed_lines)
    if summary["failed"]:
        click.echo(
            f"engine: error: {len(summary['failed'])} shard(s) failed; rerun the same command to retry them: "
            + "; ".join(f"{f['url']}: {f['error']}" for f in summary["failed"][:3]),
            err=True,
        )
        sys.exit(1)


def _embed_lines(s: dict):
    sh = s["shards"]
    yield (
        f"cache {s['cache']}: {s['rows']} rows ({s['new_rows']} new) | shards: {sh.get('done', 0)} done, "
        f"{sh['skipped']} skipped, {sh.get('failed', 0)} failed"
        + (f" | {s['ranks']} ranks" if s.get("ranks", 1) > 1 else "")
    )
    yield (
        f"bad samples: {s['bad_samples']}, missing labels: {s['missing_labels']} | "
        f"{s['images_per_s']} img/s on {s['device']} ({s['precision']}) | model {s['model']}"
    )
    d = s.get("decode")
    if d and (d.get("gpu_decoded") or d.get("cpu_fallback")):
        yield f"decoded on the GPU: {d['gpu_decoded']}, on the CPU after nvJPEG refused: {d['cpu_fallback']}"
    for b in s["bad_examples"][:5]:
        yield f"  bad: {b['key']}: {b['reason']}"


# ---------------------------------------------------------------- prompts / import / models
@cli.command("prompts")
@cache_option()
@click.option("--classes", required=True, help="Class file (JSON/YAML) or built-in name (imagenet1k, shapes[:N]).")
@device_option()
@json_option()
@handle_errors
def prompts(cache, classes, device, as_json):
    """Recompute the text features (class prompts) of a cache; image features are untouched.

    \b
    Example:
      engine prompts --cache feats.zarr --classes better-prompts.json
    """
    from engine.embed import write_prompts

    summary = write_prompts(cache, classes, device=device)
    _emit(
        summary,
        as_json,
        lambda s: [
            f"text features for {s['classes']} classes, {s['prompts']} prompts (max {s['max_prompts']} per class) "
            f"written to {s['cache']}"
        ],
    )


@cli.command("import")
@click.argument("npz", type=click.Path(exists=True, dir_okay=False))
@cache_option("New cache to create (a directory or an fsspec URL).", required=True)
@click.option(
    "--model-name",
    default=None,
    help="Name of the backbone that made the features; imports with the same name count as one model.",
)
@json_option()
@handle_errors
def import_(npz, cache, model_name, as_json):
    """Create a cache from your own features (.npz with features, labels[, keys, true_labels,
    text_features, text_mask, class_names]).

    \b
    Example:
      engine import my_features.npz --cache feats.zarr
    """
    from engine.importer import import_npz

    summary = import_npz(npz, cache, model_name=model_name)
    _emit(
        summary,
        as_json,
        lambda s: [
            f"imported {s['rows']} rows of dim {s['dim']} into {s['cache']}"
            + (f" ({s['renormalised']} rows were not unit length and were normalised)" if s["renormalised"] else "")
        ],
    )


@cli.command("models")
@json_option()
def models_(as_json):
    """List model names: the bundled offline models and every open_clip architecture."""
    from engine.models import BUNDLED, list_model_names

    names = list_model_names()
    _emit({"bundled": sorted(BUNDLED), "models": names}, as_json, lambda s: s["models"])


# ---------------------------------------------------------------- select
def _names(value: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in value.split(",") if x.strip())


@cli.command("select")
@cache_option()
@click.option(
    "--mode",
    type=click.Choice(list(MODES)),
    default=default_of(SelectConfig, "mode"),
    show_default=True,
    help="clipcleaner: the paper's procedure (the options below); robust: clean posteriors from a leave-one-out "
    "discriminant, calibrated zero-shot and an estimated noise structure (docs/method.md).",
)
@click.option(
    "--criteria",
    default=",".join(default_of(SelectConfig, "criteria")),
    show_default=True,
    help="Comma-separated: consistency, loss.",
)
@click.option(
    "--classifiers",
    default=",".join(default_of(SelectConfig, "classifiers")),
    show_default=True,
    help=f"Comma-separated, from the classifier registry: {', '.join(CLASSIFIERS)} (knn uses FAISS neighbors).",
)
@from_config(SelectConfig, "theta_cons", help="Consistency threshold.")
@from_config(SelectConfig, "theta_gmm", help="Loss-mixture posterior threshold.")
@from_config(
    SelectConfig, "linear_folds", help="0: in-sample linear classifier (the paper); K >= 2: out-of-fold probabilities."
)
@k_option(10, "Neighbors per sample for the knn classifier.")
@click.option("--no-fill", is_flag=True, help="Do not fill classes left empty by the intersection.")
@out_option("file", "Table with one row per sample in cache order: selection.csv or selection.parquet")
@click.option(
    "--export-probs",
    default=None,
    type=click.Path(file_okay=False),
    help="Folder for probs_<classifier>.npy, (N, C) float32 (cleanlab's pred_probs).",
)
@device_option()
@seed_option()
@json_option()
@handle_errors
def select(
    cache,
    mode,
    criteria,
    classifiers,
    theta_cons,
    theta_gmm,
    linear_folds,
    k,
    no_fill,
    out,
    export_probs,
    device,
    seed,
    as_json,
):
    """Select the samples whose given labels look clean (CLIPCleaner) from the cached features.

    \b
    Example:
      engine select --cache feats.zarr --criteria consistency,loss --classifiers zeroshot,linear \\
          --theta-cons 0.8 --theta-gmm 0.5 --out selection.csv --json
    """
    from engine.stages import check_table_path, select_from_cache

    check_table_path(out)
    config = SelectConfig(
        mode=mode,
        criteria=_names(criteria),
        classifiers=_names(classifiers),
        theta_cons=theta_cons,
        theta_gmm=theta_gmm,
        linear_folds=linear_folds,
        fill_empty=not no_fill,
        device=device,
        seed=seed,
    )
    summary = select_from_cache(cache, config, out=out, probs_dir=export_probs, knn_k=k)
    _emit(summary, as_json, _select_lines)


def _select_lines(s: dict):
    c = s["counts"]
    share = c["final"] / max(1, s["rows"])
    yield f"selected {c['final']} of {s['rows']} samples ({share:.1%}); unlabelled: {s['unlabelled']}"
    yield "  passing each test: " + ", ".join(f"{k} {v}" for k, v in c.items() if "/" in k)
    yield (
        f"  intersection {c.get('intersection')}, filled in {c.get('filled')} | per class min/median/max: "
        + "/".join(str(s["per_class"].get(k)) for k in ("min", "median", "max"))
    )
    m = s.get("metrics")
    if m:
        yield (
            f"  vs true labels: precision {m['precision']:.3f}, recall {m['recall']:.3f}, F1 {m['f1']:.3f}; "
            "classifier accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in m["accuracy"].items())
        )
    if s.get("out"):
        yield f"  table: {s['out']}"
    noise = s.get("noise")
    if noise:
        yield (
            f"  estimated label noise: {noise['estimated_rate']:.1%} ({noise['model']} model); most swapped: "
            + ", ".join(
                f"{p.get('given_name', p['given'])} -> {p.get('true_name', p['true'])} {p['count']:.0f}"
                for p in noise["top_pairs"][:5]
            )
        )
    for line in s.get("warnings", []):
        yield f"  warning: {line}"


# ---------------------------------------------------------------- index / diagnose / neighbors
@cli.command("index")
@cache_option()
@click.option(
    "--kind",
    type=click.Choice(["auto", "flat", "ivf", "hnsw"]),
    default=default_of(IndexConfig, "kind"),
    show_default=True,
    help="auto: exact up to 50,000 rows, else IVF with fp16 codes and calibrated nprobe.",
)
@from_config(IndexConfig, "nlist", type=int, help="IVF lists (default 2^round(log2(2*sqrt(N)))).")
@from_config(IndexConfig, "target_recall", help="nprobe/efSearch is the smallest reaching this recall@10 on a sample.")
@device_option()
@json_option()
@handle_errors
def index(cache, kind, nlist, target_recall, device, as_json):
    """Build the FAISS inner-product index over the cache's image features (stored in the cache).

    \b
    Example:
      engine index --cache feats.zarr --kind auto
    """
    from engine.index import IndexConfig
    from engine.stages import index_from_cache

    summary = index_from_cache(cache, IndexConfig(kind=kind, nlist=nlist, target_recall=target_recall), device=device)
    _emit(
        summary,
        as_json,
        lambda s: [
            f"{s['kind']} index over {s['rows']} rows on {s['device']}: {s['params'].get('factory')} "
            f"(recall@10 {s['params'].get('recall_at_10', 1.0)}) in {s['seconds'].get('build')} s"
        ],
    )


@cli.command("diagnose")
@cache_option()
@k_option(10, "Neighbors per sample.")
@click.option("--top", type=int, default=10, show_default=True, help="Pairs and swaps to list.")
@click.option(
    "--export-knn",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write the kNN graph (.npz, distances) for cleanlab's Datalab (file).",
)
@device_option()
@json_option()
@handle_errors
def diagnose(cache, k, top, export_knn, device, as_json):
    """Confusable class pairs, kNN label agreement and which classes swap labels.

    \b
    Example:
      engine diagnose --cache feats.zarr -k 10 --export-knn knn.npz
    """
    from engine.stages import diagnose_from_cache

    summary = diagnose_from_cache(cache, k=k, top=top, device=device, export_knn=export_knn)
    _emit(summary, as_json, _diagnose_lines)


def _diagnose_lines(s: dict):
    yield f"kNN label agreement (k={s['k']}, {s['index']} index): {s['agreement_mean']:.3f} on average"
    if s["confusable_text"]:
        yield "most confusable classes by prompts: " + ", ".join(
            f"{p['a']}/{p['b']} ({p['similarity']:.2f})" for p in s["confusable_text"][:5]
        )
    yield "most confusable classes by images:  " + ", ".join(
        f"{p['a']}/{p['b']} ({p['similarity']:.2f})" for p in s["confusable_image"][:5]
    )
    yield "labels whose neighbors disagree (given -> neighbors' majority):"
    for w in s["swaps"][:10]:
        yield f"  {w['label']:>20} -> {w['neighbors_say']:<20} {w['count']}"


@cli.command("neighbors")
@click.argument("key", callback=_not_empty)
@cache_option()
@k_option(10, "Neighbors to list.")
@device_option()
@json_option()
@handle_errors
def neighbors(key, cache, k, device, as_json):
    """List a sample's nearest neighbors with keys, labels and similarity.

    \b
    Example:
      engine neighbors shapes0_00003_00017 --cache feats.zarr -k 10
    """
    from engine.stages import neighbors_from_cache

    summary = neighbors_from_cache(cache, key, k=k, device=device)
    _emit(
        summary,
        as_json,
        lambda s: (
            [f"{s['key']} (label {s['label']} {s['class']}):"]
            + [f"  {n['similarity']:.4f}  {n['key']}  {n['label']} {n['class']}" for n in s["neighbors"]]
        ),
    )


# ---------------------------------------------------------------- train / predict
@cli.command("train")
@cache_option()
@click.option(
    "--eval-cache", default=None, help="Held-out cache (same model) to report accuracy on; never used to choose."
)
@click.option(
    "--head", type=click.Choice(["linear", "mlp"]), default=default_of(TrainConfig, "head"), show_default=True
)
@from_config(TrainConfig, "hidden", help="MLP hidden width.")
@from_config(TrainConfig, "epochs", help="Training epochs.")
@from_config(TrainConfig, "batch_size", help="Samples per step.")
@from_config(TrainConfig, "lr", help="SGD learning rate.")
@click.option("--milestones", default=None, help="Comma-separated epochs where lr drops x0.1 (default: 50% and 75%).")
@from_config(TrainConfig, "theta_r", help="Absorb: prediction = label and confidence >= this.")
@from_config(TrainConfig, "theta_r2", help="Relabel: prediction != label and confidence >= this.")
@from_config(TrainConfig, "beta", help="Mixup Beta(beta, beta).")
@click.option("--no-mixfix", is_flag=True, help="Train on the selection only (no absorb/relabel).")
@click.option(
    "--baselines", is_flag=True, help="Also train on all noisy labels and on the selection alone; print all three."
)
@from_config(
    TrainConfig,
    "val_fraction",
    help="Hold out this share of the selection to pick the best epoch (written next to OUT: head.best.pt for head.pt).",
)
@seed_option()
@device_option()
@click.option("--resume", is_flag=True, help="Continue an interrupted run from OUT.state (head.pt.state for head.pt).")
@out_option("file", "The trained head (a checkpoint)", default="head.pt")
@json_option()
@handle_errors
def train(
    cache,
    eval_cache,
    head,
    hidden,
    epochs,
    batch_size,
    lr,
    milestones,
    theta_r,
    theta_r2,
    beta,
    no_mixfix,
    baselines,
    val_fraction,
    seed,
    device,
    resume,
    out,
    as_json,
):
    """Train a head with MixFix on the cached features and the latest selection.

    \b
    Example:
      engine train --cache feats.zarr --eval-cache test.zarr --head linear --epochs 30 --baselines --out head.pt
    """
    from engine.stages import train_from_cache
    from engine.train import TrainConfig

    try:
        stones = tuple(int(x) for x in milestones.split(",")) if milestones else None
    except ValueError:
        raise EngineError(f"milestones: got {milestones!r}, expected comma-separated integers like 80,120") from None
    config = TrainConfig(
        head=head,
        hidden=hidden,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        milestones=stones,
        theta_r=theta_r,
        theta_r2=theta_r2,
        beta=beta,
        mixfix=not no_mixfix,
        val_fraction=val_fraction,
        seed=seed,
        device=device,
    )
    summary = train_from_cache(cache, config, eval_cache=eval_cache, out=out, baselines=baselines, resume=resume)
    _emit(summary, as_json, _train_lines)


def _train_lines(s: dict):
    yield (
        f"trained {s['epochs']} epochs: selection {s['initial_selected']} -> training set {s['final_set']}, "
        f"relabelled {s['relabelled']} (correct: {s['relabel_correct']}) | head {s['head']}, metrics {s['metrics']}"
    )
    for row in s["table"]:
        acc = row.get("eval_acc")
        yield f"  {row['run']:<10} test accuracy (last epoch): {'n/a' if acc is None else f'{acc:.4f}'}"


@cli.command("predict")
@click.option(
    "--head",
    "head_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="A head written by `engine train`.",
)
@cache_option()
@out_option("file", "Table with key,label,pred,conf[,true_label]: .csv or .parquet")
@device_option()
@json_option()
@handle_errors
def predict(head_path, cache, out, device, as_json):
    """Apply a trained head to every row of a cache (made by the same feature model).

    \b
    Example:
      engine predict --head head.pt --cache other.zarr --out preds.csv
    """
    from engine.stages import predict_from_cache

    summary = predict_from_cache(head_path, cache, out=out, device=device)
    _emit(
        summary,
        as_json,
        lambda s: [
            f"predicted {s['rows']} rows of {s['cache']}"
            + (f"; accuracy vs true labels {s['accuracy']:.4f}" if s.get("accuracy") is not None else "")
            + (f"; written to {s['out']}" if s.get("out") else "")
        ],
    )


# ---------------------------------------------------------------- demo
@cli.command("demo")
@out_option("folder", "Where shards, caches, selection, report and head are written", default="demo-run")
@num_classes_option(default_of(DemoConfig, "classes"))
@from_config(DemoConfig, "epochs", help="MixFix epochs.")
@json_option()
@handle_errors
def demo(out, num_classes, epochs, as_json):
    """Run the whole job offline on the shapes dataset with the bundled tiny CLIP.

    \b
    Example:
      engine demo --out demo-run
    """
    from engine.demo import run_demo, summary_lines

    summary = run_demo(out, DemoConfig(classes=num_classes, epochs=epochs))
    _emit(summary, as_json, summary_lines)


# ---------------------------------------------------------------- export
@cli.command("export")
@cache_option()
@out_option("file", "Label table, one row per sample in cache order: .csv or .parquet")
@click.option(
    "--format",
    "table_format",
    type=click.Choice(["csv", "parquet"]),
    default=None,
    help="Table format; must agree with the --out suffix (default: from the suffix).",
)
@click.option(
    "--shards",
    default=None,
    help="Cleaned WebDataset shards: OUT/{000000..}.tar (digits give the width) or OUT/clean-%06d.tar.",
)
@click.option(
    "--keep",
    type=click.Choice(["selected", "all"]),
    default=default_of(ShardExportConfig, "keep"),
    show_default=True,
    help="selected: the final selection, cls = label to train with; all: every sample, cls = MixFix "
    "label (needs `engine train`), plus a selected field.",
)
@from_config(ShardExportConfig, "per_shard", help="Samples per output shard.")
@click.option("--overwrite", is_flag=True, help="Replace an export of another plan in the same folder.")
@click.option(
    "--verify",
    is_flag=True,
    help="Re-hash finished shards (default: size only) and rewrite those whose sha256 differs.",
)
@json_option()
@handle_errors
def export(cache, out, table_format, shards, keep, per_shard, overwrite, verify, as_json):
    """Export the selection and labels: a CSV/Parquet table and/or cleaned shards (resumable).

    Shards copy every field of the source samples byte-for-byte and set `cls` to the label to
    train with and `cls_given` to the original label. A rerun skips finished output shards.

    \b
    Example:
      engine export --cache feats.zarr --out labels.parquet \\
          --shards 'clean/{000000..}.tar' --keep selected --per-shard 1000
    """
    from engine.export import ShardExportConfig, export_cache

    config = ShardExportConfig(keep=keep, per_shard=per_shard, overwrite=overwrite, verify=verify)
    summary = export_cache(cache, out=out, table_format=table_format, shards=shards, config=config)
    _emit(summary, as_json, _export_lines)


def _export_lines(s: dict):
    yield f"cache {s['cache']}: {s['rows']} rows, {s['selected']} selected"
    if "table" in s:
        t = s["table"]
        yield f"  table: {t['rows']} rows x {len(t['columns'])} columns -> {t['out']}"
    if "shards" in s:
        h = s["shards"]
        labels = "MixFix labels" if h["labels_from"] == "mixfix" else "given labels"
        yield (
            f"  shards: {h['samples']} samples (keep {h['keep']}, cls = {labels}, {h['relabelled']} relabelled) in "
            f"{h['shards']} shards of up to {h['per_shard']}: {h['written']} written, {h['skipped']} skipped"
        )
        if h["written"]:
            yield (
                f"  {h['rows_written']} samples in {h['seconds']} s ({h['samples_per_s']} samples/s) -> "
                f"{h['first']} .. {h['last']}; plan: {h['manifest']}"
            )
        elif h["shards"]:
            yield f"  nothing to write: every shard is finished ({h['manifest']})"


# ---------------------------------------------------------------- pack
@cli.command("pack")
@click.argument("root", callback=_not_empty)
@out_option("folder", "Where the shards, pack.json and classes.json are written", required=True)
@click.option(
    "--split",
    default=None,
    callback=_not_empty,
    help="Hugging Face dataset: the split to pack, where the layout has several (train, test, ...).",
)
@click.option(
    "--image-column",
    default=None,
    callback=_not_empty,
    help="Hugging Face dataset: the image column (default: the one Image feature).",
)
@click.option(
    "--label-column",
    default=None,
    callback=_not_empty,
    help="Hugging Face dataset: the label column (default: the one ClassLabel feature; -1 = no label).",
)
@click.option(
    "--key-column",
    default=None,
    callback=_not_empty,
    help="Hugging Face dataset: a column of unique ids for the keys (default: SPLIT_ROW, e.g. train_000123).",
)
@click.option(
    "--true-label-column",
    default=None,
    callback=_not_empty,
    help="Hugging Face dataset: true labels, stored as true_cls (evaluation only).",
)
@click.option(
    "--list",
    "list_file",
    default=None,
    help="'PATH LABEL' lines (paths relative to ROOT; space or comma between). "
    "Default: ROOT is an ImageFolder (ROOT/<class>/<image>).",
)
@click.option("--true-list", default=None, help="Same format: true labels, stored as true_cls (evaluation only).")
@click.option(
    "--subset",
    default=None,
    help="One path a line: pack only these, in this order (e.g. Clothing1M's noisy_train_key_list.txt).",
)
@click.option(
    "--label-from-name",
    default=None,
    metavar="REGEX",
    help=r"Label = the regex's one group on each file name under ROOT, e.g. '(\d+)_\d+\.jpg'.",
)
@click.option(
    "--class-names", default=None, help="One class name a line (line i names class i); written to classes.json."
)
@from_config(PackConfig, "per_shard", help="Files (or dataset rows) per shard.")
@click.option(
    "--prefix", default=None, help="Shard name prefix (default: ROOT's folder name; for a dataset, plus -SPLIT)."
)
@click.option("--shuffle", type=int, default=None, metavar="SEED", help="Permute the files with this seed.")
@click.option(
    "--workers", type=int, default=None, help="Worker processes verifying and writing shards (default: min(cores, 8))."
)
@from_config(PackConfig, "batch_size", help="Hugging Face dataset: rows read at a time by each worker.")
@click.option("--overwrite", is_flag=True, help="Replace what OUT holds (needed when the plan changed).")
@strict_option("image")
@json_option()
@handle_errors
def pack(
    root,
    out,
    split,
    image_column,
    label_column,
    key_column,
    true_label_column,
    list_file,
    true_list,
    subset,
    label_from_name,
    class_names,
    per_shard,
    prefix,
    shuffle,
    workers,
    batch_size,
    overwrite,
    strict,
    as_json,
):
    """Pack an image folder (or ROOT plus a file list), or a Hugging Face dataset (Parquet files, a
    glob of them, or a save_to_disk folder), into WebDataset shards for `engine embed`.

    Every image is decoded before it is written; JPEG/PNG/WebP bytes are kept as they are, other
    formats become PNG; unreadable files (or rows) are skipped and listed. Resumable per shard.

    \b
    Example:
      engine pack webvision/ --list webvision/info/train_filelist_google.txt --out shards/wv-google \\
          --per-shard 1000 --shuffle 0
      engine embed 'shards/wv-google/*.tar' --cache wv.zarr --classes imagenet1k
      engine pack cifar10/ --split train --out shards/cifar10-train    # Parquet files as the Hub serves them
    """
    from engine.pack import PackConfig, pack_dataset

    config = PackConfig(
        list_file=list_file,
        true_list=true_list,
        subset=subset,
        label_from_name=label_from_name,
        class_names=class_names,
        per_shard=per_shard,
        prefix=prefix,
        shuffle=shuffle,
        workers=workers,
        overwrite=overwrite,
        strict=strict,
        split=split,
        image_column=image_column,
        label_column=label_column,
        key_column=key_column,
        true_label_column=true_label_column,
        batch_size=batch_size,
    )
    summary = pack_dataset(root, out, config)
    _emit(summary, as_json, _pack_lines)


def _pack_lines(s: dict):
    sh, unit = s["shards"], "rows" if "hf" in s else "files"
    source = f" (split {s['hf']['split']}, {s['hf']['data_files']} data files)" if "hf" in s else ""
    yield (
        f"packed {s['samples']} of {s['files']} {unit}{source} into {sh['total']} shards in {s['out_dir']} "
        f"({sh['written']} written, {sh['skipped']} skipped) | {s['images_per_s']} img/s, {s['seconds']} s, "
        f"{s['workers']} workers"
    )
    yield (
        f"bad {unit}: {s['bad']} | converted to PNG: {s['converted']} | with true labels: {s['with_true_label']}"
        + (f" | without a label: {s['missing_labels']}" if s["missing_labels"] else "")
        + (f" | ignored (no image extension): {s['ignored']}" if s["ignored"] else "")
    )
    for b in s["bad_examples"]:
        yield f"  bad: {b['path']}: {b['reason']}"
    classes = f" --classes {s['classes_file']}" if s["classes_file"] else ""
    truth = " --true-label-key true_cls" if s["with_true_label"] else ""
    yield f"next: engine embed '{s['shard_pattern']}' --cache feats.zarr{classes}{truth}"


# ---------------------------------------------------------------- report
@cli.command("report")
@cache_option()
@out_option(
    "folder",
    "Report folder: new, empty, or an earlier report (replaced; its thumbnails are reused "
    "where the shard is unchanged)",
    required=True,
)
@from_config(ReportConfig, "per_class", help="Rejected samples shown per class page, most suspicious first.")
@from_config(ReportConfig, "thumb", help="Thumbnail size in pixels (longer side).")
@k_option(default_of(ReportConfig, "neighbors"), "Nearest neighbors shown per sample (0: none).")
@from_config(ReportConfig, "heatmap_classes", help="Classes in the confusable-class heatmap (2-30).")
@from_config(
    ReportConfig, "classes_per_page", help="Classes per list page (bar chart and table), most rejected share first."
)
@click.option("--workers", type=int, default=None, help="Threads reading shards for thumbnails (default: up to 4).")
@device_option("For the FAISS index when neighbors are searched: auto, cpu, cuda or cuda:N.")
@json_option()
@handle_errors
def report(cache, out, per_class, thumb, k, heatmap_classes, classes_per_page, workers, device, as_json):
    """Write a static HTML report of what the selection rejected; open OUT/index.html from disk.

    \b
    Example:
      engine report --cache feats.zarr --out report/ --per-class 24 --thumb 96 -k 5
    """
    from engine.report import summary_lines, write_report

    config = ReportConfig(
        per_class=per_class,
        thumb=thumb,
        neighbors=k,
        heatmap_classes=heatmap_classes,
        classes_per_page=classes_per_page,
        workers=workers,
    )
    summary = write_report(cache, out, config, device=device)
    _emit(summary, as_json, summary_lines)


# ---------------------------------------------------------------- verify
@cli.command("verify")
@cache_option()
@json_option()
@handle_errors
def verify(cache, as_json):
    """Check a cache end to end (manifest, every chunk, values, result groups, leftovers, lock);
    exit status 1 when anything is wrong, with the command that repairs each problem.

    \b
    Example:
      engine verify --cache feats.zarr
    """
    from engine.verify import summary_lines, verify_cache

    summary = verify_cache(cache)
    _emit(summary, as_json, summary_lines)
    if not summary["ok"]:
        sys.exit(1)


# ---------------------------------------------------------------- (new commands go above this line)


def main() -> None:
    cli(prog_name="engine")


if __name__ == "__main__":
    main()
