"""Train `shapes-tiny`, the offline CLIP that ships with the engine, on the shapes dataset.

    python scripts/train_shapes_tiny.py --steps 1000 --batch 256 --threads 2 --seed 0

Contrastive image-text training (open_clip architecture from
engine/assets/shapes-tiny/open_clip_config.json) on procedurally drawn images of all shape
classes with captions built from class names and descriptions. Every same-class caption in a
batch counts as a positive (plain CLIP loss would push them apart). Deterministic for a seed
and thread count. Writes the fp16 weights as open_clip_model.safetensors next to the config,
and an evaluation (zero-shot on freshly drawn images) as TRAINING.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import synthetic  # noqa: E402
from engine.classes import encode_prompts, parse_class_document  # noqa: E402

ASSET = ROOT / "engine" / "assets" / "shapes-tiny"


def draw_pool(count: int, seed: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, 3, 64, 64) uint8 images and (count,) int64 classes, balanced, deterministic."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % num_classes
    rng.shuffle(labels)
    images = np.stack([np.asarray(synthetic.draw_image(int(k), rng)) for k in labels])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255.0 - mean) / std


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 90-degree rotations and flips (the classes are invariant to both)."""
    k = int(torch.randint(4, (1,), generator=gen))
    images = torch.rot90(images, k, dims=(2, 3))
    if torch.rand(1, generator=gen) < 0.5:
        images = images.flip(3)
    return images


def caption_table(tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens of every caption (T, L), each caption's class (T,), and per-class offsets."""
    texts, owners = [], []
    for k, (colour, shape) in enumerate(synthetic.class_list()):
        caps = synthetic.captions(colour, shape)
        texts += caps
        owners += [k] * len(caps)
    owners_t = torch.tensor(owners)
    counts = torch.bincount(owners_t)
    offsets = torch.cumsum(counts, 0) - counts
    return tokenizer(texts), counts, offsets


def multi_positive_loss(image_f, text_f, labels, scale):
    logits = scale * image_f @ text_f.T
    same = (labels[:, None] == labels[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (
        torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
        + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean()
    )


def pair_kind(colour: str, shape: str, partner: tuple[str, str]) -> str:
    """Name of the close pair a class belongs to, e.g. 'circle/ellipse' or 'red/orange'."""
    if partner[0] == colour:
        return "/".join(sorted((shape, partner[1]), key=list(synthetic.SHAPES).index))
    return "/".join(sorted((colour, partner[0]), key=list(synthetic.COLOURS).index))


def evaluate(model, tokenizer, mean, std, *, count: int, seed: int) -> dict:
    """Zero-shot accuracy on freshly drawn images with the engine's own prompts (docs/method.md)."""
    num_classes = synthetic.MAX_CLASSES
    classes = synthetic.class_list()
    images, labels = draw_pool(count, seed, num_classes)
    class_set = parse_class_document(synthetic.class_file(num_classes))
    model.eval()
    text, mask = encode_prompts(class_set, model, tokenizer, device=torch.device("cpu"))
    with torch.inference_mode():
        feats = torch.cat(
            [
                model.encode_image(normalise(images[i : i + 512], mean, std), normalize=True)
                for i in range(0, count, 512)
            ]
        )
    sims = torch.einsum("nd,cpd->ncp", feats, torch.from_numpy(text).float()) / 0.07
    pred = torch.logsumexp(sims.masked_fill(~torch.from_numpy(mask)[None], -torch.inf), 2).argmax(1).numpy()
    labels = labels.numpy()
    partner = synthetic.partners(num_classes)
    kinds = np.array([pair_kind(c, s, classes[partner[k]]) for k, (c, s) in enumerate(classes)])
    correct = pred == labels
    to_partner = pred == partner[labels]
    by_pair = {}
    for kind in dict.fromkeys(kinds.tolist()):
        rows = kinds[labels] == kind
        by_pair[kind] = {
            "accuracy": round(float(correct[rows].mean()), 4),
            "to_partner": round(float(to_partner[rows].mean()), 4),
            "other_errors": round(float((~correct & ~to_partner)[rows].mean()), 4),
        }
    per_class = np.bincount(labels, weights=correct, minlength=num_classes) / np.bincount(labels, minlength=num_classes)
    return {
        "images": count,
        "seed": seed,
        "classes": num_classes,
        "accuracy": round(float(correct.mean()), 4),
        "to_partner": round(float(to_partner.mean()), 4),
        "by_pair": by_pair,
        "per_class": {f"{c} {s}": round(float(v), 4) for (c, s), v in zip(classes, per_class)},
    }


def train(args) -> dict:
    torch.set_num_threads(args.threads)
    config = json.loads((ASSET / "open_clip_config.json").read_text())
    pp = config["preprocess_cfg"]
    mean = torch.tensor(pp["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(pp["std"]).view(1, 3, 1, 1)
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)  # open_clip initialises from the global RNG
        model = open_clip.model.CLIP(**config["model_cfg"])
    tokenizer = open_clip.get_tokenizer(f"local-dir:{ASSET}")
    tokens, counts, offsets = caption_table(tokenizer)
    start = time.time()
    images, labels = draw_pool(args.pool, args.seed, synthetic.MAX_CLASSES)
    print(f"drew {args.pool} images in {time.time() - start:.0f}s", file=sys.stderr)
    scale_params = [model.logit_scale]
    other = [p for n, p in model.named_parameters() if n != "logit_scale"]
    opt = torch.optim.AdamW(
        [
            {"params": other, "lr": args.lr, "weight_decay": 0.1},
            {"params": scale_params, "lr": args.lr * 20, "weight_decay": 0.0},
        ]
    )
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    )
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    for step in range(args.steps):
        idx = torch.randint(len(images), (args.batch,), generator=gen)
        batch_labels = labels[idx]
        pick = offsets[batch_labels] + (torch.rand(args.batch, generator=gen) * counts[batch_labels]).long()
        x = normalise(augment(images[idx], gen), mean, std)
        image_f = model.encode_image(x, normalize=True)
        text_f = model.encode_text(tokens[pick], normalize=True)
        loss = multi_positive_loss(image_f, text_f, batch_labels, model.logit_scale.exp().clamp(max=100))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(
                f"step {step} loss {loss.item():.3f} scale {model.logit_scale.exp().item():.1f} "
                f"{time.time() - start:.0f}s",
                file=sys.stderr,
            )
    seconds = time.time() - start
    model.eval()
    return {"model": model, "tokenizer": tokenizer, "mean": mean, "std": std, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--pool", type=int, default=60000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-images", type=int, default=5400)
    parser.add_argument("--out", type=Path, default=ASSET)
    parser.add_argument("--eval-only", action="store_true", help="Re-evaluate the weights in --out.")
    args = parser.parse_args()
    if args.eval_only:
        return evaluate_saved(args)
    out = train(args)
    model = out["model"]
    from safetensors.torch import save_file

    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out / "open_clip_model.safetensors"))
    # evaluate the fp16 weights exactly as shipped
    model.load_state_dict({k: v.float() for k, v in state.items()})
    report = evaluate(model, out["tokenizer"], out["mean"], out["std"], count=args.eval_images, seed=args.seed + 1000)
    report.update(
        {
            "train_seconds": round(out["seconds"], 1),
            "command": " ".join(sys.argv),
            "args": {k: str(v) for k, v in vars(args).items()},
            "parameters": sum(p.numel() for p in model.parameters()),
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
        }
    )
    (args.out / "TRAINING.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "per_class"}, indent=2))


def evaluate_saved(args) -> None:
    """Evaluate the shipped weights again and update TRAINING.json's evaluation fields."""
    from engine.models import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model("shapes-tiny", str(args.out / "open_clip_model.safetensors"))
    pp = json.loads((ASSET / "open_clip_config.json").read_text())["preprocess_cfg"]
    report_path = args.out / "TRAINING.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    report.update(
        evaluate(
            loaded.model,
            loaded.tokenizer,
            torch.tensor(pp["mean"]).view(1, 3, 1, 1),
            torch.tensor(pp["std"]).view(1, 3, 1, 1),
            count=args.eval_images,
            seed=args.seed + 1000,
        )
    )
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "per_class"}, indent=2))


if __name__ == "__main__":
    main()
