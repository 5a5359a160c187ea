"""Executor over W worker processes: plans go out, results come back over ZeroMQ.

Lifecycle: workers are spawned on construction and reaped by `shutdown()`, by interpreter
exit, or when the engine process dies (workers watch their parent). A worker that dies
fails the step with `WorkerLost` naming its rank within about a second; one whose heartbeats
stop (hung, stopped) within HEARTBEAT_TIMEOUT_S. Handshake: Hello -> LoadModel -> WorkerReady.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import zmq

from titanserve.core.config import ModelConfig
from titanserve.core.cpu_cores import (
    EngineCoreFollower,
    allowed_cores,
    num_cores,
    threads_per_worker,
    worker_core_sets,
)
from titanserve.core.cpu_malloc import with_huge_pages
from titanserve.core.engine_config import EngineConfig
from titanserve.core.errors import ConfigError, WorkerLost
from titanserve.ipc.messages import (
    MAX_CONTROL_MESSAGE_BYTES,
    ExpertLoadsReply,
    ExpertLoadsRequest,
    FromWorker,
    Heartbeat,
    Hello,
    LoadModel,
    Shutdown,
    StepPlan,
    StepResult,
    WorkerError,
    WorkerReady,
)
from titanserve.ipc.sockets import recv_ready
from titanserve.ipc.tensor_frames import decode_tensor
from titanserve.moe.expert_loads import add_loads, read_expert_loads
from titanserve.moe.placement import ExpertPlacement

if TYPE_CHECKING:  # the in-process executor's module imports the model code
    from titanserve.core.executor import WorkerOutput

POLL_MS = 100
START_TIMEOUT_S = 120.0  # spawn -> Hello: an interpreter importing torch
HEARTBEAT_TIMEOUT_S = 10.0  # silence after which a live process counts as lost


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_threads_per_worker(config: EngineConfig) -> int | None:
    """torch threads per worker where the workers run on CPU; None on GPUs."""
    if config.resolve_device(0).type != "cpu":
        return None
    return threads_per_worker(config.num_threads, config.num_workers)


def engine_core_is_spare(config: EngineConfig) -> bool:
    """Whether the engine may work between submit() and collect() without taking a core from
    a worker: always on GPUs; on CPU only if the workers' torch threads leave one free."""
    threads = _cpu_threads_per_worker(config)
    return threads is None or num_cores() - config.num_workers * threads >= 1


def worker_cores(config: EngineConfig) -> list[list[int]] | None:
    """Each CPU worker's cores (see `core.cpu_cores`), or None: not bound."""
    cores, threads = allowed_cores(), _cpu_threads_per_worker(config)
    if not config.bind_cpu_cores or cores is None or threads is None:
        return None
    return worker_core_sets(cores, config.num_workers, threads)


class MultiProcExecutor:
    def __init__(
        self,
        config: EngineConfig,
        model_path: Path,
        model_cfg: ModelConfig,
        num_blocks: int,
        max_model_len: int,
    ) -> None:
        for name in ("num_redundant_experts", "expert_rebalance_steps", "two_batch_overlap",
                     "expert_loads"):  # record_expert_loads: checked by the engine
            if getattr(config, name) and not model_cfg.num_experts:
                raise ConfigError(f"{name} needs a mixture-of-experts model")
        try:  # the placement the workers will build checks the expert counts
            ExpertPlacement.contiguous(
                model_cfg.num_experts, config.num_workers, 0, config.num_redundant_experts
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.world_size = config.num_workers
        self.overlaps = engine_core_is_spare(config)
        self.runs_ahead = True  # workers queue plans: a step may be submitted before collect
        core_sets = worker_cores(config)
        # No core of its own: the engine works on each worker's cores in turn.
        follow = core_sets is not None and not self.overlaps
        self.follower = EngineCoreFollower(core_sets) if follow else None
        worker_config = dataclasses.replace(
            config, num_kv_blocks=num_blocks, max_model_len=max_model_len
        )
        self.run_dir = tempfile.mkdtemp(prefix="titanserve-")
        os.mkdir(os.path.join(self.run_dir, "mesh"))
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_MESSAGE_BYTES)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(f"ipc://{self.run_dir}/engine")
        self.decoder = msgspec.msgpack.Decoder(FromWorker)
        self.encoder = msgspec.msgpack.Encoder()
        loads = None
        if config.expert_loads is not None:  # read here: no worker host needs the file
            loads = read_expert_loads(config.expert_loads, model_cfg.num_experts,
                                      model_cfg.moe_layers)  # fmt: skip
        self.load = LoadModel(config=worker_config, model_path=str(model_path),
                              comm_port=_free_port(), expert_loads=loads)  # fmt: skip
        # A fresh interpreter per worker (no fork of a threaded parent, no re-import of the
        # caller's __main__); it says Hello and is sent LoadModel over the socket.
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "titanserve.core.worker", self.run_dir, str(rank)]
                + ([",".join(map(str, core_sets[rank]))] if core_sets else []),
                env=with_huge_pages(os.environ),
            )
            for rank in range(self.world_size)
        ]
        self.spawned_at = self.wait_started = time.monotonic()
        self.last_seen: list[float | None] = [None] * self.world_size
        self._closed = False
        self.lost: WorkerLost | None = None
        self.in_flight: deque[int] = deque()  # step ids submitted and not yet collected
        self.early: dict[tuple[int, int], tuple] = {}  # (step, rank): a fast worker's result
        self._finalizer = weakref.finalize(self, _reap, self.procs, self.run_dir)
        atexit.register(self._finalizer)
        self.workers: list[WorkerReady] = [None] * self.world_size  # type: ignore[list-item]
        try:
            self._await_ready()
        except BaseException:
            self.shutdown()
            raise

    # ------------------------------------------------------------------ step
    def submit(self, plans: list[StepPlan]) -> None:
        """Send each worker its plan; `collect` waits for the results."""
        if self.lost is not None:
            raise self.lost
        self.wait_started = time.monotonic()
        self.in_flight.append(plans[0].step_id)
        for rank, plan in enumerate(plans):
            self.sock.send_multipart([f"w{rank}".encode(), self.encoder.encode(plan)])

    def forget(self, step_id: int) -> None:
        """Never collect this submitted step: its results are dropped when they come."""
        self.in_flight.remove(step_id)

    def collect(self) -> Iterator[WorkerOutput]:
        """The oldest submitted step's results: each worker's (rank, result, logits) as it
        arrives, so that the engine can process one while the others still compute. A
        result of a later step (a worker a step ahead) is kept for its collect; one of an
        earlier step (a collect abandoned halfway) is dropped."""
        if self.lost is not None:
            raise self.lost
        step_id = self.in_flight.popleft()
        self.early = {key: v for key, v in self.early.items() if key[0] >= step_id}
        pending = set(range(self.world_size))
        arrived: list[int] = []
        for rank in range(self.world_size):
            early = self.early.pop((step_id, rank), None)
            if early is not None:
                pending.discard(rank)
                arrived.append(rank)
                yield self._near(rank), *early
        while pending:
            try:
                rank, msg, frames = self._recv()
            except WorkerLost as e:
                self.lost = e  # the mesh is broken: every later step fails the same way
                raise
            if not isinstance(msg, StepResult) or msg.step_id < step_id:
                continue
            logits = decode_tensor(frames[0], frames[1]) if len(frames) >= 2 else None
            if msg.step_id > step_id:
                self.early[(msg.step_id, rank)] = (msg, logits)
            elif rank in pending:
                pending.discard(rank)
                arrived.append(rank)
                yield self._near(rank), msg, logits
        # The engine plans the next step next: on the cores of the worker that came first,
        # whose next step has started soonest.
        self._near(arrived[0])

    def _near(self, rank: int) -> int:
        """Move the engine thread onto `rank`'s cores (where it follows them); returns rank."""
        if self.follower is not None:
            self.follower.move_to(rank)
        return rank

    def release_cores(self) -> None:
        """Let the engine thread run anywhere again (it has no work left)."""
        if self.follower is not None:
            self.follower.release()

    def _await_ready(self) -> None:
        """Answer each Hello with LoadModel; wait (as long as heartbeats come) for WorkerReady."""
        self.wait_started = time.monotonic()
        while any(w is None for w in self.workers):
            rank, msg, _ = self._recv()
            if isinstance(msg, Hello):
                self.sock.send_multipart([f"w{rank}".encode(), self.encoder.encode(self.load)])
            elif isinstance(msg, WorkerReady):
                self.workers[rank] = msg

    def _recv(self) -> tuple[int, object, list]:
        """Next well-formed message from a worker; garbage is dropped, deaths raise."""
        while True:
            frames = recv_ready(self.sock, POLL_MS, copy=False)
            if frames is None:
                self._check_alive()
                continue
            identity = bytes(frames[0].buffer)  # b"w<rank>" main socket, b"h<rank>" heartbeats
            try:
                rank = int(identity[1:].decode())
                msg = self.decoder.decode(frames[1].buffer)
            except (ValueError, msgspec.DecodeError, msgspec.ValidationError, IndexError):
                continue  # not a worker's message: drop it, keep serving
            if not 0 <= rank < self.world_size:
                continue
            self.last_seen[rank] = time.monotonic()
            if isinstance(msg, Heartbeat):
                continue
            if isinstance(msg, WorkerError):
                if msg.fatal:
                    lost = msg.lost_rank if msg.lost_rank is not None else rank
                    raise WorkerLost(lost, msg.message)
                continue
            return rank, msg, frames[2:]

    def _check_alive(self) -> None:
        """Raise WorkerLost for a worker that exited, never started, or went silent.

        Silence counts from the later of its last message and the start of this wait: while
        the engine is idle nobody reads heartbeats, and that is not the worker's fault.
        """
        now = time.monotonic()
        for rank, p in enumerate(self.procs):
            if p.poll() is not None:
                raise WorkerLost(rank, f"process exited with code {p.returncode}")
            seen = self.last_seen[rank]
            if seen is None:
                if now - self.spawned_at > START_TIMEOUT_S:
                    raise WorkerLost(rank, f"did not start within {START_TIMEOUT_S:.0f} s")
            elif now - max(seen, self.wait_started) > HEARTBEAT_TIMEOUT_S:
                raise WorkerLost(
                    rank, f"no heartbeat for {HEARTBEAT_TIMEOUT_S:.0f} s (hung or stopped)"
                )

    def expert_loads(self, reset: bool = False) -> dict[int, list[int]]:
        """The pairs every worker's tokens routed to each expert so far (steps submitted
        before included), summed, by MoE layer; `reset`: the workers then count from zero."""
        if self.lost is not None:
            raise self.lost
        self.wait_started = time.monotonic()
        request = self.encoder.encode(ExpertLoadsRequest(reset=reset))
        for rank in range(self.world_size):
            self.sock.send_multipart([f"w{rank}".encode(), request])
        replies: dict[int, dict[int, list[int]]] = {}
        while len(replies) < self.world_size:
            rank, msg, frames = self._recv()
            if isinstance(msg, ExpertLoadsReply):
                replies[rank] = msg.loads
            elif isinstance(msg, StepResult) and msg.step_id in self.in_flight:
                logits = decode_tensor(frames[0], frames[1]) if len(frames) >= 2 else None
                self.early[(msg.step_id, rank)] = (msg, logits)  # for its collect
        total: dict[int, list[int]] = {}
        for rank in sorted(replies):
            add_loads(total, replies[rank])
        return total

    # ------------------------------------------------------------------ lifecycle
    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.release_cores()
        for rank, p in enumerate(self.procs):
            if p.poll() is None:
                try:
                    self.sock.send_multipart(
                        [f"w{rank}".encode(), self.encoder.encode(Shutdown())], flags=zmq.NOBLOCK
                    )
                except zmq.ZMQError:
                    pass
        self.sock.close(linger=1000)  # let the Shutdown messages leave
        self.ctx.term()
        self._finalizer()


def _reap(procs: list, run_dir: str) -> None:
    """Join workers (then terminate, then kill) and remove the ipc:// socket folder."""
    deadline = time.monotonic() + 5.0
    for p in procs:
        _wait(p, deadline - time.monotonic())
    for p in procs:
        if p.poll() is None:
            p.terminate()
            _wait(p, 2.0)
        if p.poll() is None:
            p.kill()
            _wait(p, 2.0)
    shutil.rmtree(run_dir, ignore_errors=True)


def _wait(p: subprocess.Popen, timeout_s: float) -> None:
    try:
        p.wait(max(0.0, timeout_s))
    except subprocess.TimeoutExpired:
        pass
