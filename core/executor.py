"""Executors run a step's plans on the workers: in this process (one worker) or on worker
processes over ZeroMQ (several). The engine sees only `execute` and `shutdown`."""

from __future__ import annotations

from pathlib import Path

import torch

from titanserve.core.config import ModelConfig
from titanserve.core.engine_config import EngineConfig
from titanserve.core.model_runner import ModelRunner
from titanserve.ipc.messages import StepPlan, StepResult
from titanserve.moe.placement import ExpertPlacement

StepOutputs = list[tuple[StepResult, "torch.Tensor | None"]]


class InProcessExecutor:
    """One worker, in the engine's own process."""

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
        )

    def execute(self, plans: list[StepPlan]) -> StepOutputs:
        return [self.runner.execute(plans[0])]

    def shutdown(self) -> None:
        self.runner = None
