"""What a caller gets back for a request."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RequestOutput:
    """A request's generation so far (final when `finished`).

    `logits` is (n_generated, V) fp32 when SamplingParams.return_logits was set;
    `prompt_logits` is (num_prompt_tokens, V) fp32 when return_prompt_logits was set.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    logits: torch.Tensor | None = None
    prompt_logits: torch.Tensor | None = None
    time_to_first_token_s: float | None = None
    num_preemptions: int = 0


@dataclass
class StepDelta:
    """One request's news from one engine step (for streaming)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None
