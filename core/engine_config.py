"""Engine settings (the CLI flags' names), resolved once against the model.

Imports torch only inside the methods that need it: the wire messages carry an EngineConfig,
and light clients import those messages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from titanserve.core.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from titanserve.core.config import ModelConfig

# With two_batch_overlap, steps of at least this many sequences a worker (on average) run
# as two micro-batches: below it a step is bound by per-op costs, which splitting doubles.
TWO_BATCH_MIN_SEQS_PER_WORKER = 8

# Accepted dtype names -> torch's name for them (core.config maps these to torch dtypes).
DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
DTYPE_NAMES = tuple(DTYPE_ALIASES)


def canonical_dtype_name(name: str) -> str:
    """torch's name for dtype `name`; a one-line ValueError for a name we do not serve."""
    if name not in DTYPE_ALIASES:
        raise ValueError(f"unknown dtype {name!r}; choose one of float32, bfloat16, float16")
    return DTYPE_ALIASES[name]


@dataclass(frozen=True)
class EngineConfig:
    model: str
    dtype: str = "float32"
    num_workers: int = 1
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_memory: float | None = None  # bytes (> 1) or fraction of free memory (<= 1)
    num_kv_blocks: int | None = None  # exact block count per worker (overrides the above)
    # "auto": fp32 on CPU (decode attention reads it in place, core.model.kv_cache), the
    # model's dtype on GPU; or float32 / bfloat16 / float16.
    kv_cache_dtype: str = "auto"
    enable_prefix_caching: bool = True
    # Plan step t+1 while step t runs (worker processes only): workers go from one step to
    # the next without waiting for the scheduler. A request that eos or a stop string ends
    # computes one token more, which is dropped.
    async_scheduling: bool = True
    seed: int = 0
    device: str = "auto"
    comm: str = "zmq"
    # Experts each worker holds a copy of, besides its own (moe.placement): pairs routed to
    # an expert with a copy are split between its two holders to even out the workers' rows.
    num_redundant_experts: int = 0
    # Every N steps, re-place each MoE layer's experts (and copies) by the loads the workers
    # counted since the last time (moe.rebalance); 0: keep the contiguous placement.
    expert_rebalance_steps: int = 0
    # Place each MoE layer's experts (and copies) from the first step by the loads recorded in
    # this JSON file (moe.expert_loads); None: the contiguous placement.
    expert_loads: str | None = None
    # Count the pairs routed to each expert of each MoE layer and write them to this JSON
    # file when the engine shuts down (for expert_loads).
    record_expert_loads: str | None = None
    # Run steps of at least TWO_BATCH_MIN_SEQS_PER_WORKER sequences a worker as two micro-
    # batches, each one's all-to-alls in flight while the other computes (core.model.stages):
    # a worker that reaches an exchange early computes instead of waiting for the others.
    two_batch_overlap: bool = False
    sp_threshold: int | None = None
    num_threads: int | None = None  # torch threads per worker on CPU
    # Bind each CPU worker process to its own cores (see core.cpu_cores).
    bind_cpu_cores: bool = True
    # One worker in this process (False) or in a process of its own (True; the server's
    # choice: a crashing model cannot take the scheduler down). None: own processes where
    # W > 1 or the worker runs on a GPU (see resolve_worker_processes).
    worker_processes: bool | None = None
    progress: bool = True
    # Compile the GPU kernels at start, on throw-away requests (core.warmup). None: on CUDA,
    # where the kernels are compiled; the torch path on CPU has nothing to compile.
    warmup: bool | None = None
    # Run every step eagerly: no CUDA graphs for decode steps (core.cuda_graphs), which are
    # otherwise captured on CUDA up to max_num_seqs sequences.
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        canonical_dtype_name(self.dtype)
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in DTYPE_ALIASES:
            raise ConfigError(f"kv_cache_dtype must be auto, float32, bfloat16 or float16, "
                              f"got {self.kv_cache_dtype!r}")
        positive = ["num_workers", "max_num_batched_tokens", "max_num_seqs", "block_size"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.comm not in ("zmq", "torch"):
            raise ConfigError(f"comm must be 'zmq' or 'torch', got {self.comm!r}")
        if self.sp_threshold is not None:
            raise ConfigError("sequence parallel (--sp-threshold) is not available yet")
        for name in ("num_redundant_experts", "expert_rebalance_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
            if getattr(self, name) and self.num_workers == 1:
                raise ConfigError(f"{name} needs num_workers > 1")
        if self.expert_loads is not None and self.num_workers == 1:
            raise ConfigError("expert_loads needs num_workers > 1 (one worker holds every expert)")
        if self.two_batch_overlap and self.num_workers == 1:
            raise ConfigError("two_batch_overlap needs num_workers > 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError("num_kv_blocks must be >= 1")

    @staticmethod
    def from_kwargs(model: str, **kwargs) -> EngineConfig:
        known = {f.name for f in fields(EngineConfig)}
        unknown = set(kwargs) - known
        if unknown:
            raise ConfigError(f"unknown engine option(s): {', '.join(sorted(unknown))}")
        return EngineConfig(model=str(model), **kwargs)

    @property
    def torch_dtype(self) -> torch.dtype:
        from titanserve.core.config import parse_dtype

        return parse_dtype(self.dtype)

    def resolve_device(self, rank: int = 0) -> torch.device:
        """Worker `rank`'s device. Where no GPU index is named ("auto" on a GPU machine, or
        "cuda"), the workers take the visible GPUs in turn."""
        import torch

        if self.device != "auto":
            device = torch.device(self.device)
        elif torch.cuda.is_available():
            device = torch.device("cuda")
        else:
            return torch.device("cpu")
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", rank % max(1, torch.cuda.device_count()))
        return device

    def resolve_warmup(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.warmup is None else self.warmup

    def resolve_worker_processes(self, device: torch.device) -> bool:
        """Whether workers run in processes of their own. By default several workers do,
        and so does one on a GPU: the engine then plans step t+1 and turns step t-1's tokens
        into outputs on its own core while the GPU runs step t (async scheduling), where in one
        process it would wait for each step (on an H100, 21-40% of a tiny model's step time
        went to the engine's work in between). One CPU worker stays in the engine's process:
        there the engine's work would take cores from the model."""
        if self.worker_processes is not None:
            return self.worker_processes
        return self.num_workers > 1 or device.type == "cuda"

    @property
    def counts_expert_loads(self) -> bool:
        """Whether MoE layers count the pairs routed to each expert (moe.rebalance reads
        them, record_expert_loads saves them)."""
        return self.expert_rebalance_steps > 0 or self.record_expert_loads is not None

    def uses_decode_graphs(self, device: torch.device) -> bool:
        return device.type == "cuda" and not self.enforce_eager

    def resolve_max_model_len(self, model: ModelConfig) -> int:
        if self.max_model_len is None:
            return model.max_position_embeddings
        if self.max_model_len > model.max_position_embeddings:
            raise ConfigError(
                f"max_model_len {self.max_model_len} exceeds the model's context "
                f"({model.max_position_embeddings})"
            )
        return self.max_model_len

    def resolve_num_blocks(
        self, bytes_per_block: int, max_model_len: int, device: torch.device
    ) -> int:
        """KV blocks per worker: explicit, or from a memory budget; never more than useful."""
        useful = self.max_num_seqs * (-(-max_model_len // self.block_size)) + 1
        if self.num_kv_blocks is not None:
            blocks = self.num_kv_blocks
        else:
            budget = self.kv_cache_memory if self.kv_cache_memory is not None else 0.2
            if budget <= 1:
                budget = (
                    budget
                    * _free_memory_bytes(device)
                    / (1 if device.type == "cuda" else self.num_workers)
                )
            blocks = min(int(budget // bytes_per_block), useful)
        if blocks * self.block_size < min(
            max_model_len, self.max_num_batched_tokens, 16 * self.block_size
        ):
            raise ConfigError(
                f"KV cache of {blocks} blocks x {self.block_size} tokens is too small; "
                "raise --kv-cache-memory or lower --max-model-len"
            )
        return blocks


def _free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
