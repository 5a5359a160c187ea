"""Token sampler: penalties, temperature, top-k, top-p, min-p, per-request seeds, logprobs.

Rows are independent: a seeded request draws its noise from a generator keyed by
(seed, output index), so its samples do not depend on the batch, on preemption or on the
worker that holds it. Legend: N rows (requests sampling this step), V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from titanserve.core.penalties import TokenTally, apply_penalties
from titanserve.core.sampling_params import SamplingParams


@dataclass
class SamplingState:
    """Worker-side memory of one request, for penalties."""

    params: SamplingParams
    num_prompt_tokens: int
    history: list[int] = field(default_factory=list)  # prompt + output, when penalties apply
    last_token_id: int | None = None  # the newest sample (async scheduling's placeholders)
    tally: TokenTally | None = None  # the history's distinct tokens, when penalties apply

    def __post_init__(self) -> None:
        if self.params.needs_penalties and self.tally is None:
            prompt = self.history[: self.num_prompt_tokens]
            self.tally = TokenTally(prompt, self.history[self.num_prompt_tokens :])

    def record(self, token_id: int) -> None:
        """A token sampled for this request (kept only where penalties need it)."""
        if self.tally is not None:
            self.history.append(token_id)
            self.tally.add(token_id)

    def truncate(self, num_tokens: int) -> None:
        """Forget the outputs past the first `num_tokens` tokens (their step is redone)."""
        assert num_tokens >= self.num_prompt_tokens or not self.history, "prompts stay whole"
        if self.tally is not None:
            for token_id in self.history[num_tokens:]:
                self.tally.remove(token_id)
        del self.history[num_tokens:]


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]]]


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(
        self, logits: torch.Tensor, states: list[SamplingState], num_generated: list[int]
    ) -> SampleOutput:
        """logits: (N, V) fp32 raw model logits, one row per state, on any device. Plain
        greedy rows only (no penalties, no logprobs), the common case, take their argmax
        there: N token ids cross to the host instead of N*V logits. Otherwise the sampling
        runs on the host; penalties change the logits while tokens are chosen, and the raw
        values are back when this returns."""
        if all(s.params.is_greedy and s.tally is None and s.params.logprobs is None
               for s in states):  # fmt: skip
            n = len(states)
            return SampleOutput(logits.argmax(dim=-1).tolist(), [None] * n, [[] for _ in range(n)])
        logits = logits.cpu().contiguous()
        rows = [i for i, s in enumerate(states) if s.tally is not None]
        undo = None
        if rows:  # in place: a copy of the logits would cost more than the penalties
            tallies = [states[i].tally for i in rows]
            undo = apply_penalties(logits, rows, [states[i].params for i in rows], tallies)
        try:
            tokens = self._choose(logits, states, num_generated)
        finally:
            if undo is not None:
                undo()
        return self._logprobs(logits, tokens, states)  # logprobs of the raw logits

    def _choose(
        self, logits: torch.Tensor, states: list[SamplingState], num_generated: list[int]
    ) -> torch.Tensor:
        """(N,) int64: the argmax of greedy rows, a seeded draw for the others."""
        greedy = [i for i, s in enumerate(states) if s.params.is_greedy]
        random = [i for i, s in enumerate(states) if not s.params.is_greedy]
        if not random:  # all greedy, the common case: no rows gathered and scattered back
            return logits.argmax(dim=-1)
        tokens = torch.empty(logits.shape[0], dtype=torch.int64)
        if greedy:
            tokens[greedy] = logits[greedy].argmax(dim=-1)
        idx = torch.tensor(random)
        probs = self._probs(logits[idx], [states[i].params for i in random])  # (Nr, V)
        noise = self._noise(
            probs.shape, [states[i] for i in random], [num_generated[i] for i in random]
        )
        tokens[idx] = (probs / noise).argmax(dim=-1)
        return tokens

    # ------------------------------------------------------------------ steps
    @staticmethod
    def _probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype).unsqueeze(1)
        logits = logits / temps  # (Nr, V)
        top_ks = [p.top_k if p.top_k > 0 else logits.shape[1] for p in params]
        top_ps = [p.top_p for p in params]
        if any(k < logits.shape[1] for k in top_ks) or any(p < 1.0 for p in top_ps):
            sorted_logits, order = logits.sort(dim=-1, descending=True)  # (Nr, V)
            ranks = torch.arange(logits.shape[1]).unsqueeze(0)
            sorted_logits = sorted_logits.masked_fill(
                ranks >= torch.tensor(top_ks).unsqueeze(1), float("-inf")
            )
            # top-p measures the mass left by top-k (as vLLM and HF do): keep the smallest
            # prefix whose mass reaches top_p (the first token always stays)
            sorted_probs = sorted_logits.softmax(dim=-1)  # (Nr, V)
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            remove = mass_before >= torch.tensor(top_ps).unsqueeze(1)
            sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        min_ps = torch.tensor([p.min_p for p in params], dtype=probs.dtype).unsqueeze(1)
        if (min_ps > 0).any():
            threshold = probs.max(dim=-1, keepdim=True).values * min_ps
            probs = probs.masked_fill(probs < threshold, 0.0)
        return probs

    def _noise(self, shape, states: list[SamplingState], num_generated: list[int]) -> torch.Tensor:
        """Exponential(1) noise; argmax(probs / noise) is a sample from probs."""
        noise = torch.empty(shape).exponential_(generator=self.generator)  # (Nr, V)
        for row, (state, index) in enumerate(zip(states, num_generated)):
            if state.params.seed is not None:
                g = torch.Generator().manual_seed(hash((state.params.seed, index)) & (2**63 - 1))
                noise[row].exponential_(generator=g)
        return noise

    @staticmethod
    def _logprobs(
        raw: torch.Tensor, tokens: torch.Tensor, states: list[SamplingState]
    ) -> SampleOutput:
        n = len(states)
        logprobs: list[float | None] = [None] * n
        tops: list[list[tuple[int, float]]] = [[] for _ in range(n)]
        wanted = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        if wanted:
            lp = torch.log_softmax(raw[wanted], dim=-1)  # (Nw, V)
            chosen = lp.gather(1, tokens[wanted].unsqueeze(1)).squeeze(1)
            for j, i in enumerate(wanted):
                logprobs[i] = float(chosen[j])
                k = states[i].params.logprobs
                if k:
                    values, ids = lp[j].topk(k)
                    tops[i] = list(zip(ids.tolist(), values.tolist()))
        return SampleOutput(tokens.tolist(), logprobs, tops)
