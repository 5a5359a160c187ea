"""A request as the scheduler sees it: token ids, progress counters, its blocks."""

from __future__ import annotations

import enum
import time

from titanserve.core.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    """Scheduler-side state. NOTE: there are no prefill/decode phases: a request only has
    `num_computed_tokens` (KV in the cache) and `num_tokens` (prompt + generated)."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        eos_token_ids: tuple[int, ...] = (),
        arrival_time: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.sampling = sampling
        self.eos_token_ids = eos_token_ids
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.worker: int | None = None  # data-parallel rank holding this request's KV
        self.block_ids: list[int] = []
        self.num_sent_blocks = 0  # leading blocks of the table its worker has been sent
        self.block_hashes: list[int] = []  # chain hashes of the full blocks, filled lazily
        self.num_published_blocks = 0  # leading blocks already offered to the prefix index
        self.num_preemptions = 0
        self.needs_reset = True  # next chunk carries a NewRequest (first time, or recompute)
        self.finish_reason: str | None = None
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def max_outputs_left(self) -> int:
        """Outputs max_tokens still allows (an upper bound: EOS or a stop may come first)."""
        return max(0, self.sampling.max_tokens - self.num_output_tokens)

    @property
    def tokens_left(self) -> int:
        """Forward passes of one token it may still need: known tokens not yet computed (a
        prompt not yet prefilled) plus the outputs max_tokens still allows."""
        return self.num_tokens - self.num_computed_tokens + self.max_outputs_left

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def append_output(self, token_id: int) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self) -> str | None:
        """Finish reason after the newest token, from token-level rules only."""
        if not self.output_token_ids:
            return None
        last = self.output_token_ids[-1]
        if not self.sampling.ignore_eos and last in self.eos_token_ids:
            return "stop"
        if last in self.sampling.stop_token_ids:
            return "stop"
        if self.num_output_tokens >= self.sampling.max_tokens:
            return "length"
        return None
