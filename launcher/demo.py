"""`make demo`: SmolLM2 upcycled to an 8-expert top-2 Mixtral, answering three chat prompts.

    python -m titanserve.launcher.demo [--num-workers 2] [--max-tokens 60] [--dtype ...]

The model is built once into `$TITANSERVE_CACHE/models/smollm2-moe` (default cache:
`~/.cache/titanserve`) and reused while its marker file matches. Answers stream token by
token; a summary (requests, tokens, tok/s, mean time to first token, wall time) ends it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from importlib.util import find_spec
from pathlib import Path

PROMPTS = (
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a Python function that returns the sum of a list of numbers.",
)
MODEL_SPEC = {"family": "smollm2-moe", "experts": 8, "top_k": 2, "noise": 0.0, "seed": 0}
MARKER = ".titanserve-demo.json"
DEMO_KV_CACHE_BYTES = 256 << 20


def cache_root() -> Path:
    """`$TITANSERVE_CACHE`, else `~/.cache/titanserve`."""
    env = os.environ.get("TITANSERVE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "titanserve"


def ensure_model(dtype: str = "bfloat16") -> Path:
    """The demo checkpoint folder: reused when its marker matches, else built (≈30 s)."""
    out = cache_root() / "models" / "smollm2-moe"
    spec = {**MODEL_SPEC, "dtype": dtype}
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return out
    from titanserve.launcher.smollm2_models import make_smollm2_moe

    print(f"building {out} (once) ...", file=sys.stderr, flush=True)
    staging = out.with_name(f"{out.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    make_smollm2_moe(
        staging, spec["experts"], spec["top_k"], spec["noise"], spec["seed"], dtype=dtype
    )
    (staging / MARKER).write_text(json.dumps(spec))  # written last: the folder is complete
    shutil.rmtree(out, ignore_errors=True)  # a stale or half-built copy
    staging.rename(out)
    return out


def resolve_num_workers(requested: int) -> int:
    """`requested`, or 1 (with a note) when this build has no multi-worker executor."""
    if requested > 1 and find_spec("titanserve.core.multiproc_executor") is None:
        print("note: multi-worker executor not available; running 1 worker", file=sys.stderr)
        return 1
    return requested


def start_engine(model: Path, num_workers: int, dtype: str):
    """(LLM, workers it runs). A multi-worker engine is tried on a two-token request first;
    one that fails to start or to step falls back to 1 worker, saying why on stderr."""
    from titanserve.core.llm import LLM
    from titanserve.core.sampling_params import SamplingParams

    # One answer streams at a time: 256 MiB of KV cache a worker (~5.8k tokens here) is plenty,
    # where a share of free memory is GBs, all zeroed at start (slowly on a VM, where the
    # first touch of fresh memory is what costs).
    kwargs = dict(dtype=dtype, max_model_len=1024, kv_cache_memory=DEMO_KV_CACHE_BYTES)
    if num_workers == 1:
        return LLM(str(model), num_workers=1, **kwargs), 1
    llm = None
    try:
        llm = LLM(str(model), num_workers=num_workers, **kwargs)
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0.0))
        return llm, num_workers
    except Exception as e:  # reported below; the demo goes on with 1 worker
        if llm is not None:
            llm.shutdown()
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        print(f"note: {num_workers} workers failed ({reason}); running 1 worker", file=sys.stderr)
        return LLM(str(model), num_workers=1, **kwargs), 1


def run_demo(model: Path, num_workers: int, max_tokens: int, dtype: str) -> dict:
    """Stream answers to PROMPTS; returns the summary numbers."""
    from titanserve.core.sampling_params import SamplingParams

    load_start = time.perf_counter()
    llm, num_workers = start_engine(model, num_workers, dtype)
    load_s = time.perf_counter() - load_start
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    num_tokens, ttfts, gen_s = 0, [], 0.0
    try:
        for prompt in PROMPTS:
            print(f"\n>>> {prompt}\n", flush=True)
            text = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            token_ids = llm.tokenizer.encode(text, add_special_tokens=False)
            start, first = time.perf_counter(), None
            for delta in llm.stream(token_ids, params):
                if first is None and delta.new_token_ids:
                    first = time.perf_counter()
                num_tokens += len(delta.new_token_ids)
                print(delta.new_text, end="", flush=True)
            gen_s += time.perf_counter() - start
            ttfts.append((first or time.perf_counter()) - start)
            print(flush=True)
    finally:
        llm.shutdown()
    return {
        "requests": len(PROMPTS),
        "tokens": num_tokens,
        "gen_s": gen_s,
        "ttft_s": sum(ttfts) / len(ttfts),
        "load_s": load_s,
        "workers": num_workers,
    }


def print_summary(stats: dict, wall_s: float) -> None:
    """The closing table."""
    rate = stats["tokens"] / stats["gen_s"] if stats["gen_s"] > 0 else 0.0
    print("\n--- summary ---")
    print(f"workers:              {stats['workers']}")
    print(f"requests:             {stats['requests']}")
    print(f"generated tokens:     {stats['tokens']}")
    print(f"throughput:           {rate:.1f} tok/s")
    print(f"mean time to first:   {1000 * stats['ttft_s']:.0f} ms")
    print(f"engine start:         {stats['load_s']:.1f} s")
    print(f"wall time:            {wall_s:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m titanserve.launcher.demo`."""
    parser = argparse.ArgumentParser(prog="titanserve-demo", description=__doc__.split("\n")[0])
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=60)
    # fp32 by default: the model's first token for the first prompt ("The" / "L'") is 0.1
    # logits apart at ~25, under bf16's step there (0.125), so bf16 arithmetic answers it one
    # way or the other with the batch layout; the checkpoint stays bf16, widened exactly.
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args(argv)
    wall_start = time.perf_counter()
    try:
        model = ensure_model()
        num_workers = resolve_num_workers(args.num_workers)
        stats = run_demo(model, num_workers, args.max_tokens, args.dtype)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError) as e:  # no GGUF package, bad setting
        print(f"titanserve-demo: error: {e}", file=sys.stderr)
        return 2
    print_summary(stats, time.perf_counter() - wall_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
