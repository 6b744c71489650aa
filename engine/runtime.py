"""Device, precision, threads, seeding, progress and timing: resolved once at the entry point."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import torch

_logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")
THREADS_ENV = "ENGINE_THREADS"


class EngineError(Exception):
    """Bad input or an impossible request: reported to the user as one line."""


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is CUDA when present, else CPU; asking for CUDA without one is an error."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise EngineError(f"device: got {name!r}, expected one of {', '.join(DEVICES)} (or cuda:N)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EngineError(f"device: got {name!r} but no CUDA device is available here; use --device cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 instructions (AVX512-BF16 or AMX-BF16; Linux flags)."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on GPUs that support it, fp16 on older GPUs; on CPU bf16 where the CPU has
    native bf16 instructions, else fp32.

    Measured on a 2-core AVX512-BF16 CPU (benchmarks/bench_embed.py): bf16 autocast ran the
    shapes-tiny image tower 1.2-1.7x faster than fp32 at batches of 16-256, features differing
    by at most 0.003; without native bf16 it is emulated and slower, so fp32 is kept there.
    """
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if name not in PRECISIONS:
        raise EngineError(f"precision: got {name!r}, expected one of auto, {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[name]
    if device.type == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise EngineError("precision: bf16 asked for but this GPU does not support it; use fp16")
    if device.type == "cpu" and dtype is torch.float16:
        raise EngineError("precision: fp16 autocast is not supported on CPU; use bf16 or fp32")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed-precision context for `dtype`, or a null context for fp32."""
    if dtype is torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, as on Linux)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def engine_version() -> str:
    """The installed package's version; "0+unknown" when running from a checkout not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("engine")
    except PackageNotFoundError:
        return "0+unknown"


def default_threads() -> int:
    """Threads for torch's intra-op pool: `ENGINE_THREADS`, else the cores this process may use."""
    env = os.environ.get(THREADS_ENV)
    if env:
        try:
            value = int(env)
        except ValueError:
            raise EngineError(f"{THREADS_ENV}: got {env!r}, expected a positive integer") from None
        if value < 1:
            raise EngineError(f"{THREADS_ENV}: got {value}, expected a positive integer")
        return value
    return available_cores()


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads once (None = `default_threads()`); returns the number set."""
    threads = default_threads() if threads is None else threads
    if threads < 1:
        raise EngineError(f"threads: got {threads}, expected a positive integer")
    torch.set_num_threads(threads)
    return threads


def worker_init_single_thread(_worker_id: int) -> None:
    """DataLoader worker init: one intra-op thread per worker, so workers don't oversubscribe."""
    torch.set_num_threads(1)


def distributed_context() -> tuple[int, int]:
    """(rank, world size) from the torch.distributed launcher's environment (torchrun, SLURM via
    torchrun); (0, 1) for a plain process."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise EngineError("RANK/WORLD_SIZE: expected integers from the launcher") from None
    if world < 1 or not 0 <= rank < world:
        raise EngineError(f"RANK/WORLD_SIZE: got rank {rank} of {world}")
    return rank, world


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A local, seeded generator (never the global RNG)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def progress(iterable=None, *, total=None, desc: str = "", unit: str = "it", disable: bool | None = None):
    """A tqdm progress bar on stderr, hidden when stderr is not a terminal unless forced on."""
    from tqdm.auto import tqdm

    if disable is None:
        disable = not sys.stderr.isatty() and os.environ.get("ENGINE_PROGRESS") != "1"
    return tqdm(
        iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=disable, dynamic_ncols=True, smoothing=0.1
    )


@dataclass
class Timer:
    """Accumulates wall seconds per named stage: `with timer("model"): ...`."""

    seconds: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def rounded(self, digits: int = 3) -> dict:
        return {k: round(v, digits) for k, v in self.seconds.items()}
