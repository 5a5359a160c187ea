"""torch.distributed collective: gloo for CPU tensors, NCCL for CUDA tensors.

NCCL needs a GPU of its own per rank; when ranks share one (more workers than GPUs), CUDA
tensors are staged through host memory and travel over gloo instead.

Rank 0 hosts a TCPStore at `init_method` (``tcp://host:port``); every rank joins it, waits for
the others (`connect_timeout_s`), then builds the process group with `timeout_s` as its timeout.
Small metadata (row counts, dtypes, shapes) always travels through gloo on CPU; data travels on
its own device. A heartbeat thread bumps a per-rank counter in the store, so that when an op
fails the ranks whose counter stopped are named in `WorkerLost`.
NOTE: torch.distributed keeps one default process group per process: one instance per process.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from titanserve.ipc.collectives import Collective
from titanserve.ipc.errors import WorkerLost

_DTYPES = (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2,
)
_DTYPE_CODES = {dtype: code for code, dtype in enumerate(_DTYPES)}
_MAX_NDIM = 16


class TorchDistCollective(Collective):
    """Collectives over torch.distributed (the ``"torch"`` backend)."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        *,
        init_method: str = "tcp://127.0.0.1:29500",
        timeout_s: float = 30.0,
        connect_timeout_s: float = 60.0,
        heartbeat_s: float = 0.5,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        host, sep, port = init_method.removeprefix("tcp://").rpartition(":")
        if not init_method.startswith("tcp://") or not sep or not port.isdigit():
            raise ValueError(f"init_method {init_method!r} is not tcp://host:port")
        self.rank, self.world_size = rank, world_size
        self.timeout_s = timeout_s
        self._heartbeat_s = heartbeat_s
        self._addr = (host.strip("[]"), int(port))
        self._store = dist.TCPStore(
            self._addr[0], self._addr[1], world_size, is_master=rank == 0,
            timeout=timedelta(seconds=connect_timeout_s), wait_for_workers=False,
        )
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="collective-heartbeat",
                                           daemon=True)
        self._heartbeat.start()
        try:
            self._join(connect_timeout_s)
            self._nccl = self._gpu_per_rank()
            backend = "cpu:gloo,cuda:nccl" if self._nccl else "gloo"
            dist.init_process_group(
                backend, store=dist.PrefixStore("pg", self._store), rank=rank,
                world_size=world_size, timeout=timedelta(seconds=timeout_s),
            )
        except BaseException:
            self._stop.set()
            raise
        self._open = True
        self._broken = False  # after WorkerLost, close() skips the goodbye through the store

    def _join(self, connect_timeout_s: float) -> None:
        """Wait until every rank has reached the store, so the group builds within timeout_s."""
        self._store.set(f"joined/{self.rank}", "1")
        keys = [f"joined/{r}" for r in range(self.world_size)]
        try:
            self._store.wait(keys, timedelta(seconds=connect_timeout_s))
        except dist.DistStoreError:
            missing = [r for r, key in enumerate(keys) if not self._store.check([key])]
            raise WorkerLost(
                missing[0] if missing else None,
                f"ranks {missing} did not join within {connect_timeout_s}s",
            ) from None

    def _gpu_per_rank(self) -> bool:
        """Whether every rank drives a GPU no other rank uses (what NCCL requires)."""
        if not torch.cuda.is_available():
            return False
        self._store.set(f"gpu/{self.rank}", f"{socket.gethostname()}:{torch.cuda.current_device()}")
        gpus = {self._store.get(f"gpu/{r}") for r in range(self.world_size)}
        return len(gpus) == self.world_size

    def _wire(self, tensor: torch.Tensor) -> torch.device:
        """Where `tensor` travels: its own device, or the host when NCCL cannot carry it."""
        return tensor.device if tensor.is_cpu or self._nccl else torch.device("cpu")

    def _beat(self) -> None:
        store = dist.TCPStore(self._addr[0], self._addr[1], is_master=False,
                              timeout=timedelta(seconds=self.timeout_s))
        key = f"heartbeat/{self.rank}"
        while not self._stop.is_set():
            try:
                store.add(key, 1)
            except RuntimeError:  # the store (rank 0) is gone; _lost() reports it
                return
            self._stop.wait(self._heartbeat_s)

    def _lost(self, exc: RuntimeError) -> WorkerLost:
        """Name the ranks whose heartbeat stopped (rank 0 if the store itself is gone)."""
        self._broken = True
        keys = [f"heartbeat/{r}" for r in range(self.world_size)]
        try:
            before = [self._store.add(key, 0) for key in keys]
            time.sleep(3 * self._heartbeat_s)
            after = [self._store.add(key, 0) for key in keys]
        except RuntimeError:
            return WorkerLost(0, f"the rendezvous store on rank 0 is gone ({exc})")
        lost = [r for r in range(self.world_size) if r != self.rank and after[r] == before[r]]
        if not lost:
            return WorkerLost(None, f"collective failed while every heartbeat is alive: {exc}")
        return WorkerLost(lost[0], f"ranks {lost} stopped answering ({exc})")

    def _meta(self, tensor: torch.Tensor) -> list[int]:
        return [_DTYPE_CODES[tensor.dtype], math.prod(tensor.shape[1:])]

    def _check_meta(self, op: str, src: int, got: list[int], mine: torch.Tensor) -> None:
        if got != self._meta(mine):
            raise ValueError(
                f"{op}: rank {src} sends {_DTYPES[got[0]]} rows of {got[1]} elements, rank "
                f"{self.rank} sends {mine.dtype}{list(mine.shape)}; dtype and trailing dims "
                "must match"
            )

    def all_to_all_v(self, send: list[torch.Tensor]) -> list[torch.Tensor]:
        """See `Collective.all_to_all_v`."""
        if len(send) != self.world_size:
            raise ValueError(f"all_to_all_v needs {self.world_size} tensors, got {len(send)}")
        mine = send[self.rank]
        meta_out = torch.tensor([[t.shape[0], *self._meta(t)] for t in send])  # (W, 3)
        meta_out[self.rank, 0] = 0  # our own share never leaves this process
        meta_in = torch.empty_like(meta_out)
        try:
            dist.all_to_all_single(meta_in, meta_out)
            for src, (_, *meta) in enumerate(meta_in.tolist()):
                self._check_meta("all_to_all_v", src, meta, mine)
            row_elems = math.prod(mine.shape[1:])
            in_splits = [n * row_elems for n in meta_out[:, 0].tolist()]
            out_rows = meta_in[:, 0].tolist()
            flat_in = torch.cat([t.reshape(-1) if i != self.rank else t.new_empty(0)
                                 for i, t in enumerate(send)]).to(self._wire(mine))
            flat_out = flat_in.new_empty(sum(out_rows) * row_elems)
            dist.all_to_all_single(flat_out, flat_in, [n * row_elems for n in out_rows],
                                   in_splits)
        except RuntimeError as exc:
            raise self._lost(exc) from exc
        flat_out = flat_out.to(mine.device)
        recv = [chunk.view(n, *mine.shape[1:])
                for chunk, n in zip(flat_out.split([n * row_elems for n in out_rows]), out_rows)]
        recv[self.rank] = mine
        return recv

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """See `Collective.all_gather`."""
        meta = torch.tensor([tensor.shape[0], *self._meta(tensor)])  # (3,)
        metas = [torch.empty_like(meta) for _ in range(self.world_size)]
        try:
            dist.all_gather(metas, meta)
            rows = []
            for src, (n, *rest) in enumerate(m.tolist() for m in metas):
                self._check_meta("all_gather", src, rest, tensor)
                rows.append(n)
            padded = tensor.new_zeros(max(rows), *tensor.shape[1:], device=self._wire(tensor))
            padded[: tensor.shape[0]] = tensor
            outs = [torch.empty_like(padded) for _ in range(self.world_size)]
            dist.all_gather(outs, padded)
        except RuntimeError as exc:
            raise self._lost(exc) from exc
        gathered = [out[:n].to(tensor.device) for out, n in zip(outs, rows)]
        gathered[self.rank] = tensor
        return gathered

    def ring_send_recv(self, tensor: torch.Tensor) -> torch.Tensor:
        """See `Collective.ring_send_recv`."""
        if self.world_size == 1:
            return tensor
        if tensor.dim() > _MAX_NDIM:
            raise ValueError(f"ring_send_recv supports at most {_MAX_NDIM} dims")
        nxt, prev = (self.rank + 1) % self.world_size, (self.rank - 1) % self.world_size
        meta = torch.zeros(2 + _MAX_NDIM, dtype=torch.int64)  # dtype code, ndim, dims...
        meta[:2] = torch.tensor([_DTYPE_CODES[tensor.dtype], tensor.dim()])
        meta[2 : 2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
        meta_in = torch.empty_like(meta)
        try:
            self._send_recv(meta, nxt, meta_in, prev)
            code, ndim, *dims = meta_in.tolist()
            send = tensor.contiguous().to(self._wire(tensor))
            out = torch.empty(dims[:ndim], dtype=_DTYPES[code], device=send.device)
            self._send_recv(send, nxt, out, prev)
        except RuntimeError as exc:
            raise self._lost(exc) from exc
        return out.to(tensor.device)

    @staticmethod
    def _send_recv(send: torch.Tensor, dst: int, recv: torch.Tensor, src: int) -> None:
        ops = [dist.P2POp(dist.isend, send, dst), dist.P2POp(dist.irecv, recv, src)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    def barrier(self) -> None:
        """See `Collective.barrier`."""
        try:
            dist.all_reduce(torch.zeros(1))
        except RuntimeError as exc:
            raise self._lost(exc) from exc

    def close(self) -> None:
        """Destroy the process group and stop the heartbeat; rank 0 waits for the others first."""
        if not getattr(self, "_open", False):
            return
        self._open = False
        if not self._broken:
            self._store.set(f"closed/{self.rank}", "1")
        if self.rank == 0 and not self._broken:  # NOTE: rank 0 hosts the store; keep it up
            try:
                keys = [f"closed/{r}" for r in range(self.world_size)]
                self._store.wait(keys, timedelta(seconds=self.timeout_s))
            except dist.DistStoreError:
                pass  # a peer died meanwhile; it no longer needs the store
        self._stop.set()
        self._heartbeat.join()
        dist.destroy_process_group()
