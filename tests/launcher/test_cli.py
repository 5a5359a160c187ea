"""The `titanserve` command line, run as real subprocesses on a tiny Llama it builds itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zmq

CLI = [sys.executable, "-m", "titanserve.launcher.cli"]


def run_cli(
    *args: str, stdin: str | None = None, timeout_s: float = 120
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TITANSERVE_DEBUG"}
    return subprocess.run(
        [*CLI, *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
    )


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """`titanserve make-model tiny-llama --out DIR`, once for the module."""
    out = tmp_path_factory.mktemp("cli") / "tiny-llama"
    result = run_cli("make-model", "tiny-llama", "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    return out


@pytest.fixture(scope="module")
def expected(tiny_llama) -> dict[str, str]:
    """Greedy completions (and their token count) from the offline API in this process: what
    the CLI must print."""
    from titanserve.core.llm import LLM
    from titanserve.core.sampling_params import SamplingParams

    with LLM(str(tiny_llama), progress=False) as llm:
        params = SamplingParams(max_tokens=8, temperature=0.0)
        prompts = ["Paris is", "The quick brown"]
        outs = llm.generate(prompts, params)
        chat = llm.chat([{"role": "user", "content": "Hello"}], params)[0]
    num_tokens = str(sum(len(o.token_ids) for o in outs))
    return {**{p: o.text for p, o in zip(prompts, outs)}, "chat": chat.text, "tokens": num_tokens}


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "loading weights" not in line]
    assert len(lines) == 1 and lines[0].startswith("titanserve: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_generate_prints_the_greedy_completions(tiny_llama, expected):
    result = run_cli(
        "generate", tiny_llama, "--prompt", "Paris is", "--prompt", "The quick brown",
        "--max-tokens", "8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    want = f"=== 0: Paris is\n{expected['Paris is']}\n"
    want += f"=== 1: The quick brown\n{expected['The quick brown']}\n"
    assert result.stdout == want
    assert f"2 request(s), {expected['tokens']} tokens" in result.stderr


def test_generate_stream_prints_the_same_text(tiny_llama, expected):
    result = run_cli(
        "--num_workers", "1", "generate", tiny_llama, "--prompt", "Paris is",
        "--max-tokens", "8", "--stream", "--no-prefix-caching", "--block-size", "8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected["Paris is"] + "\n"


def test_chat_one_shot_and_repl_answer_like_llm_chat(tiny_llama, expected):
    one_shot = run_cli("chat", tiny_llama, "--message", "Hello", "--max-tokens", "8")
    assert one_shot.returncode == 0, one_shot.stderr
    assert one_shot.stdout == expected["chat"] + "\n"
    repl = run_cli("chat", tiny_llama, "--max-tokens", "8", stdin="Hello\n/reset\nHello\n/exit\n")
    assert repl.returncode == 0, repl.stderr
    assert repl.stdout == 2 * (expected["chat"] + "\n")


def test_bench_reports_throughput(tiny_llama):
    result = run_cli(
        "bench", tiny_llama, "--num-requests", "4", "--input-len", "16", "--output-len", "8"
    )
    assert result.returncode == 0, result.stderr
    rows = dict(line.split(":", 1) for line in result.stdout.splitlines())
    assert rows["requests"].strip() == "4"
    assert rows["input/output tokens"].strip() == "64 / 32"
    assert float(rows["output tokens/s"]) > 0
    assert rows["mean TTFT"].strip().endswith(" ms")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["generate", "/no/such/model", "--prompt", "hi"], ["'/no/such/model' does not exist"]),
        (["generate", "{model}", "--prompt", "hi", "--max-tokens", "0"], ["--max-tokens"]),
        (["generate", "{model}", "--prompt", "hi", "--top-p", "x"], ["--top-p"]),
        (["generate", "{model}", "--prompt", "hi", "--num-redundant-experts", "-1"],
         ["--num-redundant-experts", "must be >= 0"]),
        (["generate", "{model}", "--prompt", "hi", "--expert-loads", "x.json"],
         ["expert_loads needs num_workers > 1"]),
        (["generate", "{model}", "--prompt", "hi", "--record-expert-loads", "x.json"],
         ["record_expert_loads needs a mixture-of-experts model"]),
        (["generate", "{model}", "--prompt", "hi", "--bogus"], ["unrecognized", "--bogus"]),
        (["generate", "{model}"], ["--prompt"]),
        (["make-model", "tiny-gpt5", "--out", "x"], ["invalid choice", "tiny-gpt5"]),
        (["make-model", "tiny-llama", "--out", "x", "--experts", "4"], ["smollm2-moe"]),
        (["--hostfile", "hosts", "generate", "{model}", "--prompt", "hi"], ["not yet supported"]),
        (["serve", "{model}", "--address", "tcp://0.0.0.0:7733"], ["keygen", "--keys"]),
        (["serve", "{model}", "--address", "udp://x"], ["tcp://HOST:PORT or ipc://PATH"]),
        (["serve", "{model}", "--keys", "/no/such/dir"], ["no key pair", "keygen"]),
        (["serve", "{model}", "--no-worker-processes"], ["serve always", "--no-worker-processes"]),
        ([], ["<command>"]),
    ],
)
def test_user_mistakes_print_one_error_line(tiny_llama, args, fragments):
    result = run_cli(*[a.format(model=tiny_llama) for a in args])
    assert_one_error_line(result, *fragments)
    assert result.stdout == ""


def test_engine_errors_print_one_error_line(tiny_llama):
    too_small = run_cli("generate", tiny_llama, "--prompt", "hi", "--num-kv-blocks", "1")
    assert_one_error_line(too_small, "KV cache of 1 blocks")


def test_engine_flags_become_llm_keywords_and_only_those_given():
    from titanserve.launcher.cli import build_parser
    from titanserve.launcher.commands_run import engine_kwargs

    parse = build_parser().parse_args
    flags = ["--no-bind-cpu-cores", "--num-threads", "3", "--no-async-scheduling", "--warmup",
             "--enforce-eager", "--worker-processes", "--num-redundant-experts", "2",
             "--expert-rebalance-steps", "100", "--two-batch-overlap", "--kv-cache-dtype",
             "bfloat16", "--expert-loads", "in.json", "--record-expert-loads", "out.json"]
    args = parse(["generate", "m", "--prompt", "x", *flags])
    assert engine_kwargs(args) == {
        "bind_cpu_cores": False, "num_threads": 3, "async_scheduling": False, "warmup": True,
        "enforce_eager": True, "worker_processes": True, "num_redundant_experts": 2,
        "expert_rebalance_steps": 100, "two_batch_overlap": True, "kv_cache_dtype": "bfloat16",
        "expert_loads": "in.json", "record_expert_loads": "out.json",
    }  # fmt: skip
    assert engine_kwargs(parse(["generate", "m", "--prompt", "x", "--no-warmup",
                                "--no-worker-processes"])) == {
        "warmup": False, "worker_processes": False
    }
    assert engine_kwargs(parse(["generate", "m", "--prompt", "x"])) == {}


def test_keygen_writes_a_private_secret(tmp_path):
    script = Path(sys.executable).parent / "titanserve"  # the console script, when installed
    cmd = [str(script)] if script.exists() else CLI
    out = tmp_path / "keys"
    result = subprocess.run([*cmd, "keygen", "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    public, secret = out / "server.public", out / "server.secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert public.stat().st_mode & 0o777 == 0o644
    public_key, secret_key = public.read_bytes().strip(), secret.read_bytes().strip()
    assert len(public_key) == len(secret_key) == 40
    assert zmq.curve_public(secret_key) == public_key
    again = run_cli("keygen", "--out", out)
    assert_one_error_line(again, "--force")
    assert secret.read_bytes().strip() == secret_key
    assert run_cli("keygen", "--out", out, "--force").returncode == 0
    assert secret.read_bytes().strip() != secret_key


def test_ctrl_c_exits_130_quietly(tiny_llama):
    # NOTE: interrupt once the generation's progress bar is up, not after a fixed sleep: on a
    # fast machine the whole run can be over (and the interpreter tearing down) by then.
    proc = subprocess.Popen(
        [*CLI, "bench", str(tiny_llama), "--num-requests", "128", "--output-len", "900"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = ""
    while "generating" not in seen and (char := proc.stderr.read(1)):
        seen += char
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    stderr = seen + stderr
    assert "generating" in seen, stderr
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stdout == ""


def test_demo_engine_holds_a_small_kv_cache(tiny_llama):
    """The demo streams one answer at a time: its KV cache is a fixed 256 MiB a worker, not
    the default share of free memory, which a VM is slow to zero at start."""
    from titanserve.core.model.kv_cache import kv_cache_dtype
    from titanserve.core.model_runner import kv_bytes_per_block
    from titanserve.launcher.demo import DEMO_KV_CACHE_BYTES, start_engine

    llm, workers = start_engine(tiny_llama, 1, "float32")
    with llm:
        engine = llm.engine
        assert workers == 1 and engine.config.kv_cache_memory == DEMO_KV_CACHE_BYTES
        cache_dtype = kv_cache_dtype(engine.config.kv_cache_dtype, torch.device("cpu"),
                                     engine.config.torch_dtype)
        per_block = kv_bytes_per_block(engine.model_config, engine.config.block_size,
                                       cache_dtype)
        assert engine.num_blocks * per_block <= DEMO_KV_CACHE_BYTES


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    env = {**os.environ, "TITANSERVE_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "titanserve.launcher.demo"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "The capital of France is Paris" in result.stdout
    summary = result.stdout.split("--- summary ---")[1]
    assert "requests:             3" in summary
    for field in ("generated tokens:", "tok/s", "mean time to first:", "wall time:"):
        assert field in summary
    assert (tmp_path / "cache" / "models" / "smollm2-moe" / ".titanserve-demo.json").exists()
