"""`titanserve generate`, `chat` and `bench`: the offline engine behind a command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from titanserve.launcher.cli import UsageError

# EngineConfig fields that engine flags set (a flag left out keeps the engine's default).
ENGINE_FIELDS = (
    "dtype",
    "num_workers",
    "max_num_batched_tokens",
    "max_num_seqs",
    "max_model_len",
    "block_size",
    "kv_cache_memory",
    "num_kv_blocks",
    "kv_cache_dtype",
    "enable_prefix_caching",
    "async_scheduling",
    "comm",
    "num_redundant_experts",
    "expert_rebalance_steps",
    "expert_loads",
    "record_expert_loads",
    "two_batch_overlap",
    "sp_threshold",
    "num_threads",
    "bind_cpu_cores",
    "device",
    "worker_processes",
    "warmup",
    "enforce_eager",
    "seed",
)


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The `LLM(...)` keywords of the engine flags the user gave."""
    return {f: getattr(args, f) for f in ENGINE_FIELDS if getattr(args, f, None) is not None}


def open_engine(args: argparse.Namespace, **overrides):
    """An `LLM` for `args.model` with the given engine flags (checks the path first)."""
    path = Path(args.model).expanduser()
    if not path.exists():
        raise UsageError(
            f"model path {args.model!r} does not exist; "
            "build one with `titanserve make-model tiny-llama --out DIR`"
        )
    if path.is_dir() and not (path / "config.json").exists():
        raise UsageError(f"{args.model!r} is not a checkpoint folder (no config.json)")
    from titanserve.core.llm import LLM

    return LLM(str(path), **{**engine_kwargs(args), **overrides})


def sampling_params(args: argparse.Namespace, **extra):
    """SamplingParams from the sampling flags."""
    from titanserve.core.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        **extra,
    )


def _stats(num_requests: int, num_tokens: int, elapsed_s: float) -> str:
    rate = num_tokens / elapsed_s if elapsed_s > 0 else 0.0
    return (
        f"titanserve: {num_requests} request(s), {num_tokens} tokens "
        f"in {elapsed_s:.2f} s ({rate:.1f} tok/s)"
    )


# ---------------------------------------------------------------------- generate
def generate(args: argparse.Namespace) -> int:
    """Complete every `--prompt`; print the completions (streamed with `--stream`)."""
    params = sampling_params(args)
    llm = open_engine(args)
    try:
        start, num_tokens = time.perf_counter(), 0
        many = len(args.prompt) > 1
        if args.stream:
            for i, prompt in enumerate(args.prompt):
                if many:
                    print(f"=== {i}: {prompt}", flush=True)
                for delta in llm.stream(prompt, params):
                    num_tokens += len(delta.new_token_ids)
                    print(delta.new_text, end="", flush=True)
                print(flush=True)
        else:
            for i, (prompt, out) in enumerate(zip(args.prompt, llm.generate(args.prompt, params))):
                num_tokens += len(out.token_ids)
                if many:
                    print(f"=== {i}: {prompt}")
                print(out.text, flush=True)
        print(_stats(len(args.prompt), num_tokens, time.perf_counter() - start), file=sys.stderr)
    finally:
        llm.shutdown()
    return 0


# ---------------------------------------------------------------------- chat
def chat(args: argparse.Namespace) -> int:
    """Chat through the model's template: one `--message`, or a REPL on stdin."""
    params = sampling_params(args)
    llm = open_engine(args)
    try:
        if llm.tokenizer is None or not llm.tokenizer.chat_template:
            raise UsageError(f"{args.model} has no chat template; use `titanserve generate`")
        system = [{"role": "system", "content": args.system}] if args.system else []
        if args.message is not None:
            reply(llm, [*system, {"role": "user", "content": args.message}], params)
            return 0
        _repl(llm, system, params)
    finally:
        llm.shutdown()
    return 0


def reply(llm, messages: list[dict], params) -> str:
    """Stream the assistant's answer to `messages` to stdout; returns its text."""
    text = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    token_ids = llm.tokenizer.encode(text, add_special_tokens=False)
    parts = []
    for delta in llm.stream(token_ids, params):
        parts.append(delta.new_text)
        print(delta.new_text, end="", flush=True)
    print(flush=True)
    return "".join(parts)


def _repl(llm, system: list[dict], params) -> None:
    from titanserve.core.errors import InvalidRequest

    interactive = sys.stdin.isatty()
    if interactive:
        print("titanserve chat: /reset starts over, /exit or Ctrl-D quits", file=sys.stderr)
    messages = list(system)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            if interactive:
                print()
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            messages = list(system)
            continue
        messages.append({"role": "user", "content": text})
        try:
            answer = reply(llm, messages, params)
        except InvalidRequest as e:  # e.g. the conversation outgrew the context
            print(f"titanserve: error: {e} (/reset starts over)", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": answer})


# ---------------------------------------------------------------------- bench
def bench(args: argparse.Namespace) -> int:
    """Offline throughput on random prompts: tokens/s, requests/s, mean TTFT."""
    import torch

    from titanserve.core.sampling_params import SamplingParams

    llm = open_engine(args)
    try:
        vocab = llm.engine.model_config.vocab_size
        generator = torch.Generator().manual_seed(args.seed)
        shape = (args.num_requests, args.input_len)
        prompts = torch.randint(0, vocab, shape, generator=generator).tolist()
        params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
        warmup = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        llm.generate([prompts[0][:8]], warmup)  # one-time costs stay out of the timing
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=True)
        elapsed = time.perf_counter() - start
    finally:
        llm.shutdown()
    out_tokens = sum(len(o.token_ids) for o in outputs)
    ttfts = [o.time_to_first_token_s for o in outputs if o.time_to_first_token_s is not None]
    mean_ttft_ms = 1000 * sum(ttfts) / len(ttfts) if ttfts else float("nan")
    rows = [
        ("requests", f"{len(outputs)}"),
        ("input/output tokens", f"{args.num_requests * args.input_len} / {out_tokens}"),
        ("elapsed", f"{elapsed:.2f} s"),
        ("requests/s", f"{len(outputs) / elapsed:.2f}"),
        ("output tokens/s", f"{out_tokens / elapsed:.1f}"),
        ("total tokens/s", f"{(out_tokens + args.num_requests * args.input_len) / elapsed:.1f}"),
        ("mean TTFT", f"{mean_ttft_ms:.1f} ms"),
    ]
    for name, value in rows:
        print(f"{name + ':':<22}{value}")
    return 0
