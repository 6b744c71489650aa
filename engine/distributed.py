"""torch.distributed, as far as the engine needs it: who leads, one broadcast from the leader,
one gather at the end. Launched by torchrun (and so SLURM or Kubernetes launchers); a plain
process is a group of one and needs no torch.distributed at all.

Objects travel over a gloo group (CPU), whatever backend the caller's own group uses, so the
same code runs on CPU-only machines and GPU nodes.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from engine.runtime import EngineError

_logger = logging.getLogger(__name__)

# A rank waits for the others only at the end of its work; a rank with more images than the
# rest can keep them waiting for hours on a big dataset. ENGINE_DIST_TIMEOUT_S overrides it.
DEFAULT_TIMEOUT_S = 12 * 3600
_STOP_KEY = "engine/stop"


@dataclass
class ProcessGroup:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: Any = None  # a torch.distributed gloo group when world_size > 1
    store: Any = None  # the rendezvous key-value store (for the stop flag)
    check_every_s: float = 0.5
    _last_check: float = float("-inf")

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def _run(self, fn: Callable[[], Any], *, prefix: str = "") -> tuple[Any, str | None]:
        """(result, None), or (None, a one-line error) when `fn` raises; in a group of one a
        non-EngineError is re-raised (a bug keeps its traceback)."""
        try:
            return fn(), None
        except EngineError as err:
            return None, f"{prefix}{err}"
        except Exception as err:
            if self.world_size == 1:
                raise
            _logger.exception("rank %d failed", self.rank)
            return None, f"rank {self.rank}: {type(err).__name__}: {err}"

    def from_leader(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on rank 0 and hand its result (or its error, raised on every rank) to all ranks."""
        result, error = self._run(fn) if self.is_leader else (None, None)
        if self.world_size > 1:
            import torch.distributed as dist

            box = [(result, error)]
            dist.broadcast_object_list(box, src=0, group=self.group)
            result, error = box[0]
        if error is not None:
            raise EngineError(error)
        return result

    def on_every_rank(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on every rank; when it fails on any rank, every rank raises that rank's error
        (so one rank's bad input or missing file never leaves the others waiting)."""
        if self.world_size == 1:
            return fn()
        result, error = self._run(fn, prefix=f"rank {self.rank}: ")
        errors = [e for e in self.gather(error) if e is not None]
        if errors:
            raise EngineError(errors[0] if len(errors) == 1 else f"{errors[0]} (and {len(errors) - 1} more rank(s))")
        return result

    def request_stop(self, scope: str, reason: str) -> None:
        """Ask every rank to stop at its next batch (a `--strict` stop): one key in the
        rendezvous store, so no rank waits on another to hear it. `scope`: the run id (a
        restarted job gets a new one, so an old stop is not heard again)."""
        if self.store is not None:
            try:
                self.store.set(f"{_STOP_KEY}/{scope}", reason)
            except Exception as err:  # the job still stops at the gather
                _logger.warning("could not signal the other ranks to stop: %s", err)

    def stop_requested(self, scope: str) -> str | None:
        """The reason another rank asked to stop, or None; asks the store at most every
        `check_every_s` seconds."""
        if self.store is None:
            return None
        now = time.monotonic()
        if now - self._last_check < self.check_every_s:
            return None
        self._last_check = now
        try:
            if self.store.check([f"{_STOP_KEY}/{scope}"]):
                return self.store.get(f"{_STOP_KEY}/{scope}").decode()
        except Exception:
            return None
        return None

    def gather(self, value: Any) -> list:
        """Every rank's `value`, in rank order, on every rank."""
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        out: list = [None] * self.world_size
        dist.all_gather_object(out, value, group=self.group)
        return out


@contextlib.contextmanager
def process_group(rank: int, world_size: int) -> Iterator[ProcessGroup]:
    """A ProcessGroup for (rank, world_size); joins torch.distributed (env:// rendezvous, as set
    by torchrun) when world_size > 1 and the caller has not, and leaves it again at the end."""
    if world_size == 1:
        yield ProcessGroup()
        return
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    try:
        timeout = datetime.timedelta(seconds=float(os.environ.get("ENGINE_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)))
    except ValueError:
        raise EngineError(
            f"ENGINE_DIST_TIMEOUT_S: got {os.environ['ENGINE_DIST_TIMEOUT_S']!r}, expected seconds"
        ) from None
    owned = not dist.is_initialized()
    if owned:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise EngineError(
                    f"{name}: not set; launch with torchrun (RANK={rank}, WORLD_SIZE={world_size} "
                    "are set but the rendezvous address is not)"
                )
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout)
    elif dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise EngineError(
            f"torch.distributed: initialised as rank {dist.get_rank()} of {dist.get_world_size()}, "
            f"but asked to run as rank {rank} of {world_size}"
        )
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    _logger.info("rank %d of %d (local rank %d)", rank, world_size, local_rank)
    try:
        yield ProcessGroup(
            rank=rank, world_size=world_size, local_rank=local_rank, group=group, store=_rendezvous_store()
        )
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()
        elif group is not None and dist.is_initialized():
            dist.destroy_process_group(group)


def _rendezvous_store():
    """The key-value store of the default group's rendezvous (torchrun's TCPStore); None where
    torch does not expose it (then a --strict stop on one rank reaches the others at the gather)."""
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception:
        return None
