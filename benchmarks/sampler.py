"""Sampler: titanserve's against transformers' logits processors and multinomial draw.

    python benchmarks/sampler.py [--rows 64] [--vocab 32000 151936] [--repeat 7]

One step's sampling for `--rows` requests on the host, logits shaped like a language model's
(token probabilities falling as a power of their rank, with noise). Each setting runs both
samplers on the same logits, alternately; prints the median ms of each and the ratio. The
transformers side is what `generate(do_sample=True)` does per step: its warpers (temperature,
top-k, top-p, repetition penalty over the 1200 tokens so far) then `softmax` and
`torch.multinomial`; greedy is its `argmax`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from titanserve.core.cpu_malloc import tune_malloc
from titanserve.core.sampler import Sampler, SamplingState
from titanserve.core.sampling_params import SamplingParams

HISTORY = (200, 1000)  # prompt and output tokens so far, for the penalties
SETTINGS = {
    "greedy": dict(temperature=0.0),
    "temperature 0.8": dict(temperature=0.8),
    "temperature 0.8, top-p 0.95": dict(temperature=0.8, top_p=0.95),
    "temperature 0.8, top-k 50": dict(temperature=0.8, top_k=50),
    "greedy, repetition penalty 1.1": dict(temperature=0.0, repetition_penalty=1.1),
}


def lm_like_logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """(rows, vocab): p ~ rank^-1.5 over a random ranking per row, plus noise."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(vocab, generator=g) for _ in range(rows)])
    return -1.5 * torch.log1p(ranks.float()) + 0.3 * torch.randn(rows, vocab, generator=g)


def hf_step(processors, input_ids: torch.Tensor, logits: torch.Tensor, greedy: bool):
    scores = processors(input_ids, logits.clone())
    if greedy:
        return scores.argmax(dim=-1)
    return torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)


def hf_processors(params: dict):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    out = LogitsProcessorList()
    if params.get("repetition_penalty", 1.0) != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(params["repetition_penalty"]))
    if params["temperature"] > 0:
        out.append(TemperatureLogitsWarper(params["temperature"]))
    if params.get("top_k"):
        out.append(TopKLogitsWarper(params["top_k"]))
    if params.get("top_p", 1.0) < 1.0:
        out.append(TopPLogitsWarper(params["top_p"]))
    return out


def bench(rows: int, vocab: int, name: str, params: dict, repeat: int) -> tuple[float, float]:
    """(transformers ms, titanserve ms), medians of `repeat` alternating runs."""
    logits = lm_like_logits(rows, vocab)
    g = torch.Generator().manual_seed(1)
    history = torch.randint(0, vocab, (rows, sum(HISTORY)), generator=g)  # (rows, n)
    states = [
        SamplingState(SamplingParams(max_tokens=1 << 20, **params), HISTORY[0], h.tolist())
        for h in history
    ]
    sampler, processors = Sampler(), hf_processors(params)
    greedy = params["temperature"] == 0
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(repeat + 1):  # the first round warms both up
        for which in (0, 1) if i % 2 else (1, 0):
            start = time.perf_counter()
            if which == 0:
                hf_step(processors, history, logits, greedy)
            else:
                sampler(logits, states, [HISTORY[1]] * rows)
            if i:
                times[which].append(time.perf_counter() - start)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    tune_malloc()  # as the engine does
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rows} rows")
    for vocab in args.vocab:
        print(f"\nvocabulary {vocab}: ms per step (median of {args.repeat})")
        for name, params in SETTINGS.items():
            hf, ours = bench(args.rows, vocab, name, params, args.repeat)
            print(f"  {name:<32} transformers {hf:8.2f}   titanserve {ours:8.2f}   "
                  f"x{hf / ours:.2f}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
