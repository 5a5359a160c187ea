"""Token sampler: penalties, temperature, top-k, top-p, min-p, per-request seeds, logprobs.

Rows are independent: a seeded request draws its uniform number from a generator keyed by
(seed, output index), so its samples do not depend on the batch, on preemption or on the
worker that holds it (see core.random_sampling for the draw). Legend: N rows (requests
sampling this step), V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from titanserve.core.penalties import TokenTally, apply_penalties
from titanserve.core.random_sampling import sample_filtered
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
        if not random:  # no rows gathered and scattered back
            return logits.argmax(dim=-1)
        tokens = torch.empty(logits.shape[0], dtype=torch.int64)
        if greedy:
            tokens[greedy] = logits[greedy].argmax(dim=-1)
        idx = torch.tensor(random)
        uniforms = self._uniforms([states[i] for i in random], [num_generated[i] for i in random])
        params = [states[i].params for i in random]
        tokens[idx] = sample_filtered(logits[idx], params, uniforms)  # on a copy: it overwrites
        return tokens

    # ------------------------------------------------------------------ steps
    def _uniforms(self, states: list[SamplingState], num_generated: list[int]) -> torch.Tensor:
        """(Nr,) fp64 uniforms in [0, 1), one per row: a seeded request's from its own generator
        keyed by (seed, output index), so that its draws do not depend on the batch."""
        uniforms = torch.rand(len(states), dtype=torch.float64, generator=self.generator)
        for row, (state, index) in enumerate(zip(states, num_generated)):
            if state.params.seed is not None:
                g = torch.Generator().manual_seed(hash((state.params.seed, index)) & (2**63 - 1))
                uniforms[row] = torch.rand(1, dtype=torch.float64, generator=g)
        return uniforms

    @staticmethod
    def _logprobs(
        raw: torch.Tensor, tokens: torch.Tensor, states: list[SamplingState]
    ) -> SampleOutput:
        n = len(states)
        logprobs: list[float | None] = [None] * n
        tops: list[list[tuple[int, float]]] = [[] for _ in range(n)]
        wanted = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        if wanted:  # log_softmax(x)[t] = x[t] - logsumexp(x): no (Nw, V) result made
            rows = raw if len(wanted) == n else raw[wanted]  # (Nw, V)
            log_norm = rows.logsumexp(dim=-1, keepdim=True)  # (Nw, 1)
            chosen = rows.gather(1, tokens[wanted].unsqueeze(1)) - log_norm  # (Nw, 1)
            for i, value in zip(wanted, chosen.squeeze(1).tolist()):
                logprobs[i] = value
            most = max(states[i].params.logprobs for i in wanted)
            if most:
                values, ids = rows.topk(most, dim=-1)  # (Nw, most)
                values, ids = (values - log_norm).tolist(), ids.tolist()
                for j, i in enumerate(wanted):
                    k = states[i].params.logprobs
                    tops[i] = list(zip(ids[j][:k], values[j][:k]))
        return SampleOutput(tokens.tolist(), logprobs, tops)
