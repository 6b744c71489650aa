"""`robust` selection: Bayes clean-label posteriors from a leave-one-out Gaussian discriminant,
the zero-shot witness and an estimated noise transition matrix, streamed in row blocks.

Self-contained (numpy, torch, scipy); never reads true labels. Entry point: `robust_select`.

Model
-----
Every labelled row i has features x_i (unit rows, D dims), a given label j = y~_i, and an unknown
true class k. We estimate

    p(k | x_i)   a clean-class posterior from two label-independent-as-possible experts:
                 log p(k|x) = beta * g_k(x) + a * z_k(x) + log pi_k  (normalised over k)
        g        a Gaussian discriminant (LDA: shared within-class covariance, class means of
                 the given labels), evaluated LEAVE-ONE-OUT for the row's own class, so a row
                 never votes for its own label (the out-of-fold idea, in closed form, for free);
        z        CLIP zero-shot log-probabilities (prompt ensemble, tau = 0.07), label-independent;
        a        the zero-shot weight, i.e. a temperature calibration tau/a of zero-shot, fitted
                 (1-D cross-entropy) on rows where the discriminant agrees with the given label;
        beta     the discriminant's temperature (see the two noise models below);
    T[k, j]      P(given j | true k), the noise transition matrix;

and the clean posterior of row i by Bayes' rule

    q_i = P(true = j | x_i, given = j) = p(j|x_i) T[j, j] / sum_k p(k|x_i) T[k, j].

Two noise models are fitted and one is chosen from the data:

  flat        T = (1 - eps) I + eps / (C - 1) (11^T - I): noise without structure. (beta, eps)
              maximise the likelihood of the given labels, sum_i log sum_k p(k|x_i) T[k, y~_i],
              on a row sample (with a flat T this depends on p(y~_i|x_i) only). Here the
              likelihood identifies both the noise rate and the discriminant's temperature.
  structured  beta = 1 (the discriminant's own probabilities) and T estimated by EM soft
              counts J[j, k] = sum_{i: y~_i = j} P(true k | x_i, j), started from the flat T,
              with `em_updates` updates. T keeps a per-given-class uniform background plus
              only the cells that stand out of it ("significant": count > bg + cell_z sqrt(bg+1)
              and >= cell_min_share of the class), so 1,000 classes with 50 rows each do not
              turn sampling noise into structure. EM is stopped after 2 updates: its fixed point
              absorbs the classifier's own confusions into T and over-estimates the noise (measured).

  decision    flat if eps_flat >= flat_share * eps_structured, i.e. a one-parameter
              structure-free model already explains the noise the structured model finds (noise
              is symmetric-like), and the structured T does not explain the given labels much
              better (mean log-likelihood gain per row minus a BIC penalty < structure_gain);
              otherwise structured (pairs / instance noise are present).

Selected: q_i >= threshold (0.5: the label is more likely right than wrong), then classes left
empty get their m best rows (as the paper mode's fill-in). Score: the log-odds log q/(1-q),
a strict ranking from most to least likely clean.

Streaming and cost (N rows, D dims, C classes, P prompts)
---------------------------------------------------------
pass 1   class sums (C, D), counts, second moment (D, D), float64        N D^2 flops
fit      shrunk within-class covariance (Oracle Approximating Shrinkage), its inverse     D^3
calib    g and z on <= `calib_rows` rows (calib_rows x C float32, twice)
pass 2   g (N D C + N D^2) and z (N D C P) per block; kept per row: the top-K classes of
         the beta=1 posterior (K int32 + K float32) and the flat model's own-label posterior
EM       on the kept top-K only (no matmul)
Nothing N x C is held: memory is the float16 features + about 8 K + 40 bytes per row
(K = 16: ~170 bytes, 170 MB at 1M rows) + C^2 float64 for J and T (8 MB at C = 1,000).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from engine.classifiers.gda import build_gda, choose_shrinkage, class_stats, oas_shrinkage
from engine.classifiers.zeroshot import zeroshot_log_probs
from engine.runtime import EngineError

CALIB_ELEMENTS = 10_000_000  # calibration rows x classes (two float32 matrices of this size)


@dataclass(frozen=True)
class RobustConfig:
    """Every parameter of the robust mode (recorded with each result).

    tau            zero-shot temperature (CLIP's 0.07; the data-driven weight a rescales it)
    shrinkage      covariance shrinkage: "loo" (data-driven: the grid value whose leave-one-out
                   discriminant agrees most with the given labels on the calibration rows), "oas"
                   (Oracle Approximating Shrinkage; too little for CLIP features, measured) or a number
    calib_rows     rows sampled (seeded) for the zero-shot weight and the flat model's (beta, eps)
    em_updates     EM updates of the structured T (2; see module docstring)
    beta_structured the discriminant's temperature in the structured model (1: its own probabilities)
    flat_share     the flat model is chosen when eps_flat >= flat_share * eps_structured ...
    structure_gain ... unless the structured T's mean log-likelihood of the given labels exceeds the
                   flat one's by more than this many nats per row beyond a BIC penalty
    cell_z         a T cell is structure when its count exceeds bg + cell_z * sqrt(bg + 1)
    cell_min_share ... and is at least this share of its given class
    top_k          classes kept per row for the EM (the posterior mass beyond is negligible)
    threshold      select rows with clean posterior q >= threshold
    fill_empty     classes with rows but none selected get their m best rows (paper's rule)
    block_rows     rows per block (None: about 16M floats per (rows, C*P) block)
    """

    tau: float = 0.07
    shrinkage: str | float = "loo"
    calib_rows: int = 20_000
    em_updates: int = 2
    beta_structured: float = 1.0
    flat_share: float = 0.8
    structure_gain: float = 0.5
    cell_z: float = 8.0
    cell_min_share: float = 0.02
    top_k: int = 16
    threshold: float = 0.5
    fill_empty: bool = True
    block_rows: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- pieces


def _golden(f, lo: float, hi: float, iters: int = 30) -> float:
    """Minimise a unimodal f on [lo, hi] by golden-section search; returns the argmin."""
    r = (math.sqrt(5.0) - 1.0) / 2.0
    x1, x2 = hi - r * (hi - lo), lo + r * (hi - lo)
    f1, f2 = f(x1), f(x2)
    for _ in range(iters):
        if f1 < f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - r * (hi - lo)
            f1 = f(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + r * (hi - lo)
            f2 = f(x2)
    return 0.5 * (lo + hi)


def calibrate_zeroshot(z: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> float:
    """Zero-shot weight a (temperature tau/a) minimising the cross-entropy of softmax(a z) against
    the given labels on `rows` (bool (R,)): rows where the discriminant agrees with the label, so
    mostly clean, and z itself never saw a label. Search over log a in [-4, 4]."""
    if int(rows.sum()) < 10:
        return 1.0
    zr, yr = z[rows], y[rows]
    f = lambda la: float(torch.nn.functional.cross_entropy(math.exp(la) * zr, yr))  # noqa: E731
    return math.exp(_golden(f, -4.0, 4.0))


def flat_noise_fit(
    g: torch.Tensor, z: torch.Tensor, y: torch.Tensor, a: float, logpi: torch.Tensor
) -> tuple[float, float, float]:
    """(beta, eps, mean log-likelihood) of the flat noise model on a row sample.

    g, z (R, C) float32, y (R,) int64. Maximises mean_i log[(1 - eps) p_i + eps (1 - p_i) / (C - 1)],
    p_i = softmax(beta g_i + a z_i + log pi)[y_i], over log beta in [-3, 1] (a 17-point grid, then
    golden refinement) and eps in (0, 0.95) (golden, concave in eps for fixed p)."""
    c = g.shape[1]
    ar = torch.arange(len(y))

    def own_p(lb):
        return torch.log_softmax(math.exp(lb) * g + a * z + logpi, 1)[ar, y].exp().double().cpu().numpy()

    def best_eps(p):
        f = lambda e: -float(np.log((1 - e) * p + e / (c - 1) * (1 - p)).mean())  # noqa: E731
        e = _golden(f, 1e-4, 0.95, iters=25)
        return e, -f(e)

    def score(lb):
        return -best_eps(own_p(lb))[1]

    grid = np.linspace(-3.0, 1.0, 17)
    vals = [score(lb) for lb in grid]
    i = int(np.argmin(vals))
    lo, hi = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
    lb = _golden(score, lo, hi, iters=12) if hi > lo else grid[i]
    eps, ll = best_eps(own_p(lb))
    return math.exp(lb), eps, ll


def structured_T(
    joint: torch.Tensor, counts: torch.Tensor, *, cell_z: float, cell_min_share: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Transition matrix T (C, C) float64, T[k, j] = P(given j | true k), from soft counts
    joint[j, k] (given j, true k). Per given class j: the diagonal, the significant off-diagonal
    cells (count > bg + cell_z sqrt(bg + 1) and >= cell_min_share n_j, bg re-estimated twice
    without the kept cells) and a uniform background bg over the rest. Returns (T, keep (C, C) bool)."""
    c = joint.shape[0]
    off = joint.clone()
    off.fill_diagonal_(0.0)
    total = off.sum(1)
    bg = total / max(c - 1, 1)
    keep = torch.zeros_like(off, dtype=torch.bool)
    for _ in range(3):
        keep = (off > bg[:, None] + cell_z * torch.sqrt(bg[:, None] + 1.0)) & (off >= cell_min_share * counts[:, None])
        rest = total - torch.where(keep, off, torch.zeros_like(off)).sum(1)
        bg = rest / (c - 1 - keep.sum(1)).clamp(min=1).double()
    smooth = torch.where(keep, off, bg[:, None].expand(c, c))
    smooth.fill_diagonal_(0.0)
    smooth += torch.diag(joint.diagonal())
    t = smooth.T + 1e-9
    return t / t.sum(1, keepdim=True), keep


def flat_T(num_classes: int, eps: float, device=None) -> torch.Tensor:
    t = torch.full((num_classes, num_classes), eps / max(num_classes - 1, 1), dtype=torch.float64, device=device)
    t.fill_diagonal_(1.0 - eps)
    return t


def bayes_pass(
    top_idx: torch.Tensor,
    top_val: torch.Tensor,
    own_lp: torch.Tensor,
    labels: torch.Tensor,
    rows: torch.Tensor,
    T: torch.Tensor,
    *,
    want_rows: bool = False,
    block: int = 1 << 18,
):
    """Bayes' rule with a transition matrix on the kept top-K posterior of every row.

    top_idx (N, K) int, top_val (N, K) float log p of the K likeliest classes; own_lp (N,) log p of
    the given label (used when it is not among the K); labels (N,) int64; rows (M,) the labelled
    rows; T (C, C) float64, T[k, j] = P(given j | true k). For row i with label j the candidates
    are its K classes and j; P(true k | x_i, j) is proportional to p(k | x_i) T[k, j].

    Returns (joint (C, C) float64 soft counts [given j, true k], q (N,) float64 P(true = given)
    or None, logit (N,) float64 log q/(1-q) or None, best (N,) int32 the likeliest true class or
    None, mean log-likelihood of the given labels log sum_k p(k|x) T[k, j] over the rows)."""
    c = T.shape[0]
    n = len(labels)
    joint = torch.zeros(c, c, dtype=torch.float64)
    loglik = 0.0
    q = torch.zeros(n, dtype=torch.float64) if want_rows else None
    logit_q = torch.full((n,), -float("inf"), dtype=torch.float64) if want_rows else None
    best = torch.full((n,), -1, dtype=torch.int32) if want_rows else None
    logT = torch.log(T)
    neg = -float("inf")
    for s in range(0, len(rows), block):
        r = rows[s : s + block]
        yr = labels[r]
        idx = top_idx[r].long()
        val = top_val[r].double()
        in_top = (idx == yr[:, None]).any(1)
        cand = torch.cat([idx, yr[:, None]], 1)
        extra = torch.where(in_top, torch.full_like(val[:, 0], neg), own_lp[r].double())
        lr = torch.cat([val, extra[:, None]], 1) + logT[cand, yr[:, None]]
        post = torch.softmax(lr, 1)
        loglik += float(torch.logsumexp(lr, 1).sum())
        joint.index_put_((yr[:, None].expand_as(cand).reshape(-1), cand.reshape(-1)), post.reshape(-1), accumulate=True)
        if want_rows:
            is_own = cand == yr[:, None]
            lo = torch.logsumexp(torch.where(is_own, lr, torch.full_like(lr, neg)), 1)
            le = torch.logsumexp(torch.where(is_own, torch.full_like(lr, neg), lr), 1)
            q[r] = torch.exp(lo - torch.logaddexp(lo, le))
            logit_q[r] = lo - le
            best[r] = cand.gather(1, lr.argmax(1, keepdim=True)).squeeze(1).int()
    return joint, q, logit_q, best, loglik / max(len(rows), 1)


def confident_joint(
    top_idx: torch.Tensor,
    top_val: torch.Tensor,
    own_lp: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    calibrate: bool = True,
) -> torch.Tensor:
    """The confident joint of Northcutt et al. (JAIR 2021), (C, C) float64 [given j, true k], from
    the kept top-K probabilities (exact when K = C, or when the K classes hold every class above
    its threshold), with cleanlab 2.x's conventions: threshold t_k = mean p_k over rows labelled k
    (at least 2e-6); a class is confident for a row when p_k >= t_k - 1e-6; a labelled row with one
    confident class counts at (label, that class), with several at (label, its argmax class), with
    none not at all; the diagonal is at least 1; `calibrate` rescales each row to the count of its
    label, then the whole to the number of labelled rows (cleanlab then rounds; we do not).
    Used in `decisions` as a cross-check of the noise estimate."""
    lab = labels >= 0
    y = labels[lab]
    counts = torch.bincount(y, minlength=num_classes).double()
    thr = torch.zeros(num_classes, dtype=torch.float64)
    thr.index_add_(0, y, own_lp[lab].double().exp())
    thr = torch.where(counts > 0, thr / counts.clamp(min=1.0), torch.full_like(thr, 2.0)).clamp(min=2e-6)
    p = top_val[lab].double().exp()
    idx = top_idx[lab].long()
    conf = p >= thr[idx] - 1e-6
    n_conf = conf.sum(1)
    first_conf = idx.gather(
        1,
        torch.where(conf, torch.arange(idx.shape[1]).expand_as(idx), torch.full_like(idx, idx.shape[1]))
        .min(1)
        .values.clamp(max=idx.shape[1] - 1)[:, None],
    ).squeeze(1)
    overall = idx.gather(1, p.argmax(1, keepdim=True)).squeeze(1)
    guess = torch.where(n_conf > 1, overall, first_conf)
    has = n_conf > 0
    cj = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    cj.index_put_((y[has], guess[has]), torch.ones(int(has.sum()), dtype=torch.float64), accumulate=True)
    d = cj.diagonal().clamp(min=1.0)
    cj[torch.arange(num_classes), torch.arange(num_classes)] = d
    if calibrate:
        cj = cj / cj.sum(1, keepdim=True).clamp(min=1e-6) * counts[:, None]
        cj = cj / cj.sum().clamp(min=1e-6) * counts.sum()
    return cj


# ----------------------------------------------------------------------------- main


@dataclass
class RobustResult:
    """The robust selection (arrays (N,) in row order).

    selected bool: the clean set (clean posterior >= threshold, plus empty-class fill-in); filled
    bool: the fill-in rows; score float32: log-odds that the given label is right (-inf for
    unlabelled rows), which ranks every row from most to least likely clean; clean_prob float32
    the clean posterior q in [0, 1]; likely_true int32 the most probable true class (-1
    unlabelled); pred_gda, pred_zeroshot int32 the two witnesses' own predictions; noise (given
    (E,), true (E,), count (E,)) the estimated counts of given label -> true class (cells of at
    least half a sample, the diagonal always); noise_rate (C,) float64 estimated share of wrong
    labels per given class (nan: no rows); top_pairs the largest off-diagonal cells; decisions:
    the noise model chosen and why, every fitted parameter, timings and the configuration."""

    selected: np.ndarray
    filled: np.ndarray
    score: np.ndarray
    clean_prob: np.ndarray
    likely_true: np.ndarray
    pred_gda: np.ndarray
    pred_zeroshot: np.ndarray
    noise: dict
    noise_rate: np.ndarray
    top_pairs: list
    decisions: dict


@dataclass
class _Witnesses:
    """What the calibration fitted: the discriminant, the zero-shot weight a, the flat model."""

    gda: object
    a: float
    beta_flat: float
    eps_flat: float
    loglik_flat_sample: float
    shrinkage_scores: dict
    calib_rows: int


def _calibrate(feats, y_all, text, mask, stats, cfg: RobustConfig, *, seed: int, dev) -> _Witnesses:
    """Shrinkage, the zero-shot weight and the flat noise model, on a seeded sample of labelled rows."""
    c = text.shape[0]
    gen = torch.Generator().manual_seed(seed)
    lab_rows = torch.nonzero(y_all >= 0).squeeze(1)
    take = int(min(len(lab_rows), cfg.calib_rows, max(2000, CALIB_ELEMENTS // c)))
    cal = lab_rows[torch.randperm(len(lab_rows), generator=gen)[:take]].sort().values
    xs = feats[cal.to(feats.device)].to(dev).float()
    ys = y_all[cal].to(dev)
    if cfg.shrinkage == "loo":
        lam, lam_scores = choose_shrinkage(stats, xs, ys)
    elif cfg.shrinkage == "oas":
        m = float(stats.counts.sum())
        mu = stats.sums / stats.counts.clamp(min=1.0)[:, None]
        within = (stats.second - (mu * stats.counts[:, None]).T @ mu) / m
        lam, lam_scores = oas_shrinkage(0.5 * (within + within.T), int(m)), {}
    else:
        lam, lam_scores = float(cfg.shrinkage), {}
    gda = build_gda(stats, lam)
    gs, zs = gda.logits(xs, ys), zeroshot_log_probs(xs, text, mask, tau=cfg.tau)
    a = calibrate_zeroshot(zs, ys, gs.argmax(1) == ys)
    beta, eps, ll = flat_noise_fit(gs, zs, ys, a, gda.logpi.to(dev))
    return _Witnesses(
        gda=gda, a=a, beta_flat=beta, eps_flat=eps, loglik_flat_sample=ll, shrinkage_scores=lam_scores, calib_rows=take
    )


@dataclass
class _RowSummaries:
    """Per row, from one pass over the blocks: the top-K classes of the structured model's
    posterior, its log p of the given label, the flat model's p of the given label and its best
    other class, and the two witnesses' predictions. (N, K) and (N,) on the CPU."""

    top_idx: torch.Tensor
    top_val: torch.Tensor
    own_lp: torch.Tensor
    flat_own: torch.Tensor
    flat_alt: torch.Tensor
    pred_g: torch.Tensor
    pred_z: torch.Tensor


def _score_pass(
    feats, y_all, text, mask, w: _Witnesses, cfg: RobustConfig, *, block: int, dev, show_progress
) -> _RowSummaries:
    from engine.runtime import progress

    n, c = len(y_all), text.shape[0]
    k_top = min(cfg.top_k, c)
    out = _RowSummaries(
        top_idx=torch.empty(n, k_top, dtype=torch.int32),
        top_val=torch.empty(n, k_top, dtype=torch.float32),
        own_lp=torch.full((n,), -float("inf"), dtype=torch.float32),
        flat_own=torch.zeros(n, dtype=torch.float64),
        flat_alt=torch.full((n,), -1, dtype=torch.int32),
        pred_g=torch.empty(n, dtype=torch.int32),
        pred_z=torch.empty(n, dtype=torch.int32),
    )
    logpi = w.gda.logpi.to(dev)
    disable = None if show_progress is None else not show_progress
    with progress(total=n, desc="select robust", unit="row", disable=disable) as bar:
        for start in range(0, n, block):
            stop = min(n, start + block)
            x = feats[start:stop].to(dev).float()
            yb = y_all[start:stop].to(dev)
            g, z = w.gda.logits(x, yb), zeroshot_log_probs(x, text, mask, tau=cfg.tau)
            out.pred_g[start:stop], out.pred_z[start:stop] = g.argmax(1).int().cpu(), z.argmax(1).int().cpu()
            lp = torch.log_softmax(cfg.beta_structured * g + w.a * z + logpi, 1)
            v, i = lp.topk(k_top, dim=1)
            out.top_val[start:stop], out.top_idx[start:stop] = v.cpu(), i.int().cpu()
            lab, yc = yb >= 0, yb.clamp(min=0)
            out.own_lp[start:stop] = torch.where(
                lab, lp.gather(1, yc[:, None]).squeeze(1), torch.full_like(v[:, 0], -float("inf"))
            ).cpu()
            lpf = torch.log_softmax(w.beta_flat * g + w.a * z + logpi, 1)
            out.flat_own[start:stop] = (
                torch.where(lab, lpf.gather(1, yc[:, None]).squeeze(1).exp(), torch.zeros_like(v[:, 0])).double().cpu()
            )
            lpf.scatter_(1, yc[:, None], -float("inf"))
            out.flat_alt[start:stop] = lpf.argmax(1).int().cpu()
            bar.update(stop - start)
    return out


def _noise_models(rows: _RowSummaries, y_all, w: _Witnesses, cfg: RobustConfig, counts) -> dict:
    """Both noise models on the row summaries and the choice between them (module docstring)."""
    c, labelled = len(counts), y_all >= 0
    rows_l = torch.nonzero(labelled).squeeze(1)
    m_lab = len(rows_l)

    def posterior_pass(T, want_rows=False):
        return bayes_pass(rows.top_idx, rows.top_val, rows.own_lp, y_all, rows_l, T, want_rows=want_rows)

    T, n_cells = flat_T(c, w.eps_flat), 0
    for _ in range(cfg.em_updates):
        joint, _, _, _, _ = posterior_pass(T)
        T, keep = structured_T(joint, counts, cell_z=cfg.cell_z, cell_min_share=cfg.cell_min_share)
        n_cells = int(keep.sum())
    joint_s, q_s, logit_s, best_s, ll_s = posterior_pass(T, want_rows=True)
    eps_s = 1.0 - float(joint_s.diagonal().sum()) / m_lab
    eps_f, p = w.eps_flat, rows.flat_own
    num, other = (1.0 - eps_f) * p, eps_f / max(c - 1, 1) * (1.0 - p)
    q_f = torch.where(labelled, num / (num + other).clamp(min=1e-300), torch.zeros_like(p))
    logit_f = torch.where(
        labelled,
        torch.log(num.clamp(min=1e-300)) - torch.log(other.clamp(min=1e-300)),
        torch.full_like(p, -float("inf")),
    )
    pl = p[rows_l]
    ll_flat = float(torch.log((1.0 - eps_f) * pl + eps_f / max(c - 1, 1) * (1.0 - pl)).mean())
    gain = ll_s - ll_flat - (n_cells + c) * math.log(max(m_lab, 2)) / (2.0 * max(m_lab, 1))
    use_flat = eps_f >= cfg.flat_share * eps_s and gain < cfg.structure_gain
    if use_flat:
        yl = y_all[rows_l]
        joint = torch.zeros(c, c, dtype=torch.float64)
        joint.index_put_((yl, yl), q_f[rows_l], accumulate=True)
        joint.index_put_((yl, rows.flat_alt[rows_l].long()), 1.0 - q_f[rows_l], accumulate=True)
        q, logit, likely = q_f, logit_f, torch.where(q_f >= 0.5, y_all.int(), rows.flat_alt)
    else:
        q, logit, likely, joint = q_s, logit_s, best_s, joint_s
    cj = confident_joint(rows.top_idx, rows.top_val, rows.own_lp, y_all, c)
    return {
        "q": q,
        "logit": logit,
        "likely": torch.where(labelled, likely, torch.full_like(likely, -1)),
        "joint": joint,
        "use_flat": use_flat,
        "eps_structured": eps_s,
        "loglik_structured": ll_s,
        "loglik_flat": ll_flat,
        "structure_gain": gain,
        "structured_cells": n_cells,
        "eps_confident_joint": 1.0 - float(cj.diagonal().sum()) / max(float(cj.sum()), 1e-12),
    }


def _fill_in(selected: np.ndarray, score: np.ndarray, labels: np.ndarray, counts: np.ndarray, *, enabled: bool):
    """(filled (N,) bool, m): classes with rows but none selected get their m best-scored rows
    (m as the paper mode's fill-in)."""
    filled = np.zeros(len(labels), bool)
    per_class = np.bincount(labels[selected], minlength=len(counts))
    empty = (counts > 0) & (per_class == 0)
    if not enabled or not empty.any():
        return filled, 0
    nonzero = per_class[per_class > 0]
    m = max(int(nonzero.min()) if len(nonzero) else 0, int(counts.sum()) // len(counts) ** 2, 1)
    for j in np.flatnonzero(empty):
        rows = np.flatnonzero(labels == j)
        filled[rows[np.argsort(-score[rows], kind="stable")[:m]]] = True
    return filled, m


def _noise_products(joint: np.ndarray, *, top: int = 20) -> tuple[dict, np.ndarray, list]:
    """(sparse counts {given, true, count}, per-class noise rate (C,), top off-diagonal pairs)."""
    c = len(joint)
    n_given = joint.sum(1)
    rate = np.where(n_given > 0, 1.0 - np.diag(joint) / np.maximum(n_given, 1e-12), np.nan)
    gi, ti = np.nonzero(((joint >= 0.5) | np.eye(c, dtype=bool)) & (joint > 0))
    sparse = {"given": gi.astype(np.int32), "true": ti.astype(np.int32), "count": joint[gi, ti].astype(np.float32)}
    off = joint.copy()
    np.fill_diagonal(off, 0.0)
    pairs = [
        {
            "given": int(i // c),
            "true": int(i % c),
            "count": round(float(off.flat[i]), 2),
            "share": round(float(off.flat[i] / max(n_given[i // c], 1e-12)), 4),
        }
        for i in np.argsort(-off, axis=None)[:top]
        if off.flat[i] >= 1.0
    ]
    return sparse, rate, pairs


def robust_select(
    inputs, *, config: RobustConfig | None = None, seed: int = 0, show_progress: bool | None = None
) -> RobustResult:
    """The robust selection on validated inputs (`engine.classifiers.ClassifierInputs`: float16
    features on the device, labels (N,) int64 with -1 = unlabelled, text features and mask on the
    device). Never reads true labels. Memory: the features, about 170 bytes per row (K = 16), C x C
    float64 twice; nothing N x C."""
    cfg = config or RobustConfig()
    if inputs.text is None:
        raise EngineError(
            "mode robust: needs text features (the zero-shot witness); run "
            "`engine prompts --cache ... --classes ...` first"
        )
    started, timings = time.perf_counter(), {}
    dev, feats, (text, mask) = inputs.device, inputs.features, inputs.text
    y_all = torch.from_numpy(np.asarray(inputs.labels, dtype=np.int64))
    c = text.shape[0]
    block = cfg.block_rows or int(min(65536, max(256, (1 << 24) // max(1, c * text.shape[1]))))
    t0 = time.perf_counter()
    stats = class_stats(feats, y_all, c, block_rows=block, device=dev)
    w = _calibrate(feats, y_all, text, mask, stats, cfg, seed=seed, dev=dev)
    timings["fit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = _score_pass(feats, y_all, text, mask, w, cfg, block=block, dev=dev, show_progress=show_progress)
    timings["score_pass"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    counts = w.gda.counts.cpu()
    model = _noise_models(rows, y_all, w, cfg, counts)
    timings["noise_models"] = time.perf_counter() - t0
    labelled, y_np = (y_all >= 0).numpy(), y_all.numpy()
    q = model["q"].numpy()
    score = np.where(labelled, np.clip(model["logit"].float().numpy(), -1e4, 1e4), -np.inf).astype(np.float32)
    selected = labelled & (q >= cfg.threshold)
    filled, fill_m = _fill_in(selected, score, y_np, counts.numpy(), enabled=cfg.fill_empty)
    selected |= filled
    noise, rate, pairs = _noise_products(model["joint"].numpy())
    decisions = _decisions(model, w, cfg, selected, filled, fill_m, rows, y_all, seed=seed, dev=dev)
    decisions["timings"] = {k: round(v, 3) for k, v in {**timings, "total": time.perf_counter() - started}.items()}
    return RobustResult(
        selected=selected,
        filled=filled,
        score=score,
        clean_prob=q.astype(np.float32),
        likely_true=model["likely"].numpy().astype(np.int32),
        pred_gda=rows.pred_g.numpy(),
        pred_zeroshot=rows.pred_z.numpy(),
        noise=noise,
        noise_rate=rate,
        top_pairs=pairs,
        decisions=decisions,
    )


def _decisions(model, w: _Witnesses, cfg: RobustConfig, selected, filled, fill_m, rows, y_all, *, seed, dev) -> dict:
    """Which evidence was trusted and why, every fitted parameter (JSON-ready)."""
    eps_f, eps_s = w.eps_flat, model["eps_structured"]
    on = torch.from_numpy(selected) & (y_all >= 0)
    agree = lambda pred: float((pred[on] == y_all[on].int()).float().mean()) if on.any() else 0.0  # noqa: E731
    joint = model["joint"].numpy()
    return {
        "noise_model": "flat" if model["use_flat"] else "structured",
        "why": (
            f"flat noise (1 parameter) finds eps={eps_f:.3f}, {eps_f / max(eps_s, 1e-12):.0%} of the structured "
            f"model's eps={eps_s:.3f} (flat needs >= {cfg.flat_share:.0%}); the structured T explains the labels "
            f"{model['structure_gain']:+.3f} nats/row better than flat beyond its BIC penalty (structured "
            f"forced above {cfg.structure_gain})"
        ),
        "eps_flat": eps_f,
        "eps_structured": eps_s,
        "loglik_flat": model["loglik_flat"],
        "loglik_structured": model["loglik_structured"],
        "structure_gain": model["structure_gain"],
        "eps_confident_joint": model["eps_confident_joint"],
        "beta_flat": w.beta_flat,
        "flat_loglik_sample": w.loglik_flat_sample,
        "beta_structured": cfg.beta_structured,
        "zeroshot_weight_a": w.a,
        "zeroshot_temperature": cfg.tau / w.a,
        "structured_cells": model["structured_cells"],
        "shrinkage": w.gda.shrinkage,
        "shrinkage_agreement": {str(k): round(v, 4) for k, v in w.shrinkage_scores.items()},
        "calib_rows": w.calib_rows,
        "witness_agreement_on_selected": {"gda": agree(rows.pred_g), "zeroshot": agree(rows.pred_z)},
        "estimated_noise_rate": float(1.0 - np.diag(joint).sum() / max(int((y_all >= 0).sum()), 1)),
        "selected": int(selected.sum()),
        "filled": int(filled.sum()),
        "fill_m": fill_m,
        "config": cfg.to_dict(),
        "seed": seed,
        "device": str(dev),
    }
