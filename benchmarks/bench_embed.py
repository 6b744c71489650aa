"""Embedding throughput, each figure against baselines measured in the same run.

Shapes (the bundled dataset, default):
  (a) decode + preprocess only, same DataLoader workers: the input limit of this machine
  (b) a naive loop: PIL decode → model → np.save per batch, no workers, no overlap
  (c) `engine embed` (workers, inference mode, background writer, per-shard commit)

Photo-like JPEGs (`--data photos`: crops, flips and resizes of scikit-learn's sample photographs,
at `--sizes`, e.g. 256 = short side 256 as WebVision's resized release, 500x375, 1024x768), per size:
  decode_limit  decode + preprocess only on every core (the engine's decoding), no model
  naive         one process: PIL full decode, the model's preprocessing, batches of 256, the model
  engine        `engine embed` with its defaults (reduced JPEG decoding; on CUDA, nvJPEG)
  engine_exact  `engine embed --exact-decode` (on CUDA: `--no-gpu-decode`, CPU decoding)
  model_only    the model alone on random tensors of the input size, same batch and precision
and the ratios engine/naive, engine/decode_limit, engine/model_only (medians of --repeats runs).

    python benchmarks/bench_embed.py                                   # shapes-tiny on this CPU
    python benchmarks/bench_embed.py --data photos --sizes 256,500x375,1024x768
    python benchmarks/bench_embed.py --data photos --gpu --sizes 256   # ViT-B-32 (random weights), bf16
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_result  # noqa: E402
from engine.embed import EmbedConfig, embed_shards  # noqa: E402
from engine.models import load_model  # noqa: E402
from engine.reader import ReaderConfig, ShardReader, decode_image  # noqa: E402
from engine.runtime import set_threads, worker_init_single_thread  # noqa: E402
from engine.synthetic import ShapesConfig, write_shards  # noqa: E402


def naive(shards, loaded, out_dir, *, batch, device):
    import webdataset as wds

    start, n, images, part = time.perf_counter(), 0, [], 0

    def flush():
        nonlocal images, part
        with torch.no_grad():
            f = loaded.model.encode_image(torch.stack(images).to(device), normalize=True)
        np.save(Path(out_dir) / f"part{part}.npy", f.cpu().numpy())
        images, part = [], part + 1

    for sample in wds.WebDataset(shards, shardshuffle=False):
        images.append(loaded.preprocess(decode_image(sample)))
        n += 1
        if len(images) == batch:
            flush()
    if images:
        flush()
    return n / (time.perf_counter() - start)


def engine_run(shards, cache, *, model, pretrained, workers, batch, precision, device):
    cfg = EmbedConfig(
        model=model, pretrained=pretrained, workers=workers, batch_size=batch, precision=precision, device=device
    )
    summary = embed_shards(shards, str(cache), cfg, show_progress=False)
    return summary["images_per_s"], summary  # steady state: model loading excluded, as in (a) and (b)


def precision_probe(loaded, device, sizes=(16, 64, 256)):
    """Images/s of the model alone under fp32 and bf16 autocast, and the max feature difference."""
    out = {}
    size = loaded.identity["preprocess"]["size"]
    size = size[0] if isinstance(size, list) else size
    for batch in sizes:
        x = torch.randn(batch, 3, size, size, device=device)
        row = {}
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            times = []
            with torch.inference_mode():
                for _ in range(4):
                    start = time.perf_counter()
                    if dtype is None:
                        f = loaded.model.encode_image(x, normalize=True)
                    else:
                        with torch.autocast(device.type, dtype=dtype):
                            f = loaded.model.encode_image(x, normalize=True)
                    times.append(time.perf_counter() - start)
            row[name] = round(batch / statistics.median(times[1:]), 1)
            row[f"{name}_features"] = f.float()
        row["max_abs_diff"] = round(float((row.pop("fp32_features") - row.pop("bf16_features")).abs().max()), 4)
        out[batch] = row
    return out


def compression_probe(features: np.ndarray):
    """Bytes on disk and write seconds of (N, D) float16 features with and without Blosc-lz4."""
    import zarr
    from zarr.codecs import BloscCodec

    out = {}
    for name, codec in (
        ("none", None),
        ("blosc-lz4-shuffle", [BloscCodec(cname="lz4", clevel=3, shuffle="shuffle", typesize=2)]),
    ):
        d = tempfile.mkdtemp()
        start = time.perf_counter()
        arr = zarr.create_array(
            f"{d}/a.zarr", shape=features.shape, chunks=(8192, features.shape[1]), dtype="float16", compressors=codec
        )
        arr[:] = features
        seconds = time.perf_counter() - start
        size = sum(p.stat().st_size for p in Path(d).rglob("*") if p.is_file())
        out[name] = {"bytes": size, "ratio_vs_raw": round(size / features.nbytes, 3), "write_s": round(seconds, 3)}
        shutil.rmtree(d)
    return out


def _photo_shard(task) -> str:
    """One shard of photo-like JPEGs (a worker of `write_photo_shards`)."""
    import io

    import webdataset as wds
    from PIL import Image
    from sklearn.datasets import load_sample_images

    path, shard, count, width, height, seed = task
    bases = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng([seed, shard])
    with wds.TarWriter(path) as sink:
        for i in range(count):
            base = bases[int(rng.integers(len(bases)))]
            w, h = base.size
            cw, ch = int(w * rng.uniform(0.5, 1)), int(h * rng.uniform(0.5, 1))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            image = base.crop((x, y, x + cw, y + ch))
            if rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            target = (width, height) if rng.random() < 0.7 else (height, width)  # some portrait
            buffer = io.BytesIO()
            image.resize(target, Image.BICUBIC).save(buffer, format="JPEG", quality=int(rng.integers(75, 96)))
            sink.write({"__key__": f"p{shard:03d}_{i:05d}", "jpg": buffer.getvalue(), "cls": str(i % 10)})
    return path


def write_photo_shards(out: Path, *, size: str, images: int, shards: int, seed: int = 0) -> list[str]:
    """Photo-like JPEG shards: crops and flips of scikit-learn's sample photographs, resized to
    `size` ("256": short side 256 at 4:3, or "WxH"), JPEG quality 75-95, labels 0-9; one process
    per shard."""
    import multiprocessing

    width, height = (int(int(size) * 4 / 3), int(size)) if str(size).isdigit() else map(int, str(size).split("x"))
    out.mkdir(parents=True, exist_ok=True)
    per = -(-images // shards)
    tasks = [
        (str(out / f"photos-{j:06d}.tar"), j, min(per, images - j * per), width, height, seed) for j in range(shards)
    ]
    with multiprocessing.get_context("fork").Pool(min(shards, os.cpu_count() or 1)) as pool:
        return pool.map(_photo_shard, tasks)


def decode_limit(shards, preprocess, *, workers: int, batch: int, draft) -> float:
    """img/s of decoding + preprocessing alone with `workers` processes, read as the engine reads
    (the input limit: how fast the workers can feed any model)."""
    from engine.reader import stripes_for

    reader = ShardReader(
        list(enumerate(shards)),
        preprocess,
        ReaderConfig(batch_size=batch, draft=draft),
        stripes=stripes_for(len(shards), workers),
    )
    loader = torch.utils.data.DataLoader(
        reader, batch_size=None, num_workers=workers, worker_init_fn=worker_init_single_thread
    )
    start, n = time.perf_counter(), 0
    for b in loader:
        n += len(b.keys)
    return n / (time.perf_counter() - start)


def model_only(loaded, device, dtype, *, batch: int, images: int) -> float:
    """img/s of the model alone on random inputs of its size, in the engine's precision."""
    from engine.runtime import autocast

    size = loaded.identity["preprocess"]["size"]
    size = size[0] if isinstance(size, list) else size
    x = torch.randn(batch, 3, size, size, device=device)
    with torch.inference_mode(), autocast(device, dtype):
        loaded.model.encode_image(x)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, done = time.perf_counter(), 0
        while done < images:
            loaded.model.encode_image(x)
            done += batch
        if device.type == "cuda":
            torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def photos(args) -> dict:
    """The photo-like benchmark, one block per size; medians over --repeats."""
    from engine.embed import DRAFT_MARGIN, EmbedConfig, draft_size, plan_cpu_split, with_decode
    from engine.runtime import available_cores, resolve_precision

    device = torch.device("cuda" if args.gpu else "cpu")
    model, pretrained, precision = ("ViT-B-32", "random", "bf16") if args.gpu else ("shapes-tiny", None, "auto")
    loaded = load_model(model, pretrained, device=device)
    dtype = resolve_precision(precision, device)
    draft = draft_size(with_decode(loaded.identity, EmbedConfig()), EmbedConfig())
    workers = plan_cpu_split(args.workers, device)[0]
    out = {
        "model": model,
        "device": str(device),
        "precision": str(dtype),
        "workers": workers,
        "draft_margin": DRAFT_MARGIN,
        "draft": draft,
        "sizes": {},
    }
    for size in args.sizes.split(","):
        work = Path(tempfile.mkdtemp(prefix="bench-photos-"))
        images = args.images if size != "1024x768" else max(200, args.images // 2)
        shards = write_photo_shards(work / "shards", size=size, images=images, shards=args.shards)
        runs = {k: [] for k in ("decode_limit", "naive", "engine", "engine_exact", "model_only")}
        for r in range(args.repeats):
            runs["decode_limit"].append(
                decode_limit(shards, loaded.preprocess, workers=available_cores(), batch=args.batch, draft=draft)
            )
            if not args.gpu or r == 0:  # on a GPU machine: once, on the first shard (it is slow)
                some = shards[:1] if args.gpu else shards
                runs["naive"].append(naive(some, loaded, tempfile.mkdtemp(dir=work), batch=256, device=device))
            for name, extra in (
                ("engine", {}),
                ("engine_exact", {"exact_decode": not args.gpu, "gpu_decode": not args.gpu}),
            ):
                cfg = EmbedConfig(
                    model=model,
                    pretrained=pretrained,
                    workers=args.workers,
                    batch_size=args.batch,
                    precision=precision,
                    device=str(device),
                    **extra,
                )
                cache = work / f"{name}-{r}.zarr"
                summary = embed_shards(shards, str(cache), cfg, show_progress=False)
                runs[name].append(summary["images_per_s"])
                runs.setdefault(f"{name}_seconds", []).append(summary["seconds"])
                runs.setdefault(f"{name}_decode", []).append(summary.get("decode"))
                print(
                    f"  {name}: {summary['images_per_s']} img/s, seconds {summary['seconds']}, "
                    f"decode {summary.get('decode')}",
                    flush=True,
                )
                shutil.rmtree(cache, ignore_errors=True)
            runs["model_only"].append(model_only(loaded, device, dtype, batch=args.batch, images=images))
        med = {k: round(statistics.median(v), 1) for k, v in runs.items() if v and isinstance(v[0], (int, float))}
        ratios = {
            "engine/naive": round(med["engine"] / med["naive"], 2),
            "engine/decode_limit": round(med["engine"] / med["decode_limit"], 2),
            "engine/model_only": round(med["engine"] / med["model_only"], 2),
        }
        out["sizes"][size] = {
            "images": images,
            "median_images_per_s": med,
            "runs": runs,
            "ratios": ratios,
            "decode": summary.get("decode"),
            "cores": available_cores(),
        }
        print(
            f"{size}: "
            + "  ".join(f"{k} {v:.0f}" for k, v in med.items())
            + " img/s | "
            + "  ".join(f"{k} {v:.2f}" for k, v in ratios.items()),
            flush=True,
        )
        shutil.rmtree(work, ignore_errors=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--per-shard", type=int, default=500)
    p.add_argument("--workers", type=int, default=None, help="default: the engine's own choice")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--gpu", action="store_true", help="ViT-B-32 random weights, bf16, on CUDA")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--data", choices=["shapes", "photos"], default="shapes")
    p.add_argument("--sizes", default="256,500x375,1024x768", help="photo sizes: 256 (short side) or WxH")
    p.add_argument("--images", type=int, default=2000, help="photos per size (1024x768: half)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if args.data == "photos":
        set_threads(args.threads)
        result = photos(args)
        print("wrote", write_result("embed-photos-gpu" if args.gpu else "embed-photos", result))
        return
    if args.quick:
        args.shards, args.per_shard = 2, 100
    set_threads(args.threads)
    device = torch.device("cuda" if args.gpu else "cpu")
    model, pretrained, precision = ("ViT-B-32", "random", "bf16") if args.gpu else ("shapes-tiny", None, "auto")
    work = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    write_shards(work / "shards", ShapesConfig(classes=20, per_shard=args.per_shard, shards=args.shards, seed=1))
    shards = sorted(str(s) for s in (work / "shards").glob("*.tar"))
    loaded = load_model(model, pretrained, device=device)
    rows = {}
    from engine.embed import plan_cpu_split

    workers = plan_cpu_split(args.workers, device)[0]
    rows["a_input_only"] = decode_limit(shards, loaded.preprocess, workers=workers, batch=args.batch, draft=None)
    rows["b_naive"] = naive(shards, loaded, tempfile.mkdtemp(dir=work), batch=args.batch, device=device)
    rows["c_engine"], summary = engine_run(
        shards,
        work / "c.zarr",
        model=model,
        pretrained=pretrained,
        workers=args.workers,
        batch=args.batch,
        precision=precision,
        device=str(device),
    )
    ratios = {"c/a": rows["c_engine"] / rows["a_input_only"], "c/b": rows["c_engine"] / rows["b_naive"]}
    result = {
        "images": len(shards) * args.per_shard,
        "model": model,
        "device": str(device),
        "workers": workers,
        "model_threads": summary.get("model_threads"),
        "precision": summary["precision"],
        "batch": args.batch,
        "images_per_s": {k: round(v, 1) for k, v in rows.items()},
        "ratios": {k: round(v, 2) for k, v in ratios.items()},
        "engine_seconds": summary["seconds"],
    }
    if not args.gpu:
        result["precision_cpu"] = precision_probe(loaded, device)
        from engine.cache import Cache

        result["compression"] = compression_probe(Cache(work / "c.zarr").load_features())
    else:
        s = summary["seconds"]
        result["decode_share"] = round(s.get("wait_input", 0) / max(s["total"], 1e-9), 3)
    print(f"{'stage':<16}{'img/s':>10}")
    for k, v in rows.items():
        print(f"{k:<16}{v:>10.1f}")
    print(f"c/a = {ratios['c/a']:.2f} (target >= 0.8)   c/b = {ratios['c/b']:.2f} (target >= 2)")
    if "precision_cpu" in result:
        print("precision (model only, img/s):", result["precision_cpu"])
        print("compression:", result["compression"])
    print("wrote", write_result("embed-gpu" if args.gpu else "embed", result))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
