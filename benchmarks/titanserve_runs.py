"""titanserve's side of the throughput benchmarks: seeded requests, one timed `LLM.generate`
run with the share of step time outside model compute, interleaved rounds of configurations,
and the rows they print (used by `throughput.py`)."""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

import torch
from run_queue import run_queue_wait_s, run_queue_wait_since

from titanserve.core.engine import compute_apart, outside_compute
from titanserve.core.engine_config import EngineConfig
from titanserve.core.llm import LLM
from titanserve.core.sampling_params import SamplingParams

Request = tuple[list[int], int]  # (prompt token ids, output tokens)
BIG_BATCH = 32  # the overhead goal is stated for steps with at least this many requests


def make_requests(
    n: int, vocab: int, prompt_lens: tuple[int, int], output_lens: tuple[int, int], seed: int = 0
) -> list[Request]:
    """n random requests with uniform prompt/output lengths in the given (inclusive) ranges."""
    rng = random.Random(seed)
    return [
        (
            [rng.randrange(vocab) for _ in range(rng.randint(*prompt_lens))],
            rng.randint(*output_lens),
        )
        for _ in range(n)
    ]


def run_titanserve(
    path: Path, requests: list[Request], workers: int, dtype: str, device: str,
    big_batch: int = BIG_BATCH, **options,
) -> dict:
    """Time `LLM.generate` on all requests at once, after a warm-up request, on a fresh engine
    (a warm prefix cache would flatter it); the `*_big_batch` figures count steps with at
    least `big_batch` requests running. `options`: more `LLM` keywords."""
    llm = LLM(str(path), dtype=dtype, num_workers=workers, device=device, progress=False,
              **options)
    try:
        params = [
            SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in requests
        ]
        llm.generate([requests[0][0][:16]], params[0])  # warm-up (one-time costs)
        engine = llm.engine
        engine.reset_stats()  # count the timed run only
        big_batch_totals = time_big_batch_steps(engine, big_batch)
        # the processes whose main thread runs the model: the workers, else this one
        pids = [p.pid for p in getattr(engine.executor, "procs", [])] or [os.getpid()]
        before = [run_queue_wait_s(pid) for pid in pids]
        start = time.perf_counter()
        outputs = llm.generate([p for p, _ in requests], params)
        elapsed = time.perf_counter() - start
        queued = [run_queue_wait_since(pid, then) for pid, then in zip(pids, before)]
        wall, compute, comm, comm_wait, fastest = big_batch_totals
        big_share, big_parts = outside_compute(wall, compute, comm, comm_wait)
        return {
            "elapsed_s": elapsed,
            "tokens": sum(len(o.token_ids) for o in outputs),
            "token_ids": [o.token_ids for o in outputs],
            "overhead": engine.overhead_fraction,
            "overhead_big_batch": big_share if wall else None,
            # of it, the slowest worker in all-to-alls: waiting for the others, and the rest
            "parts_big_batch": big_parts,
            # how much less the fastest worker computed than the slowest (1 worker: 0)
            "compute_apart_big_batch": compute_apart(compute, fastest),
            # the most a model thread sat ready to run while something else had its core
            "run_queue_wait": None if None in queued else max(queued) / elapsed,
        }
    finally:
        llm.shutdown()


def time_big_batch_steps(engine, min_batch: int = BIG_BATCH) -> list[float]:
    """[wall, model compute, all-to-all time, of it waiting, the fastest worker's compute]
    summed over engine steps taken with >= min_batch requests running (the tail of a run, where
    few are left, has shorter steps); the middle three are the slowest worker's (see
    `Engine.overhead_parts`)."""
    totals = [0.0] * 5
    step = engine.step

    def counters() -> tuple[float, float, float, float]:
        return (engine.compute_time_s, engine.comm_time_s, engine.comm_wait_time_s,
                engine.fastest_compute_time_s)

    def timed_step():
        batch, t0, before = len(engine.scheduler.running), time.perf_counter(), counters()
        deltas = step()
        if batch >= min_batch:
            totals[0] += time.perf_counter() - t0
            for i, (now, then) in enumerate(zip(counters(), before), start=1):
                totals[i] += now - then
        return deltas

    engine.step = timed_step
    return totals


def fastest(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["elapsed_s"])


def print_row(label: str, result: dict, extra: str = "") -> None:
    rate = result["tokens"] / result["elapsed_s"]
    print(
        f"  {label:<44}{result['tokens']:>7} tok {result['elapsed_s']:>8.2f} s "
        f"{rate:>9.1f} tok/s{extra}",
        flush=True,
    )


def record_expert_loads(
    path: Path, requests: list[Request], dtype: str, device: str, out: Path
) -> Path:
    """Run `requests` on one worker recording expert loads into `out` (what a deployment
    records on its own traffic before serving with `expert_loads`)."""
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in requests]
    with LLM(str(path), dtype=dtype, device=device, progress=False,
             record_expert_loads=str(out)) as llm:
        llm.generate([p for p, _ in requests], params)
    return out


def titanserve_configs(
    workers: list[int], args: argparse.Namespace, loads_file: Path | None = None
) -> list[tuple[str, int, dict]]:
    """(row label, workers, more `LLM` keywords) of each titanserve configuration timed;
    with `loads_file`, also each worker count above 1 placed by it (copies too)."""

    def label(w: int, note: str = "") -> str:
        return f"titanserve ({w} worker{'s' * (w > 1)}{', ' + note if note else ''})"

    configs = [(label(w), w, {}) for w in workers]
    if args.kv_cache_dtype_too:  # each worker count with the other cache
        kv = args.kv_cache_dtype_too
        configs += [(label(w, f"{kv} KV cache"), w, {"kv_cache_dtype": kv}) for w in workers]
    def with_and_without_copies(extra: dict, note: str) -> list[tuple[dict, str]]:
        return [({**options, **extra}, f"{copy_note + ', ' if copy_note else ''}{note}")
                for options, copy_note in [({}, ""), *copies]]

    # with several workers: copies of experts, and each placement alone and with copies
    # (re-placed while serving, placed by recorded loads); two-batch overlap
    copies = [({"num_redundant_experts": r}, f"{r} redundant expert{'s' * (r > 1)}")
              for r in args.redundant_experts]
    variants = list(copies)
    if args.expert_rebalance_steps:
        steps = args.expert_rebalance_steps
        variants += with_and_without_copies({"expert_rebalance_steps": steps},
                                            f"rebalanced every {steps}")
    if loads_file is not None:
        variants += with_and_without_copies({"expert_loads": str(loads_file)},
                                            "placed by recorded loads")
    if args.two_batch_overlap:
        variants.append(({"two_batch_overlap": True}, "two-batch overlap"))
    configs += [(label(w, note), w, options) for options, note in variants
                for w in workers if w > 1]
    if args.eager_too and args.device == "cuda":
        configs += [(label(w, "eager"), w, {"enforce_eager": True}) for w in workers]
    if args.process_ab and 1 in workers:
        own = EngineConfig(model="-").resolve_worker_processes(torch.device(args.device))
        configs.append((label(1, "in-process" if own else "own process"), 1,
                        {"worker_processes": not own}))
    return configs


def run_rounds(
    path: Path, requests: list[Request], configs: list[tuple[str, int, dict]], dtype: str,
    args: argparse.Namespace, baseline_round=None,
) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """`--repeat` rounds of every titanserve configuration, each round after
    `baseline_round()` (if given), so that all sides sample the same stretch of a host whose
    speed drifts. A configuration that fails is not run again and does not stop the others.
    Returns (label -> its results by round, label -> its failure)."""
    rounds: dict[str, list[dict]] = {label: [] for label, _, _ in configs}
    failed: dict[str, str] = {}
    for round_ in range(args.repeat):
        if args.repeat > 1:
            print(f"  round {round_ + 1}/{args.repeat}", flush=True)
        if baseline_round is not None:
            baseline_round()
        for label, w, options in configs:
            if label in failed:
                continue
            try:
                rounds[label].append(run_titanserve(path, requests, w, dtype, args.device,
                                                    args.big_batch, **options))
            except Exception as e:  # one broken configuration must not hide the others' numbers
                failed[label] = f"FAILED: {type(e).__name__}: {e}"
    return rounds, failed


def outside_compute_text(ts: dict, big_batch: int) -> str:
    """The share of step time outside model compute, and for big-batch steps its parts."""
    text = f"  outside compute {ts['overhead']:.0%}" if ts["overhead"] is not None else ""
    if ts["overhead_big_batch"] is not None:
        text += f" (batch >= {big_batch}: {ts['overhead_big_batch']:.1%}"  # the goal's figure
        parts = ts["parts_big_batch"]
        if parts["all-to-all work"]:  # workers that exchange experts: what it consists of
            text += (f"; all-to-all wait {parts['all-to-all wait']:.0%}, "
                     f"work {parts['all-to-all work']:.0%}; "
                     f"workers' compute apart {ts['compute_apart_big_batch']:.0%}")
        text += ")"
    if ts.get("run_queue_wait") is not None:  # lockstep workers lose what any of them loses
        text += f"  run-queue wait {ts['run_queue_wait']:.1%}"
    return text
