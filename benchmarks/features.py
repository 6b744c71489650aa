"""Synthetic features with the structure of real CLIP features, and the label-noise kinds.

`clip_features(n, num_classes, dim, ...)` draws image features, prompt features and labels
that behave like CLIP's on a web-scale label set, not like tight clusters:

- image features sit in a narrow cone (a shared direction: unrelated images have cosine
  about 0.4, as CLIP ViT-B/32's do), text features in another (the modality gap);
- classes form a hierarchy (superclasses whose classes are alike) with fine-grained close
  pairs (two dog breeds), each class has a few modes (views), and the within-class spread is
  anisotropic (a power-law spectrum shared by all classes) and larger than the distance
  between close classes;
- the prompts of a class miss its images by a class-specific error and a class-specific bias
  (some classes attract zero-shot predictions), so zero-shot accuracy is well below 1 and
  varies by class, and a linear probe, which learns to ignore the nuisance directions, beats it.

Noise kinds (`noise=`): `sym` (uniform over the other classes), `hard` (to the class whose
centre is most similar: the pair that swaps), `instance` (each sample's chance to flip grows
with its ambiguity and it flips to a class it looks like), `idn` (Xia et al., NeurIPS 2020:
per-sample flip rates, targets from random per-class projections of the feature), `mix` (a
third each of sym, hard and instance), `none`. `rate` is the expected share of wrong labels.

Everything is drawn from one seeded generator in row blocks (bounded memory at 1M rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NOISE_KINDS = ("none", "sym", "hard", "instance", "idn", "mix")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@dataclass
class Geometry:
    """The latent structure behind one draw (all float32, unit rows unless said).

    cone (D,) image direction; centres (C, D) class centres; modes (C, M, D) mode centres;
    basis (D, D) orthonormal, scales (D,) std of the within-class noise along each basis
    vector; class_spread (C,) per-class multiplier of the noise; nearest (C,) the most similar
    other class; text (C, P, D) prompt features."""

    cone: np.ndarray
    centres: np.ndarray
    modes: np.ndarray
    basis: np.ndarray
    scales: np.ndarray
    class_spread: np.ndarray
    nearest: np.ndarray
    text: np.ndarray
    idn_seed: int = 0
    params: dict = None
    _mean_ambiguity: dict = None

    def mean_ambiguity(self, rate: float) -> float:
        """The normaliser of the instance noise's flip chance min(0.95, rate * a / m), chosen on a
        fixed sample so that the expected share of flipped labels is `rate`."""
        cache = self._mean_ambiguity if self._mean_ambiguity is not None else {}
        self._mean_ambiguity = cache
        if rate not in cache:
            rng = np.random.default_rng(12345)
            y = rng.integers(0, self.centres.shape[0], size=20_000)
            a = _ambiguity(draw_images(self, y, rng), y, self)[0]
            low, high = 1e-6, 10.0
            for _ in range(50):  # bisection on m
                m = 0.5 * (low + high)
                low, high = (m, high) if np.minimum(0.95, rate * a / m).mean() > rate else (low, m)
            cache[rate] = 0.5 * (low + high)
        return cache[rate]


SHAPE = {
    "cone": 0.75,
    "signal": 0.5,
    "nuisance": 0.75,
    "power": 1.0,
    "signal_power": 0.5,
    "sibling": 0.75,
    "pair": 0.15,
    "mode": 0.45,
    "blend_share": 0.15,
    "miss": 0.9,
    "bias": 0.01,
    "jitter": 0.5,
    "text_cone": 1.2,
}


def make_geometry(
    num_classes: int,
    dim: int,
    *,
    prompts: int = 4,
    rng: np.random.Generator,
    difficulty: float = 1.0,
    shape: dict | None = None,
) -> Geometry:
    """Draw the class structure. `difficulty` scales the within-class spread (1: zero-shot
    accuracy about 0.7 and a linear probe about 0.9 at 1,000 classes, D = 512)."""
    p = {**SHAPE, **(shape or {})}
    c, d = num_classes, dim
    cone = _unit(rng.standard_normal(d)).astype(np.float32)
    text_cone = _unit(rng.standard_normal(d)).astype(np.float32)
    supers = max(2, int(round(c**0.5)))
    parent = rng.integers(0, supers, size=c)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    ranks = np.arange(1, d + 1)
    shaped = lambda *size: _unit((rng.standard_normal((*size, d)) * ranks ** (-p["signal_power"] / 2)) @ basis.T)  # noqa: E731
    own = shaped(c)
    centres = _unit(p["sibling"] * shaped(supers)[parent] + own)
    modes = _unit(centres[:, None, :] + p["mode"] * shaped(c, 3))
    order = rng.permutation(c)  # fine-grained pairs: a quarter of the classes
    first, second = order[: c // 4], order[c // 4 : 2 * (c // 4)]
    centres[second] = _unit(centres[first] + p["pair"] * own[second])
    modes[second] = _unit(modes[first] + p["pair"] * own[second][:, None, :])
    centres = _unit(centres - np.outer(centres @ cone, cone))  # class structure off the cone
    modes = _unit(modes - (modes @ cone)[..., None] * cone)
    sims = centres @ centres.T
    np.fill_diagonal(sims, -np.inf)
    nearest = sims.argmax(1)
    spectrum = 1.0 / ranks ** p["power"]  # a few nuisance directions dominate
    scales = np.sqrt(spectrum / spectrum.sum()) * p["nuisance"] * difficulty
    class_spread = np.exp(rng.normal(0.0, 0.25, size=c))
    # prompts: the class centre seen through a class-specific error, a class bias along the
    # image cone (classes whose prompts attract every image), per-prompt jitter, the text cone
    miss = np.exp(rng.normal(np.log(p["miss"]), 0.45, size=c))[:, None]
    text_class = centres + miss * _unit(rng.standard_normal((c, d)))
    bias = rng.normal(0.0, p["bias"], size=c)[:, None, None] / p["cone"]
    text = (
        text_class[:, None, :]
        + p["jitter"] * _unit(rng.standard_normal((c, prompts, d)))
        + bias * cone
        + p["text_cone"] * text_cone
    )
    return Geometry(
        cone=cone,
        centres=centres.astype(np.float32),
        modes=modes.astype(np.float32),
        basis=basis.astype(np.float32),
        scales=scales.astype(np.float32),
        class_spread=class_spread.astype(np.float32),
        nearest=nearest,
        text=_unit(text).astype(np.float32),
        idn_seed=int(rng.integers(1 << 31)),
        params=p,
    )


def draw_images(geometry: Geometry, true_labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(B, D) float32 unit image features of the given classes; a share of them are ambiguous
    (blended with their most similar class)."""
    p = geometry.params
    b, d = len(true_labels), geometry.cone.shape[0]
    mode = rng.integers(0, geometry.modes.shape[1], size=b)
    signal = geometry.modes[true_labels, mode]
    blend = np.where(rng.random(b) < p["blend_share"], rng.uniform(0.2, 0.6, size=b), 0.0)[:, None]
    signal = (1 - blend) * signal + blend * geometry.centres[geometry.nearest[true_labels]]
    z = rng.standard_normal((b, d)).astype(np.float32) * geometry.scales
    nuisance = (z @ geometry.basis.T) * geometry.class_spread[true_labels][:, None]
    return _unit(p["cone"] * geometry.cone + p["signal"] * signal + nuisance).astype(np.float32)


def corrupt(
    true_labels: np.ndarray,
    features: np.ndarray,
    geometry: Geometry,
    *,
    noise: str,
    rate: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Noisy labels (B,) int32 for one block of true labels (B,) and their features (B, D)."""
    if noise not in NOISE_KINDS:
        raise ValueError(f"noise: got {noise!r}, expected one of {', '.join(NOISE_KINDS)}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate: got {rate!r}, expected 0 <= rate < 1")
    labels = true_labels.astype(np.int32).copy()
    if noise == "none" or rate == 0:
        return labels
    b, c = len(true_labels), geometry.centres.shape[0]
    kinds = ("sym", "hard", "instance", "idn")
    kind = rng.integers(0, 3, size=b) if noise == "mix" else np.full(b, kinds.index(noise))
    rows = np.arange(b)
    u = rng.random(b)
    gumbel = -np.log(-np.log(rng.random((b, c)) + 1e-12) + 1e-12)
    flip, target = np.zeros(b, bool), labels.copy()

    def assign(mask, chance, to):
        flip[mask] = u[mask] < chance[mask] if np.ndim(chance) else u[mask] < chance
        target[mask] = to[mask]

    if (kind == 0).any():
        assign(kind == 0, rate, (true_labels + rng.integers(1, c, size=b)) % c)
    if (kind == 1).any():
        assign(kind == 1, rate, geometry.nearest[true_labels])
    if (kind == 2).any():
        ambiguity, others = _ambiguity(features, true_labels, geometry)
        chance = np.minimum(0.95, rate * ambiguity / geometry.mean_ambiguity(rate))
        assign(kind == 2, chance, (others / 0.04 + gumbel).argmax(1))
    if (kind == 3).any():
        scores = _idn_scores(features, true_labels, geometry)
        scores[rows, true_labels] = -np.inf
        assign(kind == 3, np.clip(rng.normal(rate, 0.1, size=b), 0.0, 1.0), (scores + gumbel).argmax(1))
    labels[flip] = target[flip]
    return labels


def _ambiguity(features: np.ndarray, true_labels: np.ndarray, geometry: Geometry):
    """(ambiguity (B,) in (0, 1], similarities to the other classes (B, C) with -inf at the own class)."""
    sims = features @ geometry.centres.T
    rows = np.arange(len(true_labels))
    own = sims[rows, true_labels].copy()
    sims[rows, true_labels] = -np.inf
    return np.exp(-np.maximum(own - sims.max(1), 0.0) / 0.05), sims


def _idn_scores(features: np.ndarray, true_labels: np.ndarray, geometry: Geometry) -> np.ndarray:
    """(B, C) scores x W_y (Xia et al.): one random projection per true class, of rank 16."""
    c, d = geometry.centres.shape
    rng = np.random.default_rng(geometry.idn_seed)
    left = rng.standard_normal((d, 16)).astype(np.float32)
    right = rng.standard_normal((c, 16, c)).astype(np.float32) * 0.5
    low = features @ left
    out = np.empty((len(true_labels), c), np.float32)
    for y in np.unique(true_labels):
        rows = np.flatnonzero(true_labels == y)
        out[rows] = low[rows] @ right[y]
    return out


def clip_features(
    n: int,
    num_classes: int,
    dim: int = 512,
    *,
    noise: str = "sym",
    rate: float = 0.4,
    seed: int = 0,
    prompts: int = 4,
    difficulty: float = 1.0,
    dtype=np.float16,
    block: int = 100_000,
    shape: dict | None = None,
):
    """CLIP-like image features, prompt features and labels.

    Returns (features (n, dim) `dtype` unit rows, labels (n,) int32 noisy, true_labels (n,) int32,
    text_features (C, prompts, dim) float32 unit rows, nearest (C,) int64 the most similar other
    class). Classes are drawn uniformly."""
    rng = np.random.default_rng(seed)
    geometry = make_geometry(num_classes, dim, prompts=prompts, rng=rng, difficulty=difficulty, shape=shape)
    true_labels = rng.integers(0, num_classes, size=n).astype(np.int32)
    features = np.empty((n, dim), dtype=dtype)
    labels = np.empty(n, dtype=np.int32)
    for start in range(0, n, block):
        stop = min(n, start + block)
        x = draw_images(geometry, true_labels[start:stop], rng)
        features[start:stop] = x.astype(dtype)
        labels[start:stop] = corrupt(true_labels[start:stop], x, geometry, noise=noise, rate=rate, rng=rng)
    return features, labels, true_labels, geometry.text, geometry.nearest


# ----------------------------------------------------------------------------- a second generator
# Structurally different from `clip_features`, so that a method tuned on one is checked on the
# other: one isotropic cluster per class (Gaussian in the tangent plane, normalised) around a centre
# on a 3-level tree (superclass -> class -> sibling groups of 3), no shared nuisance spectrum, no
# modes, no cone; per-class concentration; long-tailed class sizes (Zipf 0.8: the largest class
# ~40x the smallest at C = 100); a zero-shot witness of chosen quality (`witness` "weak" ~0.4,
# "medium" ~0.7, "strong" ~0.9 zero-shot accuracy). Noise: sym; hard (each class sends its flips to
# one fixed class among its 3 nearest, so flips form chains and cycles, not only mutual pairs);
# instance (flip chance grows with closeness to the nearest other class, to that class); mix.
# `tree_features(n, C, D, noise=, rate=, seed=, witness=)` returns (features (n, D) float16, labels
# (n,) int32 noisy, true (n,) int32, text (C, 3, D) float32).

SPREAD = 3.5
WITNESS_TARGET = {"weak": 0.4, "strong": 0.9, "medium": 0.7}


def _tree_geometry(c: int, d: int, rng):
    supers = max(2, int(round(c**0.5)))
    parent = rng.integers(0, supers, size=c)
    sup = _unit(rng.standard_normal((supers, d)))
    own = _unit(rng.standard_normal((c, d)))
    centres = _unit(0.9 * sup[parent] + own)
    # sibling groups of 3 inside each superclass: pull members towards a group direction
    order = np.argsort(parent, kind="stable")
    for g in range(0, c - 2, 3):
        members = order[g : g + 3]
        if len(set(parent[members])) == 1:
            gdir = _unit(rng.standard_normal(d))
            centres[members] = _unit(centres[members] + 1.2 * gdir)
    spread = np.exp(rng.normal(np.log(SPREAD), 0.2, size=c))  # tangent-noise norm per class
    return centres.astype(np.float32), spread.astype(np.float32)


def _tree_draw(centres, spread, y, rng):
    d = centres.shape[1]
    z = rng.standard_normal((len(y), d)).astype(np.float32) / np.sqrt(d)
    mu = centres[y]
    z -= (z * mu).sum(1, keepdims=True) * mu  # tangent plane
    return _unit(mu + spread[y, None] * z).astype(np.float32)


def _zeroshot_acc(x, y, text):
    sims = np.einsum("nd,cpd->ncp", x, text) / 0.07
    s = np.log(np.exp(sims - sims.max(axis=(1, 2), keepdims=True)).sum(2))
    return float((s.argmax(1) == y).mean())


def _tree_text(centres, err_dir, jitter, scale):
    c, p, d = jitter.shape
    t = centres[:, None, :] + scale * err_dir[:, None, :] + 0.3 * scale * jitter
    return _unit(t).astype(np.float32)


def tree_features(
    n: int,
    num_classes: int,
    dim: int = 256,
    *,
    noise: str = "sym",
    rate: float = 0.4,
    seed: int = 0,
    witness: str = "weak",
    prompts: int = 3,
):
    rng = np.random.default_rng(seed + 7919)
    c, d = num_classes, dim
    centres, spread = _tree_geometry(c, d, rng)
    weights = 1.0 / np.arange(1, c + 1) ** 0.8
    weights = rng.permutation(weights)
    weights /= weights.sum()
    true = rng.choice(c, size=n, p=weights).astype(np.int32)
    x = _tree_draw(centres, spread, true, rng)
    # zero-shot witness: bisection on the error scale to hit the target accuracy
    err_dir = _unit(rng.standard_normal((c, d))).astype(np.float32)
    jitter = _unit(rng.standard_normal((c, prompts, d))).astype(np.float32)
    target = WITNESS_TARGET[witness]
    sample = rng.choice(n, size=min(n, 5000), replace=False)
    lo, hi = 0.0, 20.0
    for _ in range(20):
        mid = 0.5 * (lo + hi)
        acc = _zeroshot_acc(x[sample], true[sample], _tree_text(centres, err_dir, jitter, mid))
        lo, hi = (mid, hi) if acc > target else (lo, mid)
    text = _tree_text(centres, err_dir, jitter, 0.5 * (lo + hi))
    # noise
    sims = centres @ centres.T
    np.fill_diagonal(sims, -np.inf)
    near3 = np.argsort(-sims, axis=1)[:, :3]
    hard_target = near3[np.arange(c), rng.integers(0, 3, size=c)]
    labels = true.copy()
    kinds = {"sym": 0, "hard": 1, "instance": 2}
    if noise == "mix":
        kind = rng.integers(0, 3, size=n)
    elif noise in kinds:
        kind = np.full(n, kinds[noise])
    elif noise == "none":
        return x.astype(np.float16), labels, true, text
    else:
        raise ValueError(f"noise: got {noise!r}, expected sym, hard, instance, mix or none")
    u = rng.random(n)
    # sym
    m = kind == 0
    flip = m & (u < rate)
    labels[flip] = (true[flip] + rng.integers(1, c, size=int(flip.sum()))) % c
    # hard
    m = kind == 1
    flip = m & (u < rate)
    labels[flip] = hard_target[true[flip]]
    # instance: closeness to nearest other centre
    m = np.flatnonzero(kind == 2)
    if len(m):
        s = x[m] @ centres.T
        own = s[np.arange(len(m)), true[m]].copy()
        s[np.arange(len(m)), true[m]] = -np.inf
        other = s.argmax(1)
        amb = np.exp(-np.maximum(own - s.max(1), 0) / 0.05)
        lo, hi = 1e-6, 100.0
        for _ in range(50):
            k = 0.5 * (lo + hi)
            lo, hi = (k, hi) if np.minimum(0.95, k * amb).mean() < rate else (lo, k)
        chance = np.minimum(0.95, 0.5 * (lo + hi) * amb)
        flip = u[m] < chance
        labels[m[flip]] = other[flip]
    return x.astype(np.float16), labels.astype(np.int32), true, text
