"""FAISS over image features (exact up to 50,000 rows, else IVF with a calibrated nprobe; HNSW),
all-vs-all kNN in row blocks, class similarity (prompts, image centroids), kNN label diagnostics
and the kNN graph cleanlab's Datalab takes. Neighbor arrays are `similarities (N, k) float32`
sorted descending and `ids (N, k) int64` (-1 where fewer were found). The kNN classifier is in
`engine.classifiers.knn`. See docs/architecture.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from engine.runtime import EngineError, Timer, progress, resolve_device

_logger = logging.getLogger(__name__)

KINDS = ("auto", "flat", "ivf", "hnsw")
STORAGES = {"fp16": "SQfp16", "fp32": "Flat", "sq8": "SQ8"}  # IVF/HNSW codes, faiss factory names
FLAT_MAX_ROWS = 50_000  # auto: exact search up to here (CIFAR-sized sets stay exact)
IVF_LISTS_PER_SQRT_N = 2  # auto: nlist = 2 * sqrt(N), rounded to a power of two
TRAIN_POINTS_PER_LIST = 40  # k-means sample: faiss asks for at least 39 points per centroid
DEFAULT_BLOCK_ROWS = 65_536
CALIBRATION_K = 10  # recall@10 is what nprobe / efSearch is calibrated for
META_SUFFIX = ".json"
META_FORMAT = "engine-index"


@dataclass(frozen=True)
class IndexConfig:
    """How to build an index. None means "choose from N" (see `choose_index`).

    kind: auto | flat | ivf | hnsw. storage: how IVF/HNSW store vectors: fp16 (default: lossless
    for the float16 cache, half of fp32's memory), fp32, sq8 (8-bit, a quarter; recall ceiling
    ~0.98). nprobe (IVF) / ef_search (HNSW): fixed values, or None to calibrate on
    `calibration_queries` seeded rows until recall@10 >= `target_recall`.
    """

    kind: str = "auto"
    storage: str = "fp16"
    nlist: int | None = None
    nprobe: int | None = None
    hnsw_m: int = 32
    ef_search: int | None = None
    target_recall: float = 0.9
    calibration_queries: int = 1000
    seed: int = 0
    block_rows: int = DEFAULT_BLOCK_ROWS

    def __post_init__(self):
        if self.kind not in KINDS:
            raise EngineError(f"kind: got {self.kind!r}, expected one of {', '.join(KINDS)}")
        if self.storage not in STORAGES:
            raise EngineError(f"storage: got {self.storage!r}, expected one of {', '.join(STORAGES)}")
        for name in ("nlist", "nprobe", "ef_search"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
                raise EngineError(f"{name}: got {value!r}, expected a positive integer or None")
        for name in ("hnsw_m", "calibration_queries", "block_rows"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise EngineError(f"{name}: got {value!r}, expected a positive integer")
        if not 0.0 < self.target_recall <= 1.0:
            raise EngineError(f"target_recall: got {self.target_recall!r}, expected a number in (0, 1]")


@dataclass(frozen=True)
class IndexInfo:
    """What an index was built from and with: enough to rebuild it or tell that it is stale.

    kind: flat | ivf | hnsw (resolved); params: factory string, nlist, nprobe, ef_search,
    storage, measured recall@10, seconds; fingerprint: `row_fingerprint` of the rows.
    """

    kind: str
    params: dict
    rows: int
    dim: int
    fingerprint: str
    format: str = META_FORMAT

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> IndexInfo:
        if data.get("format") != META_FORMAT:
            raise EngineError(f"index metadata: got format {data.get('format')!r}, expected {META_FORMAT!r}")
        return cls(
            kind=data["kind"],
            params=dict(data["params"]),
            rows=int(data["rows"]),
            dim=int(data["dim"]),
            fingerprint=data["fingerprint"],
        )


@dataclass
class FeatureIndex:
    """A faiss index (CPU or GPU) with its `IndexInfo`. `gpu_resources` keeps GPU memory alive."""

    index: object
    info: IndexInfo
    device: str = "cpu"
    gpu_resources: object = field(default=None, repr=False)


# ---------------------------------------------------------------------------------------------
# validation and small helpers


def _faiss():
    import faiss

    return faiss


def _check_features(features, name: str = "features") -> tuple[int, int]:
    shape = getattr(features, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise EngineError(f"{name}: got shape {shape}, expected a non-empty (N, D) array")
    dtype = np.dtype(features.dtype)
    if dtype not in (np.float16, np.float32):
        raise EngineError(f"{name}: got dtype {dtype}, expected float16 or float32")
    head = np.asarray(features[: min(shape[0], 256)], dtype=np.float32)
    norms = np.linalg.norm(head, axis=1)
    if not np.all(np.isfinite(norms)) or np.abs(norms - 1.0).max() > 1e-2:
        raise EngineError(
            f"{name}: got rows with L2 norms in [{norms.min():.3g}, {norms.max():.3g}], "
            "expected unit-norm (L2-normalised) rows"
        )
    return int(shape[0]), int(shape[1])


def check_positive(value, name: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise EngineError(f"{name}: got {value!r}, expected a positive integer")
    return int(value)


def check_labels(labels, n: int | None, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or (n is not None and labels.shape[0] != n):
        raise EngineError(f"labels: got shape {labels.shape}, expected ({n if n is not None else 'N'},)")
    if labels.dtype.kind not in "iu":
        raise EngineError(f"labels: got dtype {labels.dtype}, expected integers (-1 = unlabelled)")
    if labels.size and (labels.min() < -1 or labels.max() >= num_classes):
        raise EngineError(
            f"labels: got values in [{labels.min()}, {labels.max()}], expected -1 (unlabelled) or 0..{num_classes - 1}"
        )
    return labels.astype(np.int64, copy=False)


def check_neighbors(similarities, ids) -> tuple[np.ndarray, np.ndarray]:
    similarities = np.asarray(similarities, dtype=np.float32)
    ids = np.asarray(ids)
    if ids.ndim != 2 or similarities.shape != ids.shape:
        raise EngineError(
            f"similarities/ids: got shapes {similarities.shape} and {ids.shape}, expected the same (N, k)"
        )
    if ids.dtype.kind not in "iu":
        raise EngineError(f"ids: got dtype {ids.dtype}, expected integers")
    return similarities, ids.astype(np.int64, copy=False)


def check_ids(ids, n: int) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise EngineError(f"ids: got shape {ids.shape} dtype {ids.dtype}, expected (N, k) integers")
    if ids.size and (ids.min() < -1 or ids.max() >= n):
        raise EngineError(f"ids: got values in [{ids.min()}, {ids.max()}], expected -1 (missing) or 0..{n - 1}")
    return ids.astype(np.int64, copy=False)


def _blocks(n: int, block_rows: int):
    for start in range(0, n, block_rows):
        yield start, min(n, start + block_rows)


def _rows32(features, start: int, stop: int) -> np.ndarray:
    return np.ascontiguousarray(features[start:stop], dtype=np.float32)


def _gather_rows(features, rows: np.ndarray, block_rows: int) -> np.ndarray:
    """float32 copies of sorted `rows`, read block by block (works for Zarr arrays too)."""
    out = np.empty((rows.size, features.shape[1]), dtype=np.float32)
    for start, stop in _blocks(features.shape[0], block_rows):
        lo, hi = np.searchsorted(rows, [start, stop])
        if hi > lo:
            out[lo:hi] = np.asarray(features[start:stop], dtype=np.float32)[rows[lo:hi] - start]
    return out


def _take_rows(features, rows: np.ndarray) -> np.ndarray:
    """A few rows by index: fancy indexing for numpy, one `features_at` read for a Cache, one read
    per row otherwise (Zarr)."""
    from engine.cache import Cache

    if isinstance(features, Cache):
        return np.asarray(features.features_at(rows), dtype=np.float32)
    if isinstance(features, np.ndarray):
        return np.asarray(features[rows], dtype=np.float32)
    return np.stack([np.asarray(features[int(r)], dtype=np.float32) for r in rows])


def row_fingerprint(features, *, keys=None) -> str:
    """sha256 (hex) of N, D, the keys when given and a strided sample of <= 64 rows (float16).

    `features`: (N, D) rows, or a Cache (then only the sampled rows are read). Equal fingerprints
    mean the same rows in the same order, up to the sampled rows; give the cache's `keys (N,)`
    for an exact row-identity check."""
    from engine.cache import Cache

    n, d = (features.num_rows, features.dim) if isinstance(features, Cache) else features.shape[:2]
    n, d = int(n), int(d)
    digest = hashlib.sha256(f"{n}x{d}".encode())
    if keys is not None:
        keys = np.asarray(keys)
        if keys.shape != (n,):
            raise EngineError(f"keys: got shape {keys.shape}, expected ({n},)")
        for start, stop in _blocks(n, 65_536):
            digest.update("\n".join(map(str, keys[start:stop].tolist())).encode())
            digest.update(b"\n")
    sample = np.unique(np.linspace(0, n - 1, num=min(n, 64)).astype(np.int64))
    digest.update(_take_rows(features, sample).astype(np.float16).tobytes())
    return digest.hexdigest()


def index_is_stale(index: FeatureIndex | IndexInfo, features, *, keys=None) -> bool:
    """True when `features` (and `keys`) are not the rows the index was built from."""
    info = index.info if isinstance(index, FeatureIndex) else index
    return info.fingerprint != row_fingerprint(features, keys=keys)


# ---------------------------------------------------------------------------------------------
# choosing and building


def _auto_nlist(n: int) -> int:
    """2 * sqrt(N) rounded to a power of two, at most N / 40 (enough k-means points per list)."""
    nlist = 2 ** round(math.log2(IVF_LISTS_PER_SQRT_N * math.sqrt(n)))
    return int(max(1, min(nlist, 2 ** int(math.log2(max(1, n // TRAIN_POINTS_PER_LIST))))))


def choose_index(n: int, dim: int, config: IndexConfig = IndexConfig()) -> tuple[str, dict]:
    """The rule for `kind="auto"` and the defaults of the other kinds -> (kind, params).

    - auto: `flat` (exact IndexFlatIP) when N <= FLAT_MAX_ROWS (50,000), else `ivf`.
    - ivf: nlist = 2 ** round(log2(2 * sqrt(N))) (N = 1M -> 2048, 200k -> 1024), capped at
      N / 40; storage fp16 (IVF{nlist},SQfp16); nprobe = config.nprobe, or calibrated at build
      time: the smallest power of two (1, 2, 4, ... nlist / 4) whose recall@10 on
      `calibration_queries` seeded rows reaches `target_recall`, measured against exact search.
    - hnsw: HNSW{hnsw_m} with the same storage; efSearch calibrated like nprobe (16 ... 1024).

    Why (measured on a busy 2-core CPU, D = 512, benchmarks/bench_knn.py): all-vs-all search
    pays k-means training (~ nlist^2) and two coarse-quantiser passes (~ N * nlist) besides the
    list scans, so fewer lists than the usual 4 * sqrt(N) win: at N = 200k, IVF1024 took 24 s
    against IVF2048's 46 s at the same recall@10 (0.97); training 4096 lists alone took 94 s.
    fp16 codes scan ~2x faster than fp32 at equal recall and are exact for the float16 cache;
    8-bit codes were no faster and capped recall near 0.98. Exact all-vs-all at N = 65,536 took
    74 s against IVF512's 6.4 s (recall 0.999), so exact stops at 50,000 rows (~45 s).
    """
    kind = config.kind
    if kind == "auto":
        kind = "flat" if n <= FLAT_MAX_ROWS else "ivf"
    code = STORAGES[config.storage]
    params: dict = {"storage": config.storage}
    if kind == "flat":
        params = {"factory": "Flat"}
    elif kind == "ivf":
        nlist = config.nlist or _auto_nlist(n)
        if nlist > n:
            raise EngineError(f"nlist: got {nlist}, expected at most N = {n}")
        params.update(nlist=int(nlist), nprobe=config.nprobe, factory=f"IVF{nlist},{code}")
    else:
        factory = f"HNSW{config.hnsw_m}" + ("" if code == "Flat" else f"_{code}")
        params.update(hnsw_m=config.hnsw_m, ef_search=config.ef_search, factory=factory)
    return kind, params


def _resolve_faiss_device(device, kind: str) -> str:
    """'cpu' or 'cuda' for faiss. `auto` falls back to CPU where faiss has no GPU (faiss-cpu) or
    the kind has no GPU version (hnsw); an explicit cuda request then is an error."""
    explicit = not (isinstance(device, str) and device == "auto")
    dev = resolve_device(device) if isinstance(device, str) else device
    if dev.type != "cuda":
        return "cpu"
    faiss = _faiss()
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    problem = None
    if gpus < 1:
        problem = "this faiss build has no GPU support (faiss-cpu); install faiss-gpu"
    elif kind == "hnsw":
        problem = "faiss has no GPU HNSW; use kind ivf or flat"
    if problem is None:
        return "cuda"
    if explicit:
        raise EngineError(f"device: got {str(device)!r} but {problem}, or use device cpu")
    _logger.info("faiss runs on CPU: %s", problem)
    return "cpu"


def _to_gpu(index):
    faiss = _faiss()
    resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(resources, 0, index), resources


def _set_search_param(index, kind: str, value: int, where: str) -> None:
    faiss = _faiss()
    space = faiss.GpuParameterSpace() if where == "cuda" else faiss.ParameterSpace()
    space.set_index_parameter(index, _SEARCH_PARAM[kind][0], int(value))


def _nprobe_candidates(params: dict) -> list[int]:
    return [2**i for i in range(int(math.log2(max(1, params["nlist"] // 4))) + 1)]


# kind -> (faiss parameter, config/params name, candidate values for calibration, ascending cost)
_SEARCH_PARAM = {
    "ivf": ("nprobe", "nprobe", _nprobe_candidates),
    "hnsw": ("efSearch", "ef_search", lambda params: [16, 32, 64, 128, 256, 512, 1024]),
}


def _train_and_add(index, features, params: dict, config: IndexConfig, timer: Timer) -> None:
    n = features.shape[0]
    if not index.is_trained:
        with timer("train"):
            size = min(n, TRAIN_POINTS_PER_LIST * params["nlist"] if "nlist" in params else 65_536)
            rng = np.random.default_rng(config.seed)
            rows = np.sort(rng.choice(n, size=size, replace=False))
            params["train_rows"] = int(size)
            index.train(_gather_rows(features, rows, config.block_rows))
    with timer("add"):
        bar = progress(total=n, desc="index add", unit="row")
        for start, stop in _blocks(n, config.block_rows):
            index.add(_rows32(features, start, stop))
            bar.update(stop - start)
        bar.close()


def build_index(features, config: IndexConfig = IndexConfig(), *, keys=None, device="auto") -> FeatureIndex:
    """Index `features (N, D)` float16/float32 unit rows for inner-product search.

    `config` chooses the kind (see `choose_index`); `keys (N,)` go into the fingerprint;
    `device`: auto | cpu | cuda (GPU through faiss-gpu, see `_resolve_faiss_device`).
    The returned `info.params` holds the chosen parameters, the calibrated recall and seconds.
    """
    n, dim = _check_features(features)
    kind, params = choose_index(n, dim, config)
    where = _resolve_faiss_device(device, kind)
    faiss = _faiss()
    timer = Timer()
    index = faiss.index_factory(dim, params["factory"], faiss.METRIC_INNER_PRODUCT)
    resources = None
    if where == "cuda":
        index, resources = _to_gpu(index)
    _train_and_add(index, features, params, config, timer)
    if kind in _SEARCH_PARAM:
        name = _SEARCH_PARAM[kind][1]
        with timer("calibrate"):
            value, recall = _calibrate(index, features, kind, params, config, where)
        params[name] = value
        params["recall_at_10"] = recall
    params["seconds"] = timer.rounded()
    params["seed"] = config.seed
    info = IndexInfo(kind=kind, params=params, rows=n, dim=dim, fingerprint=row_fingerprint(features, keys=keys))
    _logger.info("built %s index over %d x %d on %s: %s", kind, n, dim, where, params)
    return FeatureIndex(index=index, info=info, device=where, gpu_resources=resources)


def _calibrate(index, features, kind: str, params: dict, config: IndexConfig, where: str) -> tuple[int, float | None]:
    """The fixed value from config, or the smallest candidate reaching the target recall@10."""
    _, name, candidates = _SEARCH_PARAM[kind]
    fixed = params.get(name)
    n = features.shape[0]
    m = min(config.calibration_queries, n)
    k = min(CALIBRATION_K, n - 1)
    if k < 1:
        value = fixed or candidates(params)[0]
        _set_search_param(index, kind, value, where)
        return value, None
    rng = np.random.default_rng(config.seed + 1)
    rows = np.sort(rng.choice(n, size=m, replace=False))
    queries = _gather_rows(features, rows, config.block_rows)
    exact = _drop_self(*exact_search(features, queries, k=k + 1, block_rows=config.block_rows), rows)[1]
    recall = 0.0
    for value in [fixed] if fixed else candidates(params):
        _set_search_param(index, kind, value, where)
        sims, ids = index.search(queries, k + 1)
        recall = recall_at_k(_drop_self(sims, ids, rows)[1], exact)
        _logger.info("calibration: %s=%d recall@%d=%.4f", name, value, k, recall)
        if recall >= config.target_recall:
            break
    else:
        if not fixed:
            _logger.warning(
                "calibration: %s=%d reaches recall@%d %.3f < target %.3f; pass a larger nlist/%s or use kind flat",
                name,
                value,
                k,
                recall,
                config.target_recall,
                name,
            )
    return int(value), round(float(recall), 4)


# ---------------------------------------------------------------------------------------------
# search


def _drop_self(similarities: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, k+1) results of querying `rows (B,)` -> (B, k) without the row itself, by id.

    With duplicates or ties the row may come anywhere in its list, or not at all (more than k
    exact copies): then the last entry is dropped."""
    is_self = ids == rows[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    keep = ~is_self
    b, k1 = ids.shape
    return similarities[keep].reshape(b, k1 - 1), ids[keep].reshape(b, k1 - 1)


def _clean(similarities: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    similarities = np.asarray(similarities, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64)
    similarities[ids < 0] = -np.inf
    return similarities, ids


def exact_search(
    features, queries: np.ndarray, *, k: int, block_rows: int = DEFAULT_BLOCK_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k inner products of `queries (M, D)` against `features (N, D)`, streamed
    over blocks of feature rows (BLAS via faiss.knn, merged in a result heap).

    Returns (similarities (M, k) float32 descending, ids (M, k) int64). The reference the
    approximate indexes are measured against."""
    faiss = _faiss()
    n = int(features.shape[0])
    k = check_positive(k, "k")
    if k > n:
        raise EngineError(f"k: got {k}, expected at most N = {n}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    heap = faiss.ResultHeap(queries.shape[0], k, keep_max=True)
    for start, stop in _blocks(n, block_rows):
        block = _rows32(features, start, stop)
        sims, ids = faiss.knn(queries, block, min(k, stop - start), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(sims, ids + start)
    heap.finalize()
    return _clean(heap.D, heap.I)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of `truth (M, k)` ids that appear in `found (M, k')` of the same row (-1 never counts)."""
    found = np.asarray(found)
    truth = np.asarray(truth)
    if found.ndim != 2 or truth.ndim != 2 or found.shape[0] != truth.shape[0]:
        raise EngineError(f"found/truth: got shapes {found.shape} and {truth.shape}, expected (M, k) each")
    hit = (truth[:, :, None] == found[:, None, :]).any(axis=2) & (truth >= 0)
    return float(hit.sum() / max(1, (truth >= 0).sum()))


def search_index(index: FeatureIndex, queries: np.ndarray, *, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of `queries (M, D)` (unit rows) -> (similarities (M, k) float32, ids (M, k) int64)."""
    queries = np.asarray(queries)
    if queries.ndim != 2 or queries.shape[1] != index.info.dim:
        raise EngineError(f"queries: got shape {queries.shape}, expected (M, {index.info.dim})")
    k = check_positive(k, "k")
    sims, ids = index.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return _clean(sims, ids)


def _check_index_rows(index: FeatureIndex, features) -> int:
    n, dim = int(features.shape[0]), int(features.shape[1])
    if (n, dim) != (index.info.rows, index.info.dim):
        raise EngineError(
            f"features: got shape ({n}, {dim}), expected the indexed "
            f"({index.info.rows}, {index.info.dim}); rebuild the index"
        )
    return n


def knn_all(
    index: FeatureIndex, features, *, k: int = 10, exclude_self: bool = True, block_rows: int = DEFAULT_BLOCK_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """Every row's k nearest neighbors among the indexed `features (N, D)`, in row blocks.

    With `exclude_self`, k+1 are searched and the row itself dropped by id (see `_drop_self`).
    Returns (similarities (N, k) float32 descending, ids (N, k) int64; -1 / -inf if missing)."""
    n = _check_index_rows(index, features)
    k = check_positive(k, "k")
    block_rows = check_positive(block_rows, "block_rows")
    extra = 1 if exclude_self else 0
    if k + extra > n:
        raise EngineError(f"k: got {k}, expected at most N{' - 1' if extra else ''} = {n - extra}")
    out_sims = np.empty((n, k), dtype=np.float32)
    out_ids = np.empty((n, k), dtype=np.int64)
    bar = progress(total=n, desc="knn", unit="row")
    for start, stop in _blocks(n, block_rows):
        sims, ids = search_index(index, _rows32(features, start, stop), k=k + extra)
        if exclude_self:
            sims, ids = _drop_self(sims, ids, np.arange(start, stop))
        out_sims[start:stop], out_ids[start:stop] = sims, ids
        bar.update(stop - start)
    bar.close()
    missing = int((out_ids < 0).sum())
    if missing:
        _logger.warning("knn: %d of %d neighbors missing (index returned fewer than k)", missing, n * k)
    return out_sims, out_ids


def query_neighbors(
    index: FeatureIndex, features, row: int, *, k: int = 10, exclude_self: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest neighbors of row `row` of `features (N, D)` -> (similarities (k,), ids (k,))."""
    n = _check_index_rows(index, features)
    if not isinstance(row, (int, np.integer)) or not 0 <= row < n:
        raise EngineError(f"row: got {row!r}, expected an integer in [0, {n})")
    k = check_positive(k, "k")
    extra = 1 if exclude_self else 0
    if k + extra > n:
        raise EngineError(f"k: got {k}, expected at most N{' - 1' if extra else ''} = {n - extra}")
    sims, ids = search_index(index, _rows32(features, row, row + 1), k=k + extra)
    if exclude_self:
        sims, ids = _drop_self(sims, ids, np.array([row]))
    return sims[0], ids[0]


# ---------------------------------------------------------------------------------------------
# persistence


def save_index(index: FeatureIndex, path) -> Path:
    """Write the faiss index to `path` (a GPU index is copied to CPU first) and its `IndexInfo`
    to `path` + ".json"; both atomically (temporary file, then rename). Returns `path`."""
    faiss = _faiss()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = faiss.index_gpu_to_cpu(index.index) if index.device == "cuda" else index.index
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(cpu, str(tmp))
    os.replace(tmp, path)
    meta = path.with_name(path.name + META_SUFFIX)
    tmp = meta.with_name(meta.name + ".tmp")
    tmp.write_text(json.dumps(index.info.to_dict(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, meta)
    return path


def load_index(path, *, device="cpu") -> FeatureIndex:
    """Read an index written by `save_index`; `device` as in `build_index` (default cpu)."""
    faiss = _faiss()
    path = Path(path)
    meta = path.with_name(path.name + META_SUFFIX)
    for p in (path, meta):
        if not p.is_file():
            raise EngineError(f"index path: {str(p)!r} does not exist; build the index first")
    try:
        info = IndexInfo.from_dict(json.loads(meta.read_text()))
    except (ValueError, KeyError) as exc:
        raise EngineError(f"index metadata: {str(meta)!r} is not valid ({exc})") from None
    return _place(faiss.read_index(str(path)), info, device)


def _place(index, info: IndexInfo, device) -> FeatureIndex:
    """A CPU index read back: moved to the GPU when asked and possible, search parameter restored."""
    where = _resolve_faiss_device(device, info.kind)
    resources = None
    if where == "cuda":
        index, resources = _to_gpu(index)
    if info.kind in _SEARCH_PARAM and info.params.get(_SEARCH_PARAM[info.kind][1]):
        _set_search_param(index, info.kind, info.params[_SEARCH_PARAM[info.kind][1]], where)
    return FeatureIndex(index=index, info=info, device=where, gpu_resources=resources)


# ---------------------------------------------------------------------------------------------
# class similarity


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, x / norms, np.nan).astype(np.float32)


def text_class_similarity(text_features, mask=None) -> np.ndarray:
    """C x C cosine similarity of the class text vectors: the mean of each class's valid
    prompts (`text_features (C, P, D)` or (C, D), `mask (C, P)` bool, None = all valid),
    renormalised. Returns (C, C) float32."""
    text = np.asarray(text_features, dtype=np.float32)
    if text.ndim == 2:
        text = text[:, None, :]
    if text.ndim != 3 or 0 in text.shape:
        raise EngineError(f"text_features: got shape {text.shape}, expected (C, P, D) or (C, D)")
    mask = np.ones(text.shape[:2], bool) if mask is None else np.asarray(mask, dtype=bool)
    if mask.shape != text.shape[:2]:
        raise EngineError(f"mask: got shape {mask.shape}, expected {text.shape[:2]}")
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise EngineError(f"mask: classes {empty[:10].tolist()} have no valid prompt, expected at least one each")
    means = (text * mask[:, :, None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
    unit = _unit_rows(means)
    return unit @ unit.T


def class_centroids(
    features, labels, num_classes: int, *, block_rows: int = DEFAULT_BLOCK_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class sums of `features (N, D)` over rows with `labels (N,)` = c (-1 ignored), streamed
    in row blocks, renormalised -> (centroids (C, D) float32 unit rows, NaN for classes without
    samples; counts (C,) int64)."""
    n, dim = _check_features(features)
    num_classes = check_positive(num_classes, "num_classes")
    labels = check_labels(labels, n, num_classes)
    import scipy.sparse as sp

    sums = np.zeros((num_classes, dim), dtype=np.float64)
    for start, stop in _blocks(n, check_positive(block_rows, "block_rows")):
        lab = labels[start:stop]
        cols = np.flatnonzero(lab >= 0)
        onehot = sp.csr_matrix((np.ones(cols.size, np.float32), (lab[cols], cols)), shape=(num_classes, stop - start))
        sums += onehot @ _rows32(features, start, stop)  # float32 per block, float64 across blocks
    counts = np.bincount(labels[labels >= 0], minlength=num_classes).astype(np.int64)
    return _unit_rows(sums), counts


def image_class_similarity(features, labels, num_classes: int, *, block_rows: int = DEFAULT_BLOCK_ROWS) -> np.ndarray:
    """C x C cosine similarity of the image-feature class centroids (see `class_centroids`).
    Rows and columns of classes without labelled samples are NaN. Returns (C, C) float32."""
    centroids, counts = class_centroids(features, labels, num_classes, block_rows=block_rows)
    if (counts == 0).any():
        _logger.warning(
            "class similarity: %d of %d classes have no labelled sample (NaN rows)",
            int((counts == 0).sum()),
            num_classes,
        )
    return centroids @ centroids.T


def top_confusable_pairs(similarity, *, top: int = 20) -> list[tuple[int, int, float]]:
    """The `top` most similar class pairs of a symmetric `similarity (C, C)` -> [(a, b, sim)]
    with a < b, most similar first (ties by a, then b); the diagonal and NaN are ignored.
    Streams over row blocks (~4M entries each), so C may be large."""
    sim = np.asarray(similarity)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise EngineError(f"similarity: got shape {sim.shape}, expected (C, C)")
    top = check_positive(top, "top")
    c = sim.shape[0]
    found_a, found_b, found_v = [], [], []
    for start, stop in _blocks(c, max(1, 2**22 // max(1, c))):
        block = sim[start:stop].astype(np.float64)
        block[np.arange(c)[None, :] <= np.arange(start, stop)[:, None]] = np.nan  # keep a < b
        flat = np.flatnonzero(~np.isnan(block))
        values = block.ravel()[flat]
        if values.size > top:  # keep every value tied with the top-th, so ties stay deterministic
            keep = values >= np.partition(values, values.size - top)[values.size - top]
            flat, values = flat[keep], values[keep]
        found_a.append(flat // c + start)
        found_b.append(flat % c)
        found_v.append(values)
    a, b, values = (np.concatenate(v) for v in (found_a, found_b, found_v))
    order = np.lexsort((b, a, -values))[:top]
    return [(int(a[i]), int(b[i]), float(values[i])) for i in order]


# ---------------------------------------------------------------------------------------------
# kNN label agreement and "which classes swap"


def neighbor_labels(ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """labels of the neighbors, -1 where the neighbor is missing or unlabelled. (N, k) int64."""
    return np.where(ids >= 0, labels[np.clip(ids, 0, None)], -1)


def neighbor_agreement(ids, labels) -> np.ndarray:
    """For each row, the share of its labelled neighbors (`ids (N, k)`, itself excluded) that
    carry its label. NaN for unlabelled rows and rows with no labelled neighbor. (N,) float32."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise EngineError(f"labels: got shape {labels.shape} dtype {labels.dtype}, expected (N,) integers")
    ids = check_ids(ids, labels.shape[0])
    if ids.shape[0] != labels.shape[0]:
        raise EngineError(f"ids: got {ids.shape[0]} rows, expected one per label ({labels.shape[0]})")
    labels = labels.astype(np.int64, copy=False)
    neighbor = neighbor_labels(ids, labels)
    valid = neighbor >= 0
    same = (neighbor == labels[:, None]) & valid
    total = valid.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = same.sum(axis=1) / total
    share[(labels < 0) | (total == 0)] = np.nan
    return share.astype(np.float32)


def class_agreement(agreement, labels, num_classes: int) -> np.ndarray:
    """Mean of `agreement (N,)` per given label over labelled rows with a value. (C,) float32,
    NaN for classes with no such row."""
    labels = check_labels(labels, np.shape(agreement)[0], check_positive(num_classes, "num_classes"))
    agreement = np.asarray(agreement, dtype=np.float64)
    ok = (labels >= 0) & ~np.isnan(agreement)
    sums = np.bincount(labels[ok], weights=agreement[ok], minlength=num_classes)
    counts = np.bincount(labels[ok], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums / counts).astype(np.float32)


def neighbor_majority(ids, labels, num_classes: int, *, block_rows: int = DEFAULT_BLOCK_ROWS) -> np.ndarray:
    """The most frequent label among each row's labelled neighbors (ties: the smaller class
    id), -1 when none is labelled. In row blocks (a (B, k, k) comparison each). (N,) int64."""
    labels = check_labels(labels, None, check_positive(num_classes, "num_classes"))
    ids = check_ids(ids, labels.shape[0])
    majority = np.empty(ids.shape[0], dtype=np.int64)
    for start, stop in _blocks(ids.shape[0], check_positive(block_rows, "block_rows")):
        neighbor = np.sort(neighbor_labels(ids[start:stop], labels), axis=1)  # -1 first, then ascending
        valid = neighbor >= 0
        counts = ((neighbor[:, :, None] == neighbor[:, None, :]) & valid[:, None, :]).sum(axis=2)
        counts[~valid] = -1
        best = np.argmax(counts, axis=1)  # first maximum = smallest label among ties
        block = neighbor[np.arange(stop - start), best]
        block[~valid.any(axis=1)] = -1
        majority[start:stop] = block
    return majority


def label_confusion(labels, majority, num_classes: int) -> np.ndarray:
    """Counts (C, C) int64: row = given label, column = neighbor-majority label, over rows where
    both are known. Dense: C^2 * 8 bytes (8 MB at C = 1000)."""
    num_classes = check_positive(num_classes, "num_classes")
    labels = check_labels(labels, None, num_classes)
    majority = check_labels(majority, labels.shape[0], num_classes)
    ok = (labels >= 0) & (majority >= 0)
    codes = labels[ok] * num_classes + majority[ok]
    return np.bincount(codes, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def top_label_swaps(labels, majority, *, top: int = 20) -> list[tuple[int, int, int]]:
    """The largest off-diagonal entries of the label -> neighbor-majority confusion, without
    building it: [(given label, neighbors' label, count)], largest first (ties by labels)."""
    labels = np.asarray(labels, dtype=np.int64)
    majority = np.asarray(majority, dtype=np.int64)
    if labels.ndim != 1 or majority.shape != labels.shape:
        raise EngineError(f"labels/majority: got shapes {labels.shape} and {majority.shape}, expected (N,) each")
    top = check_positive(top, "top")
    ok = (labels >= 0) & (majority >= 0) & (labels != majority)
    pairs, counts = np.unique(np.stack([labels[ok], majority[ok]], axis=1), axis=0, return_counts=True)
    if pairs.size == 0:
        return []
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -counts))[:top]
    return [(int(pairs[i, 0]), int(pairs[i, 1]), int(counts[i])) for i in order]


@dataclass(frozen=True)
class KnnDiagnostics:
    """agreement (N,) float32, class_agreement (C,) float32, mean_agreement over labelled rows,
    swaps [(given, neighbors' label, count)] largest first, majority (N,) int64."""

    agreement: np.ndarray
    class_agreement: np.ndarray
    mean_agreement: float
    majority: np.ndarray
    swaps: list


def knn_diagnostics(ids, labels, num_classes: int, *, top: int = 20) -> KnnDiagnostics:
    """Agreement, per-class agreement and the top label swaps from `ids (N, k)` (self excluded)."""
    labels = check_labels(labels, np.shape(ids)[0], check_positive(num_classes, "num_classes"))
    agreement = neighbor_agreement(ids, labels)
    majority = neighbor_majority(ids, labels, num_classes)
    mean = float(np.nanmean(agreement)) if (~np.isnan(agreement)).any() else float("nan")
    return KnnDiagnostics(
        agreement=agreement,
        class_agreement=class_agreement(agreement, labels, num_classes),
        mean_agreement=mean,
        majority=majority,
        swaps=top_label_swaps(labels, majority, top=top),
    )


# ---------------------------------------------------------------------------------------------
# the kNN graph (cleanlab's Datalab)


def knn_graph(similarities, ids, n: int | None = None):
    """The kNN graph as cleanlab's Datalab takes it (`knn_graph=`): a scipy.sparse.csr_matrix
    (N, N) float32 of Euclidean DISTANCES between unit vectors, sqrt(max(0, 2 - 2 * sim)), each
    row holding its k neighbors (self excluded) sorted by ascending distance. Exact duplicates
    are stored as explicit zeros so every row has k entries (cleanlab counts nnz / N)."""
    import scipy.sparse as sp

    sims, ids = check_neighbors(similarities, ids)
    rows, k = ids.shape
    n = rows if n is None else check_positive(n, "n")
    if n != rows:
        raise EngineError(f"n: got {n}, expected the number of rows of ids ({rows})")
    if (ids < 0).any() or (ids >= n).any():
        raise EngineError(
            f"ids: got values in [{ids.min()}, {ids.max()}], expected every neighbor "
            f"present in [0, {n}); rebuild with a larger nprobe"
        )
    if (ids == np.arange(rows)[:, None]).any():
        raise EngineError("ids: some rows list themselves; compute them with exclude_self=True")
    dist = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * sims)).astype(np.float32)
    order = np.argsort(dist, axis=1, kind="stable")
    dist = np.take_along_axis(dist, order, axis=1)
    ids = np.take_along_axis(ids, order, axis=1)
    indptr = np.arange(0, rows * k + 1, k, dtype=np.int64)
    return sp.csr_matrix((dist.ravel(), ids.ravel(), indptr), shape=(n, n))


def save_knn_graph(graph, path) -> Path:
    """`scipy.sparse.save_npz` of a `knn_graph` (uncompressed, explicit zeros kept)."""
    import scipy.sparse as sp

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sp.save_npz(path, graph, compressed=False)
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def index_to_bytes(index: FeatureIndex) -> np.ndarray:
    """The index serialised as (nbytes,) uint8 (a GPU index is copied to CPU first), for storing
    inside the cache next to its `IndexInfo`."""
    faiss = _faiss()
    cpu = faiss.index_gpu_to_cpu(index.index) if index.device == "cuda" else index.index
    return faiss.serialize_index(cpu)


def index_from_bytes(data: np.ndarray, info: IndexInfo, *, device="cpu") -> FeatureIndex:
    """Inverse of `index_to_bytes`; moved to the GPU when `device` asks for it and faiss can."""
    cpu = _faiss().deserialize_index(np.ascontiguousarray(data, dtype=np.uint8))
    return _place(cpu, info, device)
