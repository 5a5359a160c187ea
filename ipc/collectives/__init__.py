"""Worker collectives: the all-to-all, all-gather and ring exchanges that workers run in lockstep.

One interface (`Collective`), backends behind a tiny registry (`create_collective`):

* ``"zmq"`` (default): a ZeroMQ mesh, ipc:// on one host or tcp:// across hosts
  (`titanserve.ipc.collectives.zmq_mesh`).
* ``"torch"``: torch.distributed, gloo on CPU and NCCL on CUDA
  (`titanserve.ipc.collectives.torch_dist`).

NOTE: every rank calls the same collectives in the same order. A worker with nothing to send
still joins, with empty (0-row) tensors. A peer that stops answering makes the call raise
`titanserve.ipc.errors.WorkerLost` after the backend's timeout instead of hanging.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch

from titanserve.ipc.errors import WorkerLost

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["BACKENDS", "Collective", "PendingAllToAll", "WorkerLost", "create_collective"]


class PendingAllToAll:
    """An `all_to_all_cat` started by `Collective.all_to_all_cat_start`: `wait()` returns its
    result, (what every rank sent here concatenated in rank order, rows from each)."""

    def __init__(self, result=None, finish=None) -> None:
        self._result, self._finish = result, finish  # the result, or what receives it

    def wait(self) -> tuple[torch.Tensor, list[int]]:
        if self._finish is not None:  # cleared once it has received (not if it raised)
            self._result = self._finish()
            self._finish = None
        return self._result


class Collective(ABC):
    """Blocking collectives among `world_size` worker processes; this one is `rank`."""

    rank: int
    world_size: int
    # Seconds spent blocked until peers' messages arrived, summed over every call so far: in
    # a lockstep step, the time this rank waited for slower ranks. 0 where a backend cannot
    # tell waiting from transferring (torch.distributed).
    peer_wait_s: float = 0.0

    @abstractmethod
    def all_to_all_v(self, send: list[torch.Tensor]) -> list[torch.Tensor]:
        """Send `send[i]` to rank i; return `recv` where `recv[j]` is what rank j sent here.

        Tensors may have any number of rows (0 included); dtype and trailing dims must be the
        same everywhere. `recv[self.rank]` is `send[self.rank]` itself.
        """

    def all_to_all_cat(self, send: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """`all_to_all_v` with what arrives concatenated in rank order (one new tensor), and
        the number of rows from each rank: what MoE dispatch and combine want."""
        recv = self.all_to_all_v(send)
        return torch.cat(recv), [t.shape[0] for t in recv]

    def all_to_all_cat_start(self, send: list[torch.Tensor]) -> PendingAllToAll:
        """`all_to_all_cat` in two halves: this sends, `.wait()` on the result receives. In
        between the caller may compute (what MoE layers overlap with the exchange) and start
        one more (two micro-batches, see `core.model.stages`), but may call no other
        collective; waits go in the order of the starts. Backends that cannot split an op
        run it whole here."""
        return PendingAllToAll(result=self.all_to_all_cat(send))

    @abstractmethod
    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Return every rank's `tensor`, by rank; first dims may differ between ranks."""

    @abstractmethod
    def ring_send_recv(self, tensor: torch.Tensor) -> torch.Tensor:
        """Send `tensor` to rank (rank+1) % W and return what rank (rank-1) % W sent."""

    @abstractmethod
    def barrier(self) -> None:
        """Return once every rank has entered the barrier."""

    @abstractmethod
    def close(self) -> None:
        """Release sockets and process groups; safe to call twice."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# name -> "module:class"; imported on first use so that one backend's imports never load the other
BACKENDS: dict[str, str] = {
    "zmq": "titanserve.ipc.collectives.zmq_mesh:ZmqMeshCollective",
    "torch": "titanserve.ipc.collectives.torch_dist:TorchDistCollective",
}


def create_collective(
    backend: str, rank: int, world_size: int, **options: Any
) -> Collective:
    """Build the `backend` collective for `rank` of `world_size`; options go to its constructor."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown collective backend {backend!r}; use one of {sorted(BACKENDS)}")
    module_name, class_name = BACKENDS[backend].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(rank, world_size, **options)
