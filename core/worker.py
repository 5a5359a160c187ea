"""Worker process: holds a model shard (dense weights + its experts) and its paged KV cache,
executes StepPlans in lockstep with the other workers, samples its own requests.

The loop: receive a plan -> run it (joining the MoE all-to-alls) -> send the result.
"""

from __future__ import annotations

import json
import os
import signal
import traceback
from pathlib import Path

import msgspec
import torch
import zmq

from titanserve.core.config import ModelConfig
from titanserve.core.engine_config import EngineConfig
from titanserve.core.model_runner import ModelRunner
from titanserve.ipc.collectives import create_collective
from titanserve.ipc.errors import WorkerLost
from titanserve.ipc.messages import (
    MAX_CONTROL_MESSAGE_BYTES,
    Shutdown,
    StepPlan,
    ToWorker,
    WorkerError,
    WorkerReady,
)
from titanserve.ipc.tensor_frames import encode_tensor
from titanserve.moe.dispatch import ExpertParallel
from titanserve.moe.layer import MoELayer
from titanserve.moe.placement import ExpertPlacement

PARENT_CHECK_S = 1.0


def collective_options(config: EngineConfig, run_dir: str, port: int) -> dict:
    if config.comm == "zmq":
        return {"socket_dir": os.path.join(run_dir, "mesh")}
    return {"init_method": f"tcp://127.0.0.1:{port}"}


def worker_main(config_json: str, model_path: str, rank: int, run_dir: str, comm_port: int) -> None:
    """Entry point of a worker process (started by MultiProcExecutor)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the engine process
    config = EngineConfig(**json.loads(config_json))
    world = config.num_workers
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, f"w{rank}".encode())
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_MESSAGE_BYTES)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(f"ipc://{run_dir}/engine")
    encoder = msgspec.msgpack.Encoder()
    collective = None
    try:
        device = config.resolve_device(rank)
        if device.type == "cpu":
            torch.set_num_threads(config.num_threads or max(1, (os.cpu_count() or 1) // world))
        model_cfg = ModelConfig.from_hf(model_path)
        placement = ExpertPlacement.contiguous(model_cfg.num_experts, world, rank)
        collective = create_collective(
            config.comm, rank, world, **collective_options(config, run_dir, comm_port)
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
        )
        experts = 0
        exchange = ExpertParallel(collective, placement)  # shared by every MoE layer
        for module in runner.model.modules():
            if isinstance(module, MoELayer):
                module.exchange = exchange
                experts += module.w_gate_up.numel() + module.w_down.numel()
        runner.lockstep = True
        sock.send(
            encoder.encode(
                WorkerReady(
                    rank=rank,
                    local_experts=placement.local_experts,
                    expert_param_count=experts,
                    num_kv_blocks=config.num_kv_blocks,
                )
            )
        )
        _serve(sock, runner, rank, encoder, exchange)
    except WorkerLost as e:
        sock.send(
            encoder.encode(WorkerError(rank=rank, message=str(e), fatal=True, lost_rank=e.rank))
        )
    except Exception as e:  # report, then exit: the engine fails the in-flight requests
        detail = "".join(traceback.format_exception_only(type(e), e)).strip()
        sock.send(encoder.encode(WorkerError(rank=rank, message=detail, fatal=True)))
        traceback.print_exc()
    finally:
        if collective is not None:
            collective.close()
        sock.close()
        ctx.term()


def _serve(
    sock: zmq.Socket, runner: ModelRunner, rank: int, encoder, exchange: ExpertParallel
) -> None:
    decoder = msgspec.msgpack.Decoder(ToWorker)
    parent = os.getppid()
    while True:
        if not sock.poll(int(PARENT_CHECK_S * 1000)):
            if os.getppid() != parent:  # the engine died: never outlive it
                return
            continue
        frames = sock.recv_multipart(copy=False)
        try:
            msg = decoder.decode(frames[0].buffer)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            sock.send(encoder.encode(WorkerError(rank=rank, message=f"bad message dropped: {e}")))
            continue
        if isinstance(msg, Shutdown):
            return
        assert isinstance(msg, StepPlan)
        exchange.comm_time_s = 0.0
        result, logits = runner.execute(msg)
        result.comm_time_s = exchange.comm_time_s
        if logits is None:
            sock.send(encoder.encode(result))
        else:
            header, data = encode_tensor(logits.contiguous())
            sock.send_multipart([encoder.encode(result), header, data], copy=False)


if __name__ == "__main__":
    import sys

    config_arg, path_arg, rank_arg, dir_arg, port_arg = sys.argv[1:6]
    worker_main(config_arg, path_arg, int(rank_arg), dir_arg, int(port_arg))
