"""Worker process: holds a model shard (dense weights + its experts) and its paged KV cache,
executes StepPlans in lockstep with the other workers, samples its own requests.

Protocol: Hello -> LoadModel -> WorkerReady, then per step: StepPlan -> run it (joining the
MoE all-to-alls) -> StepResult, until Shutdown. A thread sends Heartbeats throughout.
"""

from __future__ import annotations

import os
import signal
import threading
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path

import msgspec
import torch
import zmq

from titanserve.core.config import ModelConfig
from titanserve.core.cpu_cores import bind_to, parse_core_list, threads_per_worker
from titanserve.core.engine_config import EngineConfig
from titanserve.core.model_runner import ModelRunner
from titanserve.ipc.collectives import create_collective
from titanserve.ipc.errors import WorkerLost
from titanserve.ipc.messages import (
    DECODE_ERRORS,
    HEARTBEAT_INTERVAL_S,
    MAX_CONTROL_MESSAGE_BYTES,
    ExpertLoadsReply,
    ExpertLoadsRequest,
    Heartbeat,
    Hello,
    LoadModel,
    Shutdown,
    StepPlan,
    ToWorker,
    WorkerError,
    WorkerReady,
)
from titanserve.ipc.sockets import recv_ready
from titanserve.ipc.tensor_frames import encode_tensor
from titanserve.moe.dispatch import ExpertParallel
from titanserve.moe.expert_loads import layer_placements
from titanserve.moe.layer import MoELayer
from titanserve.moe.placement import ExpertPlacement
from titanserve.moe.rebalance import counted_loads, rebalance_experts

PARENT_CHECK_S = 1.0
_ENGINE_PID = os.getppid()  # read at import, i.e. when the worker process starts


def collective_options(config: EngineConfig, run_dir: str, port: int) -> dict:
    if config.comm == "zmq":
        return {"socket_dir": os.path.join(run_dir, "mesh")}
    return {"init_method": f"tcp://127.0.0.1:{port}"}


def worker_main(run_dir: str, rank: int, cores: list[int] | None = None) -> None:
    """Entry point of a worker process (started by MultiProcExecutor): say Hello, load what
    LoadModel says, then serve plans until Shutdown. `cores`: the CPU cores it runs on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the engine process
    if cores:
        bind_to(cores)  # first, so that every thread it starts (ZeroMQ's, torch's) inherits it
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, f"w{rank}".encode())
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_MESSAGE_BYTES)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(f"ipc://{run_dir}/engine")
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(ToWorker)
    heartbeat = HeartbeatThread(ctx, f"ipc://{run_dir}/engine", rank)
    heartbeat.start()
    collective = None
    try:
        sock.send(encoder.encode(Hello(rank=rank, pid=os.getpid())))
        load = _next_message(sock, decoder, encoder, rank)
        if not isinstance(load, LoadModel):
            return  # Shutdown, or the engine is gone
        config, model_path = load.config, load.model_path
        world = config.num_workers
        device = config.resolve_device(rank)
        if device.type == "cpu":
            # bound: its cores are its share (the process now sees only those)
            share = len(cores) if cores else threads_per_worker(None, world)
            torch.set_num_threads(config.num_threads or share)
        else:  # kernels launch on the current device; collectives pick it too
            torch.cuda.set_device(device)
        model_cfg = ModelConfig.from_hf(model_path)
        placement = ExpertPlacement.contiguous(
            model_cfg.num_experts, world, rank, config.num_redundant_experts
        )
        own_placements = None  # MoE layers placed by recorded loads (moe.expert_loads)
        if load.expert_loads and world > 1:
            own_placements = layer_placements(load.expert_loads, model_cfg.num_experts, world,
                                              rank, config.num_redundant_experts)  # fmt: skip
        collective = create_collective(
            config.comm, rank, world, **collective_options(config, run_dir, load.comm_port)
        )
        runner = ModelRunner(
            Path(model_path),
            model_cfg,
            config.torch_dtype,
            config.block_size,
            config.num_kv_blocks,
            config.max_model_len,
            placement,
            device=device,
            seed=config.seed + rank,
            progress=config.progress and rank == 0,
            kv_cache_dtype=config.kv_cache_dtype,
            layer_placements=own_placements,
        )
        experts = 0
        exchange = ExpertParallel(collective)  # shared by every MoE layer
        for module in runner.model.modules():
            if isinstance(module, MoELayer):
                if world > 1:  # alone, a worker holds every expert: nothing to exchange
                    module.exchange = exchange
                    module.use_placement(module.placement)  # each layer's own
                module.count_loads = config.counts_expert_loads
                experts += module.w_gate_up.numel() + module.w_down.numel()
        runner.lockstep = True
        if config.uses_decode_graphs(device):
            progress = config.progress and rank == 0
            runner.capture_decode_graphs(config.max_num_seqs, progress=progress)
        runner.warm_up_cpu_linears(config.max_num_seqs)
        sock.send(
            encoder.encode(
                WorkerReady(
                    rank=rank,
                    local_experts=placement.local_experts,
                    layer_experts={i: p.local_experts for i, p in (own_placements or {}).items()},
                    expert_param_count=experts,
                    num_kv_blocks=config.num_kv_blocks,
                )
            )
        )
        rebalance = None
        if config.expert_rebalance_steps and world > 1:
            rebalance = partial(rebalance_experts, runner.model, collective, Path(model_path))
        _serve(sock, decoder, runner, rank, encoder, exchange, rebalance,
               config.expert_rebalance_steps)
    except WorkerLost as e:
        sock.send(
            encoder.encode(WorkerError(rank=rank, message=str(e), fatal=True, lost_rank=e.rank))
        )
    except Exception as e:  # report, then exit: the engine fails the in-flight requests
        detail = "".join(traceback.format_exception_only(type(e), e)).strip()
        sock.send(encoder.encode(WorkerError(rank=rank, message=detail, fatal=True)))
        traceback.print_exc()
    finally:
        heartbeat.stop()
        if collective is not None:
            collective.close()
        sock.close()
        ctx.term()


class HeartbeatThread(threading.Thread):
    """Sends Heartbeat(rank) every HEARTBEAT_INTERVAL_S on its own socket, also while the
    main thread computes (torch releases the GIL); never blocks on a busy engine."""

    def __init__(self, ctx: zmq.Context, address: str, rank: int) -> None:
        super().__init__(name=f"heartbeat-{rank}", daemon=True)
        self.ctx, self.address, self.rank = ctx, address, rank
        self._stop_event = threading.Event()

    def run(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, f"h{self.rank}".encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 4)  # an engine that stops reading gets no backlog
        sock.connect(self.address)
        beat = msgspec.msgpack.encode(Heartbeat(rank=self.rank))
        try:
            while not self._stop_event.is_set():
                try:
                    sock.send(beat, flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass
                self._stop_event.wait(HEARTBEAT_INTERVAL_S)
        finally:
            sock.close()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=2 * HEARTBEAT_INTERVAL_S)


def _next_message(sock: zmq.Socket, decoder, encoder, rank: int):
    """The next well-formed message for this worker, or None once the engine has died."""
    while True:
        frames = recv_ready(sock, int(PARENT_CHECK_S * 1000), copy=False)
        if frames is None:
            if os.getppid() != _ENGINE_PID:  # the engine died: never outlive it
                return None
            continue
        try:
            return decoder.decode(frames[0].buffer)
        except DECODE_ERRORS as e:
            sock.send(encoder.encode(WorkerError(rank=rank, message=f"bad message dropped: {e}")))


def _serve(
    sock: zmq.Socket,
    decoder,
    runner: ModelRunner,
    rank: int,
    encoder,
    exchange: ExpertParallel,
    rebalance: Callable[[], int] | None = None,
    rebalance_steps: int = 0,
) -> None:
    executed = 0  # plans run: the same count on every worker, which all get every plan
    while True:
        msg = _next_message(sock, decoder, encoder, rank)
        if msg is None or isinstance(msg, Shutdown):
            return
        if isinstance(msg, ExpertLoadsRequest):
            loads = counted_loads(runner.model, reset=msg.reset)
            sock.send(encoder.encode(ExpertLoadsReply(rank=rank, loads=loads)))
            continue
        if not isinstance(msg, StepPlan):
            sock.send(encoder.encode(WorkerError(rank=rank, message="already loaded")))
            continue
        rebalanced = 0
        if rebalance is not None and executed and executed % rebalance_steps == 0:
            rebalanced = rebalance()  # every worker at the same plan: it is a collective
        executed += 1
        exchange.comm_time_s = exchange.comm_wait_s = 0.0
        result, logits = runner.execute(msg)
        result.layers_rebalanced = rebalanced
        result.comm_time_s, result.comm_wait_s = exchange.comm_time_s, exchange.comm_wait_s
        if logits is None:
            sock.send(encoder.encode(result))
        else:
            header, data = encode_tensor(logits.contiguous())
            sock.send_multipart([encoder.encode(result), header, data], copy=False)


if __name__ == "__main__":
    import sys

    cores = parse_core_list(sys.argv[3]) if len(sys.argv) > 3 else None
    worker_main(sys.argv[1], int(sys.argv[2]), cores)
