"""Executors run a step's plans on the workers: in this process (one worker) or on worker
processes over ZeroMQ (several). The engine sees `submit` (start a step), `collect` (each
worker's results as they arrive) and `shutdown`; between the two it processes the previous
step's outputs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from titanserve.core.config import ModelConfig
from titanserve.core.engine_config import EngineConfig
from titanserve.core.model_runner import ModelRunner
from titanserve.ipc.messages import StepPlan, StepResult
from titanserve.moe.placement import ExpertPlacement
from titanserve.moe.rebalance import counted_loads, moe_layers

# (worker rank, its result, its logits rows), one per worker, in the order they arrive
WorkerOutput = tuple[int, StepResult, "torch.Tensor | None"]


class InProcessExecutor:
    """One worker, in the engine's own process."""

    overlaps = False  # the step runs inside collect(): nothing can overlap it
    runs_ahead = False  # and so one step at a time: no async scheduling

    def __init__(
        self,
        config: EngineConfig,
        model_path: Path,
        model_cfg: ModelConfig,
        num_blocks: int,
        max_model_len: int,
    ):
        device = config.resolve_device(0)
        if config.num_threads and device.type == "cpu":
            torch.set_num_threads(config.num_threads)
        self.runner = ModelRunner(
            model_path,
            model_cfg,
            config.torch_dtype,
            config.block_size,
            num_blocks,
            max_model_len,
            ExpertPlacement.contiguous(model_cfg.num_experts),
            device=device,
            seed=config.seed,
            progress=config.progress,
            kv_cache_dtype=config.kv_cache_dtype,
        )
        if config.uses_decode_graphs(device):
            self.runner.capture_decode_graphs(config.max_num_seqs, progress=config.progress)
        self.runner.warm_up_cpu_linears(config.max_num_seqs)
        for layer in moe_layers(self.runner.model).values():
            layer.count_loads = config.counts_expert_loads

        self._plans: list[StepPlan] | None = None

    def submit(self, plans: list[StepPlan]) -> None:
        if self._plans is not None:  # never collected (the engine failed in between): run it,
            self.runner.execute(self._plans[0])  # as a worker runs every plan it is sent
        self._plans = plans  # runs in collect(): one process cannot overlap with itself

    def collect(self) -> Iterator[WorkerOutput]:
        plans, self._plans = self._plans, None
        yield 0, *self.runner.execute(plans[0])

    def release_cores(self) -> None:
        pass  # the model runs on the engine's own thread: nothing to follow

    def expert_loads(self, reset: bool = False) -> dict[int, list[int]]:
        """See `MultiProcExecutor.expert_loads`."""
        return counted_loads(self.runner.model, reset)

    def shutdown(self) -> None:
        self.runner = None
