"""The procedural shapes dataset: 64x64 RGB images of coloured shapes on textured, cluttered
backgrounds, written as real WebDataset shards.

Classes are (colour, shape) pairs listed so that classes 2i and 2i+1 are *close partners*
(red/orange, circle/ellipse, square/rectangle, pentagon/hexagon, blue/purple): their colour
or shape ranges overlap, so "hard" label noise (a flip to the partner) is genuinely hard.
"""

from __future__ import annotations

import colorsys
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from engine.files import atomic_file
from engine.runtime import EngineError

_logger = logging.getLogger(__name__)

IMAGE_SIZE = 64
_SUPERSAMPLE = 3

# hue centre (degrees), half-width; saturation and value ranges are shared
COLOURS = {
    "red": (0.0, 10.0),
    "orange": (16.0, 10.0),
    "yellow": (55.0, 8.0),
    "green": (125.0, 15.0),
    "blue": (220.0, 12.0),
    "purple": (250.0, 12.0),
}
# aspect ratio range (long side / short side) and number of polygon vertices (0 = smooth)
SHAPES = {
    "circle": ((1.0, 1.1), 0),
    "ellipse": ((1.12, 1.5), 0),
    "square": ((1.0, 1.1), 4),
    "rectangle": ((1.15, 1.6), 4),
    "pentagon": ((1.0, 1.05), 5),
    "hexagon": ((1.0, 1.05), 6),
    "triangle": ((1.0, 1.1), 3),
    "star": ((1.0, 1.05), -5),
    "cross": ((1.0, 1.05), -4),
}
SHAPE_WORDS = {
    "circle": ["which is perfectly round", "with no corners at all", "shaped like a coin"],
    "ellipse": ["which is an oval", "stretched into an egg shape", "longer than it is wide and round"],
    "square": ["with four equal sides", "with four right angles and equal sides", "shaped like a tile"],
    "rectangle": ["with two long and two short sides", "a stretched box shape", "shaped like a brick"],
    "pentagon": ["with five sides", "with five corners", "shaped like a house outline"],
    "hexagon": ["with six sides", "with six corners", "shaped like a honeycomb cell"],
    "triangle": ["with three sides", "with three pointed corners", "shaped like a slice of pizza"],
    "star": ["with five points", "with spiky points", "shaped like a star in the sky"],
    "cross": ["shaped like a plus sign", "with four arms", "made of two crossing bars"],
}
COLOUR_WORDS = {
    "red": ["the colour of a fire truck", "bright red like a tomato"],
    "orange": ["the colour of a carrot", "orange like a tangerine"],
    "yellow": ["the colour of a lemon", "yellow like the sun"],
    "green": ["the colour of grass", "green like a leaf"],
    "blue": ["the colour of the sky", "deep blue like the sea"],
    "purple": ["the colour of a violet", "purple like a plum"],
}
TEMPLATES = ["a photo of a {name}", "a drawing of a {name}", "a picture of a {name}", "an image of a small {name}"]
SUFFIX = "."


def _class_pairs() -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """Canonical class order as a list of close pairs: two shape-pairs, then one colour-pair,
    with colours rotating so that any prefix of the list is colour-diverse."""
    shape_pairs = [("circle", "ellipse"), ("square", "rectangle"), ("pentagon", "hexagon")]
    colours = ["red", "blue", "green", "orange", "yellow", "purple"]
    by_shape = []
    for k in range(len(shape_pairs) * len(colours)):  # (k + k // 6) % 6 visits every pair once
        (a, b), colour = shape_pairs[k % 3], colours[(k + k // 6) % 6]
        by_shape.append(((colour, a), (colour, b)))
    colour_pairs = [("red", "orange"), ("blue", "purple"), ("yellow", "green")]
    solo = ["triangle", "star", "cross"]
    by_colour = [
        ((colour_pairs[k % 3][0], solo[(k + k // 3) % 3]), (colour_pairs[k % 3][1], solo[(k + k // 3) % 3]))
        for k in range(9)
    ]
    pairs = []
    for i in range(9):
        pairs.extend(by_shape[2 * i : 2 * i + 2])
        pairs.append(by_colour[i])
    return pairs


def class_list() -> list[tuple[str, str]]:
    """All (colour, shape) classes in canonical order; 2i and 2i+1 are close partners."""
    return [cls for pair in _class_pairs() for cls in pair]


MAX_CLASSES = len(class_list())


def class_names(num_classes: int) -> list[str]:
    return [f"{c} {s}" for c, s in class_list()[: _check_classes(num_classes)]]


def _check_classes(num_classes: int) -> int:
    if not 2 <= num_classes <= MAX_CLASSES:
        raise EngineError(f"classes: got {num_classes}, expected 2..{MAX_CLASSES}")
    return num_classes


def partners(num_classes: int) -> np.ndarray:
    """(C,) int64: each class's close partner (2i <-> 2i+1; an odd last class pairs with C-2)."""
    idx = np.arange(_check_classes(num_classes)) ^ 1
    idx[idx >= num_classes] = num_classes - 2
    return idx


def class_descriptions(colour: str, shape: str) -> list[str]:
    """Short descriptions of a class, used both in captions and in prompts."""
    return [f"{w}" for w in SHAPE_WORDS[shape]] + [f"{w}" for w in COLOUR_WORDS[colour]]


def class_file(num_classes: int) -> dict:
    """The `classes.json` document for the first `num_classes` classes (see engine.classes)."""
    classes = []
    for index, (colour, shape) in enumerate(class_list()[: _check_classes(num_classes)]):
        classes.append({"index": index, "name": f"{colour} {shape}", "descriptions": class_descriptions(colour, shape)})
    return {"name": "shapes", "templates": TEMPLATES, "suffix": SUFFIX, "classes": classes}


def captions(colour: str, shape: str) -> list[str]:
    """Training captions for the tiny CLIP: every template with and without each description."""
    name = f"{colour} {shape}"
    plain = [t.format(name=name) + SUFFIX for t in TEMPLATES]
    described = [t.format(name=name) + " " + d + SUFFIX for t in TEMPLATES for d in class_descriptions(colour, shape)]
    return plain + described


# ---------------------------------------------------------------- drawing


def _rgb(hue_deg: float, sat: float, val: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((hue_deg % 360.0) / 360.0, sat, val)
    return int(r * 255), int(g * 255), int(b * 255)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A low-saturation gradient with noise, stripes or blotches."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(0.25, 0.85, size=3)
    tilt = rng.uniform(-0.25, 0.25, size=(2, 3))
    img = base + xx[..., None] * tilt[0] + yy[..., None] * tilt[1]
    grey = img.mean(axis=2, keepdims=True)
    img = grey + (img - grey) * 0.3  # keep backgrounds desaturated so colour stays the shape's
    kind = rng.integers(3)
    if kind == 0:
        img = img + rng.normal(0, 0.06, size=img.shape)
    elif kind == 1:
        freq, angle = rng.uniform(4, 12), rng.uniform(0, math.pi)
        stripes = np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)))
        img = img + 0.07 * stripes[..., None]
    else:
        blot = rng.normal(0, 1, size=(size // 8, size // 8, 1))
        blot = np.kron(blot, np.ones((8, 8, 1)))
        img = img + 0.05 * blot
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), "RGB")


def _outline(rng: np.random.Generator, shape: str, cx: float, cy: float, radius: float) -> list:
    """Polygon vertices of `shape` centred at (cx, cy), randomly rotated and stretched."""
    (lo, hi), sides = SHAPES[shape]
    aspect = rng.uniform(lo, hi)
    if sides == 0:
        angles = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        pts = np.stack([np.cos(angles), np.sin(angles)], 1)
    elif sides > 0:
        angles = np.arange(sides) * 2 * math.pi / sides + math.pi / sides
        pts = np.stack([np.cos(angles), np.sin(angles)], 1)
        if sides == 4:
            pts = pts / np.abs(pts).max()  # an axis-aligned square before stretch and rotation
    elif sides == -5:  # star: alternate outer and inner radius
        angles = np.arange(10) * math.pi / 5 - math.pi / 2
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        pts = np.stack([np.cos(angles) * radii, np.sin(angles) * radii], 1)
    else:  # cross: 12-gon plus sign
        a, b = 1.0, 0.33
        pts = np.array(
            [
                [b, a],
                [b, b],
                [a, b],
                [a, -b],
                [b, -b],
                [b, -a],
                [-b, -a],
                [-b, -b],
                [-a, -b],
                [-a, b],
                [-b, b],
                [-b, a],
            ],
            dtype=np.float64,
        )
    pts = pts * np.array([aspect, 1.0]) / math.sqrt(aspect)
    theta = rng.uniform(0, 2 * math.pi)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    pts = pts @ rot.T * radius + np.array([cx, cy])
    return [tuple(p) for p in pts]


def _clutter(rng: np.random.Generator, draw: ImageDraw.ImageDraw, size: int) -> None:
    """A few thin grey-ish lines and dots that are not shapes of any class."""
    for _ in range(rng.integers(1, 5)):
        tone = int(rng.integers(40, 220))
        colour = (tone + int(rng.integers(-15, 16)),) * 3
        if rng.random() < 0.6:
            x0, y0, x1, y1 = rng.uniform(0, size, size=4)
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(1, 3)) * _SUPERSAMPLE)
        else:
            x, y = rng.uniform(0, size, size=2)
            r = rng.uniform(1, 3) * _SUPERSAMPLE
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)


def draw_image(class_index: int, rng: np.random.Generator, *, num_classes: int = MAX_CLASSES) -> Image.Image:
    """One 64x64 RGB image of class `class_index` (random pose, size, colour jitter, clutter)."""
    colour, shape = class_list()[:num_classes][class_index]
    big = IMAGE_SIZE * _SUPERSAMPLE
    img = _background(rng, IMAGE_SIZE).resize((big, big), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    _clutter(rng, draw, big)
    radius = rng.uniform(0.2, 0.36) * big
    cx, cy = rng.uniform(radius * 0.9, big - radius * 0.9, size=2)
    hue_c, hue_w = COLOURS[colour]
    fill = _rgb(hue_c + rng.uniform(-hue_w, hue_w), rng.uniform(0.65, 1.0), rng.uniform(0.7, 1.0))
    draw.polygon(_outline(rng, shape, cx, cy, radius), fill=fill)
    if rng.random() < 0.5:  # a distractor line across the shape
        _clutter(rng, draw, big)
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    return img


# ---------------------------------------------------------------- noise and shards

NOISE_KINDS = ("none", "sym", "hard", "mix")


def noisy_labels(
    true_labels: np.ndarray, *, num_classes: int, noise: str, rate: float, rng: np.random.Generator
) -> np.ndarray:
    """(N,) int64 given labels: each sample is corrupted with probability `rate`.

    sym: new label uniform over all C classes (may equal the true one, the usual protocol);
    hard: the class's close partner; mix: half of the corrupted samples each way.
    """
    if noise not in NOISE_KINDS:
        raise EngineError(f"noise: got {noise!r}, expected one of {', '.join(NOISE_KINDS)}")
    if not 0.0 <= rate <= 1.0:
        raise EngineError(f"rate: got {rate}, expected a value in [0, 1]")
    labels = true_labels.astype(np.int64).copy()
    if noise == "none" or rate == 0.0:
        return labels
    flip = rng.random(len(labels)) < rate
    hard = {
        "sym": np.zeros(len(labels), bool),
        "hard": np.ones(len(labels), bool),
        "mix": rng.random(len(labels)) < 0.5,
    }[noise]
    uniform = rng.integers(0, num_classes, size=len(labels))
    labels[flip & hard] = partners(num_classes)[true_labels[flip & hard]]
    labels[flip & ~hard] = uniform[flip & ~hard]
    return labels


@dataclass(frozen=True)
class ShapesConfig:
    classes: int = 20
    per_shard: int = 500
    shards: int = 4
    noise: str = "mix"
    rate: float = 0.4
    seed: int = 0
    quality: int = 90
    prefix: str = "shapes"

    def __post_init__(self):
        _check_classes(self.classes)
        for name in ("per_shard", "shards"):
            if getattr(self, name) < 1:
                raise EngineError(f"{name}: got {getattr(self, name)}, expected a positive integer")
        if self.noise not in NOISE_KINDS:
            raise EngineError(f"noise: got {self.noise!r}, expected one of {', '.join(NOISE_KINDS)}")
        if not 0.0 <= self.rate <= 1.0:
            raise EngineError(f"rate: got {self.rate}, expected a value in [0, 1]")


def shard_samples(config: ShapesConfig, shard: int):
    """Yield the samples of one shard as dicts (`__key__`, `jpg`, `cls`, `true_cls`: all bytes; labels as
    ASCII ints)."""
    rng = np.random.default_rng([config.seed, shard])
    true = rng.integers(0, config.classes, size=config.per_shard)
    given = noisy_labels(true, num_classes=config.classes, noise=config.noise, rate=config.rate, rng=rng)
    for i in range(config.per_shard):
        buf = io.BytesIO()
        draw_image(int(true[i]), rng, num_classes=config.classes).save(buf, format="JPEG", quality=config.quality)
        yield {
            "__key__": f"{config.prefix}{config.seed}_{shard:05d}_{i:05d}",
            "jpg": buf.getvalue(),
            "cls": str(int(given[i])).encode(),
            "true_cls": str(int(true[i])).encode(),
        }


def write_shards(out_dir: str | os.PathLike, config: ShapesConfig, *, progress=None) -> dict:
    """Write `config.shards` tar shards plus `classes.json` into `out_dir`; returns a summary.

    Each shard is written to a temporary name and renamed when complete, so a killed run never
    leaves a truncated shard under a final name; existing complete shards are rewritten
    identically (generation is deterministic for a seed).
    """
    import webdataset as wds

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "classes.json").write_text(json.dumps(class_file(config.classes), indent=2) + "\n")
    paths, noisy = [], 0
    for shard in range(config.shards):
        path = out / f"{config.prefix}-{shard:06d}.tar"
        with atomic_file(path) as handle, wds.TarWriter(handle) as sink:
            for sample in shard_samples(config, shard):
                noisy += sample["cls"] != sample["true_cls"]
                sink.write(sample)
        paths.append(str(path))
        if progress is not None:
            progress(config.per_shard)
    total = config.shards * config.per_shard
    return {
        "out_dir": str(out),
        "shards": paths,
        "samples": total,
        "classes": config.classes,
        "noisy": int(noisy),
        "noise_rate": noisy / total,
        "classes_file": str(out / "classes.json"),
        "config": config.__dict__,
    }
