"""Offline throughput: titanserve vs batched `transformers.generate`, same requests, same run.

    python benchmarks/throughput.py [--models tiny-llama tiny-mixtral tiny-qwen2-moe]
                                    [--workers 1 2]
                                    [--num-requests 64] [--hf-batch-sizes 16 32 64] [--smollm2]
                                    [--zoo-size] [--repeat N] [--eager-too] [--process-ab]
                                    [--big-batch 32] [--smollm2-moe] [--redundant-experts N]
                                    [--expert-rebalance-steps N]

64 seeded random requests (prompts of 32-256 tokens, 64-128 output tokens, EOS ignored, greedy)
on tiny fp32 checkpoints from `make_tiny`, scaled up so that model compute is not trivial
(`--zoo-size` keeps the zoo's own hidden 64 / 3 layers: there per-step overhead is nearly all).
transformers runs them in batches with left padding and an attention mask; a batch generates
its longest output, and only the tokens each request asked for are counted. It runs at each
of `--hf-batch-sizes` and the fastest is the baseline (on this CPU, batch 64 beat batch 16 by
25-90%). Prints output tokens/s of both, the ratio, how many greedy tokens agree, and the
share of step time outside model compute; for steps with at least `--big-batch` (32) requests
running, with experts across workers, also the slowest worker's all-to-all time in two parts:
waiting for the others, and the rest (work).
`--repeat N` runs N rounds of all of that, interleaved (a host whose speed drifts then slows both
sides alike); each configuration keeps its best round, and titanserve's line adds its ratio to
each round's fastest transformers. `--smollm2` adds SmolLM2-135M (bf16) decode tok/s at batch 1
and 8; `--smollm2-moe` the demo's 30-layer MoE, titanserve's worker counts against 1 worker
(`--models` may be left empty to time it alone), and each round the host floor for as many
workers (`benchmarks/lockstep_floor.py`: what host noise alone costs processes that meet as
often, the part of the share outside compute that comes from the host, not the engine).
`--redundant-experts N` adds each worker count above 1 with N copies of experts per worker,
`--expert-rebalance-steps N` each with its experts re-placed by their loads every N steps
(copies or not). All run on `--device` (default: CUDA
when there is one). `--eager-too` adds titanserve without CUDA graphs; `--process-ab` adds one
worker placed where it does not run by default (in the engine's process on CUDA, in a process
of its own on CPU).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import lockstep_floor
import torch

from titanserve.core.config import ModelConfig
from titanserve.core.cpu_malloc import tune_malloc
from titanserve.core.engine import outside_compute
from titanserve.core.engine_config import EngineConfig
from titanserve.core.llm import LLM
from titanserve.core.sampling_params import SamplingParams
from titanserve.launcher.tiny_models import make_tiny

# The tiny zoo's models, a bit bigger: (H 256, 4 layers, 8 query / 4 kv heads).
SCALED = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
MODELS = {
    "tiny-llama": ("llama", dict(SCALED, intermediate_size=768)),
    "tiny-mixtral": ("mixtral", dict(SCALED, intermediate_size=384)),
    # every layer MoE, with a shared expert twice an expert's width
    "tiny-qwen2-moe": ("qwen2-moe", dict(SCALED, moe_intermediate_size=384,
                                         shared_expert_intermediate_size=768, mlp_only_layers=[])),
}
Request = tuple[list[int], int]  # (prompt token ids, output tokens)
BIG_BATCH = 32  # the overhead goal is stated for steps with at least this many requests
# `--smollm2-moe` runs benchmarks/lockstep_floor.py each round: compute segments as long as the
# model's between two all-to-alls (~250 ms a step / 60 on the development machine)
FLOOR_SEGMENT_MS, FLOOR_STEPS = 4.0, 40


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
        big_batch_totals = _time_big_batch_steps(engine, big_batch)
        start = time.perf_counter()
        outputs = llm.generate([p for p, _ in requests], params)
        elapsed = time.perf_counter() - start
        big_share, big_parts = outside_compute(*big_batch_totals)
        wall = big_batch_totals[0]
        return {
            "elapsed_s": elapsed,
            "tokens": sum(len(o.token_ids) for o in outputs),
            "token_ids": [o.token_ids for o in outputs],
            "overhead": engine.overhead_fraction,
            "overhead_big_batch": big_share if wall else None,
            # of it, the slowest worker in all-to-alls: waiting for the others, and the rest
            "parts_big_batch": big_parts,
        }
    finally:
        llm.shutdown()


def _time_big_batch_steps(engine, min_batch: int = BIG_BATCH) -> list[float]:
    """[wall, model compute, all-to-all time, of it waiting] summed over engine steps taken
    with >= min_batch requests running (the tail of a run, where few are left, has shorter
    steps); the last two are the slowest worker's (see `Engine.overhead_parts`)."""
    totals = [0.0, 0.0, 0.0, 0.0]
    step = engine.step

    def counters() -> tuple[float, float, float]:
        return engine.compute_time_s, engine.comm_time_s, engine.comm_wait_time_s

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


@torch.inference_mode()
def run_hf(
    path: Path, requests: list[Request], batch_size: int, dtype: str, device: str
) -> dict:
    """Time batched `transformers.generate` (left padding, attention mask, greedy, no EOS)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype)
    ).to(device).eval()
    model.generation_config.eos_token_id = None  # ignore EOS, like ignore_eos=True

    def generate(batch: list[Request]) -> list[list[int]]:
        width = max(len(p) for p, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)  # (B, S) left-padded with 0
        mask = torch.zeros(len(batch), width, dtype=torch.long)  # (B, S)
        for row, (prompt, _) in enumerate(batch):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max(n for _, n in batch),
            do_sample=False,
            pad_token_id=0,
        )  # (B, S + new)
        return [out[row, width : width + n].tolist() for row, (_, n) in enumerate(batch)]

    generate([(requests[0][0][:16], 2)])  # warm-up
    start, token_ids = time.perf_counter(), []
    for i in range(0, len(requests), batch_size):
        token_ids += generate(requests[i : i + batch_size])
    elapsed = time.perf_counter() - start
    return {"elapsed_s": elapsed, "tokens": sum(map(len, token_ids)), "token_ids": token_ids}


def _fastest(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["elapsed_s"])


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of tokens in the common greedy prefix of each request pair."""
    same = total = 0
    for x, y in zip(a, b):
        total += max(len(x), len(y))
        same += next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
    return same / total if total else 1.0


def _row(label: str, result: dict, extra: str = "") -> None:
    rate = result["tokens"] / result["elapsed_s"]
    print(
        f"  {label:<44}{result['tokens']:>7} tok {result['elapsed_s']:>8.2f} s "
        f"{rate:>9.1f} tok/s{extra}",
        flush=True,
    )


def titanserve_configs(workers: list[int], args: argparse.Namespace) -> list[tuple[str, int, dict]]:
    """(row label, workers, more `LLM` keywords) of each titanserve configuration timed."""

    def label(w: int, note: str = "") -> str:
        return f"titanserve ({w} worker{'s' * (w > 1)}{', ' + note if note else ''})"

    configs = [(label(w), w, {}) for w in workers]
    # with several workers: copies of experts, expert re-placement, and both
    variants = [({"num_redundant_experts": r}, f"{r} redundant expert{'s' * (r > 1)}")
                for r in args.redundant_experts]
    if args.expert_rebalance_steps:
        steps = args.expert_rebalance_steps
        variants += [({**options, "expert_rebalance_steps": steps},
                      f"{note + ', ' if note else ''}rebalanced every {steps}")
                     for options, note in [({}, ""), *variants]]
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


def bench_tiny(name: str, workers: list[int], args: argparse.Namespace, tmp: Path) -> None:
    """One tiny model: `--repeat` rounds, each running transformers at every batch size and then
    titanserve at every worker count, so that both sides sample the same stretch of a host whose
    speed drifts; each configuration keeps its best round."""
    family, overrides = MODELS[name]
    path = make_tiny(family, tmp / name, **({} if args.zoo_size else overrides))
    config = json.loads((path / "config.json").read_text())
    requests = make_requests(args.num_requests, config["vocab_size"], (32, 256), (64, 128),
                             args.seed)
    n_in = sum(len(p) for p, _ in requests)
    print(f"\n{name} (fp32, hidden {config['hidden_size']}, {config['num_hidden_layers']} "
          f"layers, {len(requests)} requests, {n_in} prompt tokens)", flush=True)
    configs = titanserve_configs(workers, args)
    hf_rounds: dict[int, list[dict]] = {b: [] for b in args.hf_batch_sizes}

    def transformers_round() -> None:
        for batch_size in args.hf_batch_sizes:
            hf_rounds[batch_size].append(run_hf(path, requests, batch_size, "float32",
                                                args.device))

    ts_rounds, failed = run_rounds(path, requests, configs, "float32", args, transformers_round)
    best = {b: _fastest(runs) for b, runs in hf_rounds.items()}
    for batch_size, run in best.items():
        _row(f"transformers (batch {batch_size})", run)
    hf = _fastest(list(best.values()))  # the fastest batch size is the baseline
    hf_rate = hf["tokens"] / hf["elapsed_s"]
    # per round: titanserve against that round's fastest transformers batch size
    hf_per_round = [min(runs[i]["elapsed_s"] for runs in hf_rounds.values())
                    for i in range(args.repeat)]
    for label, runs in ts_rounds.items():
        if label in failed:
            print(f"  {label:<44}{failed[label]}", flush=True)
            continue
        ts = _fastest(runs)
        extra = f"  x{ts['tokens'] / ts['elapsed_s'] / hf_rate:.2f} vs best HF"
        if len(runs) > 1:
            extra += " (rounds " + " / ".join(
                f"x{h / r['elapsed_s']:.2f}" for h, r in zip(hf_per_round, runs)) + ")"
        extra += f"  agree {agreement(ts['token_ids'], hf['token_ids']):.0%}"
        _row(label, ts, extra + _outside_compute(ts, args.big_batch))


def _outside_compute(ts: dict, big_batch: int) -> str:
    """The share of step time outside model compute, and for big-batch steps its parts."""
    text = f"  outside compute {ts['overhead']:.0%}" if ts["overhead"] is not None else ""
    if ts["overhead_big_batch"] is not None:
        text += f" (batch >= {big_batch}: {ts['overhead_big_batch']:.0%}"
        parts = ts["parts_big_batch"]
        if parts["all-to-all work"]:  # workers that exchange experts: what it consists of
            text += (f"; all-to-all wait {parts['all-to-all wait']:.0%}, "
                     f"work {parts['all-to-all work']:.0%}")
        text += ")"
    return text


def bench_smollm2_moe(args: argparse.Namespace, tmp: Path) -> None:
    """The demo's SmolLM2 8-expert MoE (bf16, hidden 576, 30 layers), titanserve only: its
    expert matmuls bound the step, as in real MoE models, unlike the tiny ones'. Each worker
    count (and copies of experts, with `--redundant-experts`) against 1 worker, same run.
    transformers is left out: its bf16 Mixtral takes minutes a batch size on a CPU."""
    from titanserve.launcher.smollm2_models import make_smollm2_moe

    try:
        path = make_smollm2_moe(tmp / "smollm2-moe")
    except (FileNotFoundError, ValueError) as e:
        print(f"\nsmollm2-moe: skipped ({e})")
        return
    requests = make_requests(args.num_requests, 49152, (32, 128), (48, 64), args.seed)
    print(f"\nsmollm2-moe (bf16, 8 experts top-2, hidden 576, 30 layers, {len(requests)} "
          f"requests, {sum(len(p) for p, _ in requests)} prompt tokens)", flush=True)
    configs = titanserve_configs(args.workers, args)
    floors: list[dict] = []  # what the host alone costs workers that meet as often, by round
    floor_args = argparse.Namespace(
        meetings=2 * len(ModelConfig.from_hf(path).moe_layers),  # an all-to-all each way
        segment_ms=FLOOR_SEGMENT_MS, steps=FLOOR_STEPS,
    )
    world = max(args.workers)
    rounds, failed = run_rounds(
        path, requests, configs, "bfloat16", args,
        (lambda: floors.append(lockstep_floor.run_round(world, floor_args))) if world > 1 else None,
    )  # fmt: skip
    if floors:
        shares = " / ".join(f"{f['outside']:.0%} (waiting {f['wait']:.0%})" for f in floors)
        print(f"  host floor, {world} processes meeting {floor_args.meetings} times a step "
              f"(benchmarks/lockstep_floor.py): outside compute {shares}", flush=True)
    base_label = configs[0][0]
    base = None if base_label in failed else _fastest(rounds[base_label])
    for label, runs in rounds.items():
        if label in failed:
            print(f"  {label:<44}{failed[label]}", flush=True)
            continue
        ts = _fastest(runs)
        ratio = f"  x{base['elapsed_s'] / ts['elapsed_s']:.2f} vs {base_label}" if base else ""
        _row(label, ts, ratio + _outside_compute(ts, args.big_batch))


def bench_smollm2(args: argparse.Namespace, tmp: Path) -> None:
    """SmolLM2-135M bf16: decode tok/s at batch 1 and 8, titanserve (1 worker) vs transformers."""
    from titanserve.launcher.smollm2_models import make_smollm2

    try:
        path = make_smollm2(tmp / "smollm2", dtype="bfloat16")
    except (FileNotFoundError, ValueError) as e:
        print(f"\nsmollm2: skipped ({e})")
        return
    print("\nsmollm2-135M (bf16, 32 prompt tokens, 64 output tokens)", flush=True)
    for batch in (1, 8):
        requests = make_requests(batch, 49152, (32, 32), (64, 64), args.seed)
        rounds = [(run_hf(path, requests, batch, "bfloat16", args.device),
                   run_titanserve(path, requests, 1, "bfloat16", args.device))
                  for _ in range(args.repeat)]  # interleaved, as in bench_tiny
        hf, ts = (_fastest(list(side)) for side in zip(*rounds))
        _row(f"transformers b{batch}", hf)
        ratio = (ts["tokens"] / ts["elapsed_s"]) / (hf["tokens"] / hf["elapsed_s"])
        _row(f"titanserve b{batch}", ts, f"  x{ratio:.2f} vs HF")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints a table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=["tiny-llama", "tiny-mixtral"],
                        choices=list(MODELS))
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--hf-batch-sizes", nargs="+", type=int, default=[16, 32, 64],
                        help="transformers batch sizes tried; the fastest is the baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--big-batch", type=int, default=BIG_BATCH,
                        help="steps with at least this many requests running count as big "
                             "(the overhead goal's condition)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds, interleaved; each configuration keeps its best (noisy hosts)")
    parser.add_argument("--smollm2", action="store_true", help="add SmolLM2-135M bf16 b1/b8")
    parser.add_argument("--smollm2-moe", action="store_true",
                        help="add the demo's SmolLM2 MoE (bf16, 30 layers), titanserve only")
    parser.add_argument("--redundant-experts", nargs="*", type=int, default=[],
                        help="with several workers, also time each with this many copies of "
                             "experts per worker (num_redundant_experts)")
    parser.add_argument("--expert-rebalance-steps", type=int, default=0,
                        help="with several workers, also time each with experts re-placed by "
                             "their loads every N steps (expert_rebalance_steps), copies too")
    parser.add_argument("--zoo-size", action="store_true",
                        help="the tiny zoo's own sizes (hidden 64, 3 layers), not scaled up")
    parser.add_argument("--eager-too", action="store_true",
                        help="on CUDA, also time titanserve without CUDA graphs")
    parser.add_argument("--process-ab", action="store_true",
                        help="with 1 worker, also time it where it does not run by default: in "
                             "the engine's process on CUDA, in a process of its own on CPU")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where both engines run (default: cuda when there is one)")
    args = parser.parse_args(argv)
    if min(args.repeat, args.num_requests, args.big_batch) < 1 or not args.hf_batch_sizes:
        parser.error("--repeat, --num-requests and --big-batch must be >= 1 and "
                     "--hf-batch-sizes non-empty")
    if any(r < 1 for r in args.redundant_experts) or args.expert_rebalance_steps < 0:
        parser.error("--redundant-experts takes counts >= 1, --expert-rebalance-steps >= 0")
    # The engine fixes glibc's malloc thresholds when it starts; do it first, so that
    # transformers runs under the same allocator settings.
    tuned = tune_malloc()
    print(
        f"torch {torch.__version__}, {args.device}"
        f"{' ' + torch.cuda.get_device_name() if args.device == 'cuda' else ''}, "
        f"{torch.get_num_threads()} threads, "
        f"malloc thresholds fixed for both: {tuned}",
        flush=True,
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="titanserve-bench-") as tmp:
        for name in args.models:
            bench_tiny(name, args.workers, args, Path(tmp))
        if args.smollm2:
            bench_smollm2(args, Path(tmp))
        if args.smollm2_moe:
            bench_smollm2_moe(args, Path(tmp))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
