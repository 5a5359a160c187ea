"""Compile the GPU kernels before serving, not inside the first requests.

Triton compiles a kernel the first time it meets a new set of compile-time choices, and the
launchers pick tile sizes from the step's size (tokens, sequences, expert pairs). On an H100
the first 64 requests of `benchmarks/throughput.py` took 10.3 s instead of 0.63 s, nearly all
of it compiling. The warm-up runs the engine's real path (scheduler, workers, collectives) on
throw-away requests at each power-of-two prefill length and decode batch size up to the
engine's limits, then forgets them: their prefix-cache entries, the engine's counters and the
expert loads counted for `record_expert_loads`.

The launchers' sizes are powers of two or buckets bounded by them, and the kernels take the
sizes that change every step as plain ints (`do_not_specialize`), so these shapes cover what
serving meets. Two cases are not covered: an expert-parallel rank's token count after
dispatch, which routing decides, and a tuned fused-MoE table keyed by token counts that are
not powers of two. A tile bucket the warm-up never reached compiles on first use.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from tqdm import tqdm

from titanserve.core.sampling_params import SamplingParams

if TYPE_CHECKING:
    from titanserve.core.engine import Engine

WARMUP_TOKENS = 2  # a prefill step, then a decode step


def powers_of_two_up_to(limit: int) -> list[int]:
    """1, 2, 4, ... below `limit`, then `limit` itself (empty for limit < 1)."""
    sizes = []
    n = 1
    while n < limit:
        sizes.append(n)
        n *= 2
    return sizes + [limit] if limit >= 1 else sizes


def warmup_rounds(
    max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int
) -> list[tuple[int, int]]:
    """(requests, prompt length) of each round: one prompt of each prefill length (each also
    decodes a token over its context), one prompt longer than a step's budget where the
    context allows it (its last chunk reads its cached start from the paged cache), then
    batches of one-token prompts of each decode batch size."""
    longest = max_model_len - WARMUP_TOKENS
    prefills = [(1, n) for n in powers_of_two_up_to(min(max_num_batched_tokens, longest))]
    chunked = [(1, max_num_batched_tokens + 1)] if longest > max_num_batched_tokens else []
    decodes = [(b, 1) for b in powers_of_two_up_to(max_num_seqs) if b > 1]
    return prefills + chunked + decodes


def warm_up(engine: Engine) -> int:
    """Run the warm-up rounds through `engine`, then reset what they left behind; returns
    the number of engine steps they took."""
    config = engine.config
    rounds = warmup_rounds(config.max_num_batched_tokens, config.max_num_seqs,
                           engine.max_model_len)
    vocab = engine.model_config.vocab_size
    rng = random.Random(config.seed)  # distinct prompts: no prefix-cache hit skips a shape
    params = SamplingParams(max_tokens=WARMUP_TOKENS, temperature=0.0, ignore_eos=True)
    for n, (num_requests, length) in enumerate(
        tqdm(rounds, desc="compiling kernels", unit="shape", disable=not config.progress)
    ):
        for i in range(num_requests):
            prompt = [rng.randrange(vocab) for _ in range(length)]
            engine.add_request(prompt, params, request_id=f"warmup-{n}-{i}")
        while engine.has_unfinished():
            engine.step()
    steps = engine.num_steps
    engine.scheduler.reset_prefix_cache()
    engine.reset_stats()
    if config.counts_expert_loads:  # random prompts are not traffic to place experts by
        engine.expert_loads(reset=True)
    return steps
