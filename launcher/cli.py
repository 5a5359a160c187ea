"""The `titanserve` command line, in DeepSpeed's style:

    titanserve [--num_workers N] [--hostfile H] [--include ...] [--exclude ...]
               [--master_addr A] [--master_port P] [--node_rank R] <command> ...

Commands: make-model, generate, chat, bench, keygen, serve. Command modules are imported only
when their command runs, so `--help` and flag mistakes answer without importing torch.
User mistakes print one line `titanserve: error: ...` and exit 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Sequence

from titanserve.core.errors import TitanserveError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
MODEL_CHOICES = (
    "tiny-llama",
    "tiny-qwen2",
    "tiny-qwen3",
    "tiny-mixtral",
    "tiny-qwen2-moe",
    "tiny-qwen3-moe",
    "smollm2",
    "smollm2-moe",
)
_MEMORY = re.compile(r"^\s*([0-9.eE+-]+)\s*([kKmMgG]i?[bB]?|[bB])?\s*$")
_MEMORY_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
MULTINODE_FLAGS = ("hostfile", "include", "exclude", "master_addr", "master_port", "node_rank")


class UsageError(TitanserveError):
    """A mistake on the command line; main() prints it as one `titanserve: error:` line."""


class _Parser(argparse.ArgumentParser):
    # NOTE: argparse prints usage plus an error and exits; we want exactly one line instead.
    # Sub-parsers inherit this class (add_subparsers uses type(self) by default).
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# ---------------------------------------------------------------------- argument types
def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a float >= 0."""
    value = _number(float, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def memory_size(text: str) -> float:
    """argparse type: bytes (`2GiB`, `512MB`, `1e9`) or a fraction of free memory (`0.3`)."""
    match = _MEMORY.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a size like 0.3, 512MiB or 2GB, got {text!r}")
    number, unit = match.groups()
    value = _number(float, number) * _MEMORY_UNITS[(unit or "").lower().removesuffix("b")]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _number(kind: type, text: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


# ---------------------------------------------------------------------- parser
def _engine_flags() -> argparse.ArgumentParser:
    """Flags that map one to one onto EngineConfig fields (None: the engine's default)."""
    p = _Parser(add_help=False)
    g = p.add_argument_group("engine")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    g.add_argument("--num-workers", type=positive_int, dest="num_workers")
    g.add_argument("--max-num-batched-tokens", type=positive_int)
    g.add_argument("--max-num-seqs", type=positive_int)
    g.add_argument("--max-model-len", type=positive_int)
    g.add_argument("--block-size", type=positive_int)
    g.add_argument(
        "--kv-cache-memory",
        type=memory_size,
        help="KV cache size: bytes (e.g. 2GiB) or a fraction of free memory (e.g. 0.3)",
    )
    g.add_argument("--num-kv-blocks", type=positive_int, help="exact KV blocks per worker")
    g.add_argument(
        "--kv-cache-dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="auto (default): float32 on CPU, where decode attention reads it in place; the "
        "model's dtype on GPU",
    )
    g.add_argument(
        "--no-prefix-caching",
        dest="enable_prefix_caching",
        action="store_const",
        const=False,
        default=None,
    )
    g.add_argument(
        "--no-async-scheduling",
        dest="async_scheduling",
        action="store_const",
        const=False,
        default=None,
        help="with worker processes, plan each step only after the last one's results",
    )
    g.add_argument("--comm", choices=("zmq", "torch"), help="worker transport")
    g.add_argument(
        "--num-redundant-experts",
        type=non_negative_int,
        help="experts each worker also holds a copy of, to even out the all-to-alls' rows",
    )
    g.add_argument(
        "--expert-rebalance-steps",
        type=non_negative_int,
        help="every N steps, re-place experts by the loads seen (0: never, the default)",
    )
    g.add_argument(
        "--expert-loads",
        metavar="FILE",
        help="place experts from the start by the loads recorded in FILE (--record-expert-loads)",
    )
    g.add_argument(
        "--record-expert-loads",
        metavar="FILE",
        help="count the tokens routed to each expert and write them to FILE at exit",
    )
    g.add_argument(
        "--two-batch-overlap",
        action="store_const",
        const=True,
        default=None,
        help="run big MoE steps as two micro-batches, one's all-to-alls in flight while the "
        "other computes",
    )
    g.add_argument("--sp-threshold", type=positive_int, help="prompt length for sequence parallel")
    g.add_argument("--num-threads", type=positive_int, help="torch threads per worker (CPU)")
    g.add_argument(
        "--no-bind-cpu-cores",
        dest="bind_cpu_cores",
        action="store_const",
        const=False,
        default=None,
        help="let CPU worker processes run on any core (default: each on its own)",
    )
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    g.add_argument(
        "--worker-processes",
        action=argparse.BooleanOptionalAction,
        help="workers in processes of their own (default: with several workers, or one on a GPU)",
    )
    g.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        help="compile the GPU kernels at start, on throw-away requests (default: on CUDA)",
    )
    g.add_argument(
        "--enforce-eager",
        action="store_const",
        const=True,
        default=None,
        help="run every step eagerly: no CUDA graphs for decode steps",
    )
    return p


def _sampling_flags(default_max_tokens: int) -> argparse.ArgumentParser:
    p = _Parser(add_help=False)
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=positive_int, default=default_max_tokens)
    g.add_argument(
        "--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)"
    )
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--seed", type=int, help="engine sampling seed")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The whole `titanserve` argument parser."""
    parser = _Parser(prog="titanserve", description="titanserve LLM inference engine")
    launch = parser.add_argument_group("launcher (DeepSpeed-style)")
    launch.add_argument(
        "--num_workers",
        "--num-workers",
        type=positive_int,
        dest="launcher_num_workers",
        metavar="N",
    )
    launch.add_argument("--hostfile", help="multi-node hostfile (not yet supported)")
    launch.add_argument("--include", help="hosts/ranks to use, e.g. worker-0:0,1")
    launch.add_argument("--exclude", help="hosts/ranks to skip")
    launch.add_argument("--master_addr")
    launch.add_argument("--master_port", type=positive_int)
    launch.add_argument("--node_rank", type=int)
    commands = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    engine, run = _engine_flags(), "titanserve.launcher.commands_run"

    p = commands.add_parser("make-model", help="build a model checkpoint folder")
    p.add_argument("family", choices=MODEL_CHOICES)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--experts", type=positive_int, help="smollm2-moe: experts (default 8)")
    p.add_argument("--top-k", type=positive_int, help="smollm2-moe: experts per token (2)")
    p.add_argument("--noise", type=non_negative_float, help="smollm2-moe: expert noise (0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="smollm2*")
    p.set_defaults(handler="titanserve.launcher.commands_models:make_model")

    p = commands.add_parser(
        "generate", parents=[engine, _sampling_flags(64)], help="complete prompts"
    )
    p.add_argument("model", help="checkpoint folder or .gguf file")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--stream", action="store_true", help="print tokens as they come")
    p.set_defaults(handler=f"{run}:generate")

    p = commands.add_parser("chat", parents=[engine, _sampling_flags(256)], help="chat REPL")
    p.add_argument("model", help="checkpoint folder or .gguf file")
    p.add_argument("--message", help="answer this one message and exit")
    p.add_argument("--system", help="system prompt")
    p.set_defaults(handler=f"{run}:chat")

    p = commands.add_parser("bench", parents=[engine], help="offline throughput")
    p.add_argument("model", help="checkpoint folder or .gguf file")
    p.add_argument("--num-requests", type=positive_int, default=64)
    p.add_argument("--input-len", type=positive_int, default=128)
    p.add_argument("--output-len", type=positive_int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.set_defaults(handler=f"{run}:bench")

    p = commands.add_parser("keygen", help="write a CurveZMQ key pair")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--name", default="server", help="file stem (default: server)")
    p.add_argument("--force", action="store_true", help="overwrite existing keys")
    p.set_defaults(handler="titanserve.launcher.commands_models:keygen")

    p = commands.add_parser("serve", parents=[engine], help="serve clients over ZeroMQ")
    p.add_argument("model", help="checkpoint folder or .gguf file")
    p.add_argument(
        "--address",
        default="tcp://127.0.0.1:7733",
        help="tcp://HOST:PORT or ipc://PATH (default tcp://127.0.0.1:7733)",
    )
    p.add_argument("--keys", help="CurveZMQ key folder (from keygen): required off loopback")
    p.add_argument("--key-name", default="server", help="key pair stem (default: server)")
    p.add_argument("--max-waiting", type=positive_int, default=1024,
                   help="queued requests before new ones get Overloaded (default 1024)")
    p.set_defaults(handler="titanserve.launcher.commands_serve:serve")
    return parser


# ---------------------------------------------------------------------- entry point
def _check_launcher_flags(args: argparse.Namespace) -> None:
    given = [f"--{name}" for name in MULTINODE_FLAGS if getattr(args, name) is not None]
    if given:
        raise UsageError(
            f"not yet supported: multi-node launch ({', '.join(given)}); "
            "run on one node with --num_workers N"
        )
    if not hasattr(args, "num_workers"):  # a command without engine flags
        return
    if args.num_workers is None:
        args.num_workers = args.launcher_num_workers
    elif args.launcher_num_workers not in (None, args.num_workers):
        raise UsageError(
            f"--num_workers {args.launcher_num_workers} before the command disagrees with "
            f"--num-workers {args.num_workers} after it"
        )


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split("\n")).strip()
    return text or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run `titanserve` with argv (default sys.argv[1:]); returns the exit code."""
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        _check_launcher_flags(args)
        module, name = args.handler.split(":")
        return getattr(importlib.import_module(module), name)(args) or 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `titanserve generate ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (UsageError, TitanserveError, ValueError, OSError) as e:
        if os.environ.get("TITANSERVE_DEBUG"):
            raise
        print(f"titanserve: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    # NOTE: under `python -m` this file is `__main__`; run the importable module's main so that
    # command modules and this entry point share one UsageError class.
    from titanserve.launcher.cli import main as _main

    sys.exit(_main())
