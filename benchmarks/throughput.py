"""Offline throughput: titanserve vs batched `transformers.generate`, same requests, same run.

    python benchmarks/throughput.py [--models tiny-llama tiny-mixtral tiny-qwen2-moe
                                              tiny-qwen3-moe] [--workers 1 2]
                                    [--num-requests 64] [--hf-batch-sizes 16 32 64] [--smollm2]
                                    [--zoo-size] [--repeat N] [--eager-too] [--process-ab]
                                    [--big-batch 32] [--smollm2-moe] [--redundant-experts N]
                                    [--expert-rebalance-steps N] [--two-batch-overlap]
                                    [--kv-cache-dtype-too bfloat16] [--recorded-expert-loads]

64 seeded random requests (prompts of 32-256 tokens, 64-128 output tokens, EOS ignored, greedy)
on tiny fp32 checkpoints from `make_tiny`, scaled up so that model compute is not trivial
(`--zoo-size` keeps the zoo's own hidden 64 / 3 layers: there per-step overhead is nearly all).
transformers runs them in batches with left padding and an attention mask; a batch generates
its longest output, and only the tokens each request asked for are counted. It runs at each
of `--hf-batch-sizes` and the fastest is the baseline (on this CPU, batch 64 beat batch 16 by
25-90%). Prints output tokens/s of both, the ratio, how many greedy tokens agree, and the
share of step time outside model compute; for steps with at least `--big-batch` (32) requests
running, with experts across workers, also the slowest worker's all-to-all time in two parts:
waiting for the others, and the rest (work), and how far apart the workers' compute is (how
much less the fastest computed than the slowest). Last on each titanserve line, where Linux says
(schedstat): the run-queue wait, the largest share of the run that a model thread sat ready to
run while something else (the engine, a host daemon) had its core; lockstep workers all lose it.
`--repeat N` runs N rounds of all of that, interleaved (a host whose speed drifts then slows both
sides alike); each configuration keeps its best round, and titanserve's line adds its ratio to
each round's fastest transformers. `--smollm2` adds SmolLM2-135M (bf16) decode tok/s at batch 1
and 8; `--smollm2-moe` the demo's 30-layer MoE, titanserve's worker counts against 1 worker
(`--models` may be left empty to time it alone), and each round the host floor for as many
workers (`benchmarks/lockstep_floor.py`: what host noise alone costs processes that meet as
often, the part of the share outside compute that comes from the host, not the engine).
`--redundant-experts N` adds each worker count above 1 with N copies of experts per worker,
`--expert-rebalance-steps N` each with its experts re-placed by their loads every N steps
(copies or not), `--recorded-expert-loads` each placed from the start by the loads that one
worker recorded on other requests of the same shapes (seed + 1; copies or not),
`--two-batch-overlap` each with steps of two micro-batches (one's all-to-alls
in flight while the other computes), `--kv-cache-dtype-too D` each worker count with the KV
cache in dtype D (the default, auto, is fp32 on CPU). All run on `--device` (default: CUDA
when there is one). `--eager-too` adds titanserve without CUDA graphs; `--process-ab` adds one
worker placed where it does not run by default (in the engine's process on CUDA, in a process
of its own on CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import lockstep_floor
import torch
from titanserve_runs import (
    BIG_BATCH,
    Request,
    fastest,
    make_requests,
    outside_compute_text,
    print_row,
    record_expert_loads,
    run_rounds,
    run_titanserve,
    titanserve_configs,
)

from titanserve.core.config import ModelConfig
from titanserve.core.cpu_malloc import tune_malloc
from titanserve.launcher.tiny_models import make_tiny

# The tiny zoo's models, a bit bigger: (H 256, 4 layers, 8 query / 4 kv heads).
SCALED = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
MODELS = {
    "tiny-llama": ("llama", dict(SCALED, intermediate_size=768)),
    "tiny-mixtral": ("mixtral", dict(SCALED, intermediate_size=384)),
    # every layer MoE, with a shared expert twice an expert's width
    "tiny-qwen2-moe": ("qwen2-moe", dict(SCALED, moe_intermediate_size=384,
                                         shared_expert_intermediate_size=768, mlp_only_layers=[])),
    # fine-grained experts, as Qwen3-30B-A3B's (128 top-8, 3/8 of the hidden size wide)
    "tiny-qwen3-moe": ("qwen3-moe", dict(SCALED, num_experts=64, num_experts_per_tok=8,
                                         moe_intermediate_size=96, mlp_only_layers=[])),
}
# `--smollm2-moe` runs benchmarks/lockstep_floor.py each round: compute segments as long as the
# model's between two all-to-alls (~250 ms a step / 60 on the development machine)
FLOOR_SEGMENT_MS, FLOOR_STEPS = 4.0, 40


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


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of tokens in the common greedy prefix of each request pair."""
    same = total = 0
    for x, y in zip(a, b):
        total += max(len(x), len(y))
        same += next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
    return same / total if total else 1.0


def recorded_loads(
    path: Path, dtype: str, args: argparse.Namespace, requests: list[Request]
) -> Path | None:
    """With `--recorded-expert-loads` and a MoE model: its expert loads, recorded with one
    worker on `requests` (other than the timed ones), for the `expert_loads` rows."""
    if not (args.recorded_expert_loads and ModelConfig.from_hf(path).num_experts):
        return None
    return record_expert_loads(path, requests, dtype, args.device, path / "expert-loads.json")


def bench_tiny(name: str, workers: list[int], args: argparse.Namespace, tmp: Path) -> None:
    """One tiny model: `--repeat` rounds, each running transformers at every batch size and then
    titanserve at every worker count, so that both sides sample the same stretch of a host whose
    speed drifts; each configuration keeps its best round."""
    family, overrides = MODELS[name]
    path = make_tiny(family, tmp / name, **({} if args.zoo_size else overrides))
    config = json.loads((path / "config.json").read_text())
    def requests_of(seed: int) -> list[Request]:
        return make_requests(args.num_requests, config["vocab_size"], (32, 256), (64, 128), seed)

    requests = requests_of(args.seed)
    n_in = sum(len(p) for p, _ in requests)
    print(f"\n{name} (fp32, hidden {config['hidden_size']}, {config['num_hidden_layers']} "
          f"layers, {len(requests)} requests, {n_in} prompt tokens)", flush=True)
    loads = recorded_loads(path, "float32", args, requests_of(args.seed + 1))
    configs = titanserve_configs(workers, args, loads)
    hf_rounds: dict[int, list[dict]] = {b: [] for b in args.hf_batch_sizes}

    def transformers_round() -> None:
        for batch_size in args.hf_batch_sizes:
            hf_rounds[batch_size].append(run_hf(path, requests, batch_size, "float32",
                                                args.device))

    ts_rounds, failed = run_rounds(path, requests, configs, "float32", args, transformers_round)
    best = {b: fastest(runs) for b, runs in hf_rounds.items()}
    for batch_size, run in best.items():
        print_row(f"transformers (batch {batch_size})", run)
    hf = fastest(list(best.values()))  # the fastest batch size is the baseline
    hf_rate = hf["tokens"] / hf["elapsed_s"]
    # per round: titanserve against that round's fastest transformers batch size
    hf_per_round = [min(runs[i]["elapsed_s"] for runs in hf_rounds.values())
                    for i in range(args.repeat)]
    for label, runs in ts_rounds.items():
        if label in failed:
            print(f"  {label:<44}{failed[label]}", flush=True)
            continue
        ts = fastest(runs)
        extra = f"  x{ts['tokens'] / ts['elapsed_s'] / hf_rate:.2f} vs best HF"
        if len(runs) > 1:
            extra += " (rounds " + " / ".join(
                f"x{h / r['elapsed_s']:.2f}" for h, r in zip(hf_per_round, runs)) + ")"
        extra += f"  agree {agreement(ts['token_ids'], hf['token_ids']):.0%}"
        print_row(label, ts, extra + outside_compute_text(ts, args.big_batch))


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
    def requests_of(seed: int) -> list[Request]:
        return make_requests(args.num_requests, 49152, (32, 128), (48, 64), seed)

    requests = requests_of(args.seed)
    print(f"\nsmollm2-moe (bf16, 8 experts top-2, hidden 576, 30 layers, {len(requests)} "
          f"requests, {sum(len(p) for p, _ in requests)} prompt tokens)", flush=True)
    loads = recorded_loads(path, "bfloat16", args, requests_of(args.seed + 1))
    configs = titanserve_configs(args.workers, args, loads)
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
        shares = " / ".join(f"{f['outside']:.0%} (waiting {f['wait']:.0%}"
                            f"{lockstep_floor.run_queue_text(f['run_queue'])}, "
                            f"compute apart {f['apart']:.0%})" for f in floors)
        print(f"  host floor, {world} processes meeting {floor_args.meetings} times a step "
              f"(benchmarks/lockstep_floor.py): outside compute {shares}", flush=True)
    base_label = configs[0][0]
    base = None if base_label in failed else fastest(rounds[base_label])
    for label, runs in rounds.items():
        if label in failed:
            print(f"  {label:<44}{failed[label]}", flush=True)
            continue
        ts = fastest(runs)
        ratio = f"  x{base['elapsed_s'] / ts['elapsed_s']:.2f} vs {base_label}" if base else ""
        print_row(label, ts, ratio + outside_compute_text(ts, args.big_batch))


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
        hf, ts = (fastest(list(side)) for side in zip(*rounds))
        print_row(f"transformers b{batch}", hf)
        ratio = (ts["tokens"] / ts["elapsed_s"]) / (hf["tokens"] / hf["elapsed_s"])
        print_row(f"titanserve b{batch}", ts, f"  x{ratio:.2f} vs HF")


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
    parser.add_argument("--kv-cache-dtype-too", choices=["float32", "bfloat16", "float16"],
                        help="add each worker count with the KV cache in this dtype")
    parser.add_argument("--recorded-expert-loads", action="store_true",
                        help="add each worker count above 1 (copies too) with experts placed "
                             "by loads recorded on other requests (seed + 1) with 1 worker")
    parser.add_argument("--two-batch-overlap", action="store_true",
                        help="add each worker count above 1 with two-batch overlap")
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
