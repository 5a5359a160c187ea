"""Expert-parallel engine over real worker processes: results equal W=1 and transformers."""

from __future__ import annotations

import glob
import os
import signal
import time

import pytest
import torch

from titanserve import LLM, SamplingParams
from titanserve.core.cpu_cores import allowed_cores, threads_per_worker, worker_core_sets
from titanserve.core.cpu_malloc import THP_ENV, with_huge_pages
from titanserve.core.errors import WorkerLost
from titanserve.launcher.tiny_models import make_tiny

_MODELS: dict[str, str] = {}


def tiny(family: str, tmp_path_factory) -> str:
    if family not in _MODELS:
        _MODELS[family] = str(make_tiny(family, tmp_path_factory.mktemp(family)))
    return _MODELS[family]


def prompts(n: int = 6, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 9, 17, 33, 48, 60][:n]
    return [torch.randint(3, 384, (k,), generator=g).tolist() for k in lengths]


def hf_reference(path: str, token_lists: list[list[int]], max_tokens: int):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    logits, tokens = [], []
    with torch.no_grad():
        for p in token_lists:
            ids = torch.tensor([p])
            logits.append(hf(ids).logits[0])
            out = hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                do_sample=False, eos_token_id=None, pad_token_id=0,
            )
            tokens.append(out[0, len(p):].tolist())
    return logits, tokens


def check_against_hf(path: str, num_workers: int, comm: str, bind: bool = True,
                     **options) -> LLM:
    token_lists = prompts()
    ref_logits, ref_tokens = hf_reference(path, token_lists, max_tokens=12)
    with LLM(path, num_workers=num_workers, comm=comm, progress=False,
             max_num_batched_tokens=64, bind_cpu_cores=bind, **options) as llm:
        greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        outs = llm.generate(token_lists, greedy)
        assert [o.token_ids for o in outs] == ref_tokens
        check_cpu_cores(llm, num_workers, bind)
        check_huge_pages(llm)
        for ours, ref in zip(llm.prompt_logits(token_lists), ref_logits):
            assert (ours - ref).abs().max().item() <= 1e-4
    return llm


def check_huge_pages(llm: LLM) -> None:
    """Worker processes back torch's large blocks with transparent huge pages (core.cpu_malloc):
    they start with the setting, and on CPU, where the kernel grants such pages, hold some
    (on a GPU their large blocks live in device memory)."""
    on_cpu = llm.engine.config.resolve_device(0).type == "cpu"
    mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    for proc in llm.engine.executor.procs:
        environ = open(f"/proc/{proc.pid}/environ", "rb").read().split(b"\0")
        assert THP_ENV.encode() + b"=1" in environ
        if on_cpu and "[never]" not in mode:
            rollup = open(f"/proc/{proc.pid}/smaps_rollup").read()
            huge_kb = int(rollup.split("AnonHugePages:")[1].split()[0])
            assert huge_kb >= 2048, rollup


def check_cpu_cores(llm: LLM, num_workers: int, bind: bool) -> None:
    """On CPU each worker runs on its own cores (unless not bound), and the engine thread,
    which works on the workers' cores while they run, may run anywhere again once idle."""
    if llm.engine.config.resolve_device(0).type != "cpu":
        return
    cores = allowed_cores()
    expected = [cores] * num_workers
    if bind:
        expected = worker_core_sets(cores, num_workers, threads_per_worker(None, num_workers))
    executor = llm.engine.executor
    assert [sorted(os.sched_getaffinity(p.pid)) for p in executor.procs] == expected
    assert sorted(os.sched_getaffinity(0)) == cores
    stream = llm.stream([[5, 6, 7]], SamplingParams(max_tokens=50, ignore_eos=True))
    next(stream)  # mid-request: the engine thread is on a worker's cores, if it follows them
    follower = executor.follower
    assert (follower is not None) == (bind and not executor.overlaps)
    if follower is not None:
        assert os.sched_getaffinity(0) == set(follower.core_sets[follower.at])
    stream.close()  # aborts the request: the engine is idle again
    assert sorted(os.sched_getaffinity(0)) == cores


@pytest.mark.parametrize("family", ["mixtral", "qwen2-moe", "qwen3-moe"])
def test_two_workers_match_transformers(family, tmp_path_factory):
    check_against_hf(tiny(family, tmp_path_factory), 2, "zmq")


@pytest.mark.parametrize("rebalance", [0, 2])
def test_two_workers_with_packed_weights_match_transformers(rebalance, tmp_path):
    """A Mixtral big enough that the workers pack its attention and experts for oneDNN
    (the tiny zoo's weights all stay dense), with row buckets warmed up in each worker; and
    with its experts re-placed every 2 steps (reloaded, packed again)."""
    from titanserve.kernels import cpu_experts, cpu_linear

    if not cpu_linear.can_pack(torch.zeros(2, 2)):
        pytest.skip("no oneDNN")
    path = str(make_tiny("mixtral", tmp_path, hidden_size=256, num_attention_heads=8,
                         num_key_value_heads=4, intermediate_size=384, num_hidden_layers=2))
    assert (8 + 2 * 4) * 32 * 256 >= cpu_linear.MIN_PACKED_ELEMENTS  # qkv rows x hidden
    assert 3 * 384 * 256 >= cpu_experts.MIN_PACKED_EXPERT_ELEMENTS  # one expert's matrices
    llm = check_against_hf(path, 2, "zmq", max_num_seqs=8,  # fewer row buckets to warm up
                           expert_rebalance_steps=rebalance)
    assert (llm.engine.layers_rebalanced > 0) == bool(rebalance)


def test_one_worker_process_matches_transformers(tmp_path_factory):
    # the server's layout: alone, the worker computes every expert with no exchange
    check_against_hf(tiny("mixtral", tmp_path_factory), 1, "zmq", worker_processes=True)


def test_four_workers_zmq_match_transformers(tmp_path_factory):
    check_against_hf(tiny("mixtral", tmp_path_factory), 4, "zmq")


def test_torch_distributed_backend_matches_transformers(tmp_path_factory):
    check_against_hf(tiny("qwen2-moe", tmp_path_factory), 2, "torch", bind=False)


@pytest.mark.slow
@pytest.mark.parametrize("comm", ["zmq", "torch"])
@pytest.mark.parametrize("num_workers", [2, 4])
@pytest.mark.parametrize("family", ["mixtral", "qwen2-moe", "qwen3-moe"])
def test_full_layout_matrix(family, num_workers, comm, tmp_path_factory):
    check_against_hf(tiny(family, tmp_path_factory), num_workers, comm)


def test_each_worker_holds_exactly_its_expert_share(tmp_path_factory):
    path = tiny("mixtral", tmp_path_factory)
    with LLM(path, num_workers=4, progress=False) as llm:
        workers = llm.engine.executor.workers
        assert [w.local_experts for w in workers] == [[0, 1], [2, 3], [4, 5], [6, 7]]
        cfg = llm.engine.model_config
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        total = per_expert * cfg.num_experts * len(cfg.moe_layers)
        assert [w.expert_param_count for w in workers] == [total // 4] * 4


def test_sampled_and_seeded_outputs_do_not_depend_on_worker_count(tmp_path_factory):
    path = tiny("qwen3-moe", tmp_path_factory)
    params = [SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=s, ignore_eos=True)
              for s in range(4)]
    token_lists = prompts(4, seed=1)
    with LLM(path, progress=False) as llm:
        single = [o.token_ids for o in llm.generate(token_lists, params)]
        alone = llm.engine
    with LLM(path, num_workers=2, progress=False) as llm:
        double = [o.token_ids for o in llm.generate(token_lists, params)]
        engine = llm.engine
    assert single == double
    # The all-to-alls of the worker whose compute counts are accounted apart, their waits
    # for the other worker among them; what they leave of the share outside compute is the rest.
    assert 0.0 < engine.comm_time_s < engine.step_time_s
    assert 0.0 <= engine.comm_wait_time_s <= engine.comm_time_s
    parts = engine.overhead_parts()
    a2a = parts["all-to-all wait"] + parts["all-to-all work"]
    assert parts["all-to-all wait"] >= 0.0 and parts["all-to-all work"] > 0.0
    assert a2a == pytest.approx(engine.comm_time_s / engine.step_time_s)
    assert parts["engine + IPC"] == pytest.approx(max(0.0, engine.overhead_fraction - a2a))
    # the fastest worker's compute, beside the slowest's: one worker is both
    assert 0.0 < engine.fastest_compute_time_s < engine.compute_time_s
    assert 0.0 < alone.fastest_compute_time_s == alone.compute_time_s
    assert engine.workers_compute_apart == pytest.approx(
        1 - engine.fastest_compute_time_s / engine.compute_time_s)
    assert engine.workers_compute_apart > 0.0 == alone.workers_compute_apart


def _children() -> set[int]:
    me = str(os.getpid())
    pids = set()
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:
            pids.add(int(stat.split("/")[2]))
    return pids


def lifecycle_cycles(path: str, cycles: int) -> None:
    before_children, run_dirs = _children(), []
    for _ in range(cycles):
        llm = LLM(path, num_workers=2, progress=False)
        run_dirs.append(llm.engine.executor.run_dir)
        assert os.path.exists(os.path.join(run_dirs[-1], "engine"))  # the ipc:// socket file
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0))
        assert len(out[0].token_ids) == 2
        llm.shutdown()
    assert _children() - before_children == set()
    assert [d for d in run_dirs if os.path.exists(d)] == []


def test_create_shutdown_cycles_leave_no_process_or_socket(tmp_path_factory):
    lifecycle_cycles(tiny("mixtral", tmp_path_factory), 3)


@pytest.mark.slow
def test_twenty_create_shutdown_cycles(tmp_path_factory):
    lifecycle_cycles(tiny("mixtral", tmp_path_factory), 20)


def test_killed_worker_raises_worker_lost_quickly(tmp_path_factory):
    path = tiny("mixtral", tmp_path_factory)
    llm = LLM(path, num_workers=2, progress=False)
    procs = list(llm.engine.executor.procs)
    try:
        victim = procs[1]
        os.kill(victim.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(WorkerLost) as info:
            llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=8, temperature=0))
        assert time.monotonic() - t0 < 5.0
        assert info.value.rank == 1
        with pytest.raises(WorkerLost):  # the engine stays failed, fast, until restarted
            llm.generate([[5, 6]], SamplingParams(max_tokens=1))
    finally:
        t0 = time.monotonic()
        llm.shutdown()
        assert time.monotonic() - t0 < 10.0
    assert all(p.poll() is not None for p in procs)


@pytest.mark.parametrize(
    "cores,workers,threads,spare",
    [(2, 2, None, False), (8, 2, None, False), (8, 2, 3, True), (3, 2, None, True)],
)
def test_engine_overlaps_output_processing_only_with_a_spare_core(
    monkeypatch, cores, workers, threads, spare
):
    from titanserve.core.engine_config import EngineConfig
    from titanserve.core.multiproc_executor import engine_core_is_spare

    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    config = EngineConfig(model="m", num_workers=workers, num_threads=threads, device="cpu")
    assert engine_core_is_spare(config) is spare


@pytest.mark.parametrize(
    "device,expected",
    [("cuda", ["cuda:0", "cuda:1", "cuda:0"]), ("auto", ["cuda:0", "cuda:1", "cuda:0"]),
     ("cuda:1", ["cuda:1"] * 3), ("cpu", ["cpu"] * 3)],
)
def test_workers_without_a_named_gpu_take_the_gpus_in_turn(monkeypatch, device, expected):
    # the first GPU run failed here: torch.cuda.set_device refuses "cuda" with no index
    from titanserve.core.engine_config import EngineConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    config = EngineConfig(model="m", num_workers=3, device=device)
    assert [str(config.resolve_device(rank)) for rank in range(3)] == expected


@pytest.mark.parametrize(
    "workers,device,option,expected",
    [(1, "cpu", None, False), (1, "cuda", None, True), (2, "cpu", None, True),
     (1, "cuda", False, False), (1, "cpu", True, True), (2, "cuda", False, False)],
)
def test_one_gpu_worker_gets_a_process_of_its_own(workers, device, option, expected):
    """By default, so that the engine's work overlaps the GPU's step (async scheduling); one
    CPU worker stays in the engine's process, where the engine would take its cores."""
    from titanserve.core.engine_config import EngineConfig

    config = EngineConfig(model="m", num_workers=workers, worker_processes=option)
    assert config.resolve_worker_processes(torch.device(device)) is expected


def test_the_engine_follows_the_worker_process_choice(tmp_path_factory, monkeypatch):
    from titanserve.core.engine_config import EngineConfig
    from titanserve.core.executor import InProcessExecutor
    from titanserve.core.multiproc_executor import MultiProcExecutor

    path = tiny("llama", tmp_path_factory)
    with LLM(path, device="cpu", progress=False) as llm:
        assert isinstance(llm.engine.executor, InProcessExecutor)
    monkeypatch.setattr(EngineConfig, "resolve_worker_processes", lambda self, device: True)
    with LLM(path, device="cpu", progress=False) as llm:
        assert isinstance(llm.engine.executor, MultiProcExecutor)
        (out,) = llm.generate([[3, 4, 5]], SamplingParams(max_tokens=2, temperature=0.0))
        assert len(out.token_ids) == 2


def test_stopped_worker_is_lost_when_its_heartbeats_stop(tmp_path_factory, monkeypatch):
    """A SIGSTOPped process still exists and there are no collectives in a dense model, so
    only the missing heartbeats can tell; an idle pause longer than the timeout is fine."""
    from titanserve.core import multiproc_executor

    monkeypatch.setattr(multiproc_executor, "HEARTBEAT_TIMEOUT_S", 1.5)
    path = tiny("llama", tmp_path_factory)
    llm = LLM(path, num_workers=2, progress=False)
    victim = llm.engine.executor.procs[0]
    try:
        params = SamplingParams(max_tokens=4, temperature=0)
        expected = llm.generate([[5, 6, 7], [8, 9]], params)
        time.sleep(3.0)  # idle: nobody reads the heartbeats, nobody is lost
        assert [o.token_ids for o in llm.generate([[5, 6, 7], [8, 9]], params)] == [
            o.token_ids for o in expected
        ]
        os.kill(victim.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(WorkerLost, match="no heartbeat") as info:
            llm.generate([[5, 6, 7], [8, 9]], params)
        assert info.value.rank == 0
        assert time.monotonic() - t0 < 1.5 + 2.0
    finally:
        os.kill(victim.pid, signal.SIGCONT)
        llm.shutdown()
    assert victim.poll() is not None


def test_garbage_on_either_socket_is_dropped_and_serving_continues(tmp_path_factory):
    import zmq

    path = tiny("mixtral", tmp_path_factory)
    with LLM(path, num_workers=2, progress=False) as llm:
        executor = llm.engine.executor
        expected = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0))
        # worker side: garbage and a truncated plan through the engine's own socket
        executor.sock.send_multipart([b"w0", b"\xc1 not msgpack"])
        executor.sock.send_multipart([b"w1", b"\x82\xa4type"])
        executor.sock.send_multipart([b"w0", b"\x81\xa4type\xa2\xff\xfe"])  # bad UTF-8
        # engine side: a stranger connects to the engine's socket and sends junk
        ctx = zmq.Context.instance()
        stranger = ctx.socket(zmq.DEALER)
        stranger.setsockopt(zmq.IDENTITY, b"w9")
        stranger.connect(f"ipc://{executor.run_dir}/engine")
        stranger.send_multipart([b"junk", b"more junk"])
        stranger.close(linger=500)
        again = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0))
        assert again[0].token_ids == expected[0].token_ids


def test_oversized_message_to_the_engine_is_refused_and_serving_continues(
    tmp_path_factory, monkeypatch
):
    import zmq

    from titanserve.core import multiproc_executor

    monkeypatch.setattr(multiproc_executor, "MAX_CONTROL_MESSAGE_BYTES", 1 << 20)
    path = tiny("mixtral", tmp_path_factory)
    with LLM(path, num_workers=2, progress=False) as llm:
        expected = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0))
        stranger = zmq.Context.instance().socket(zmq.DEALER)
        stranger.setsockopt(zmq.IDENTITY, b"w7")
        stranger.connect(f"ipc://{llm.engine.executor.run_dir}/engine")
        stranger.send(b"\x00" * (2 << 20))  # over the limit: ZeroMQ drops the connection
        stranger.close(linger=500)
        again = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0))
        assert again[0].token_ids == expected[0].token_ids


def run_to_end(engine, outs: dict[str, list[int]]) -> None:
    """Step the engine until nothing is left, adding each request's new tokens to `outs`."""
    while engine.has_unfinished():
        for delta in engine.step():
            outs.setdefault(delta.request_id, []).extend(delta.new_token_ids)


def test_a_step_abandoned_halfway_leaves_no_stale_result(tmp_path_factory):
    """The engine takes each worker's results as they arrive; if it stops after the first (an
    error while processing it), the other worker's late result of that step is dropped, not
    taken for the next step's, and the step's work is simply done again."""
    path = tiny("llama", tmp_path_factory)
    token_lists = prompts(4)
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    with LLM(path, num_workers=2, progress=False) as llm:
        want = [o.token_ids for o in llm.generate(token_lists, greedy)]
        engine = llm.engine
        for i, p in enumerate(token_lists):
            engine.add_request(p, greedy, request_id=f"x{i}")
        out = engine.scheduler.schedule()
        assert {s.worker for s in out.scheduled} == {0, 1}
        computed = [s.request.num_computed_tokens for s in out.scheduled]
        engine.executor.submit(out.plans)
        rank, first, _ = next(engine.executor.collect())  # then abandoned, unprocessed
        assert first.step_id == out.step_id and first.seqs
        assert [s.request.num_computed_tokens for s in out.scheduled] == computed
        outs: dict[str, list[int]] = {}
        run_to_end(engine, outs)
        assert [outs[f"x{i}"] for i in range(len(token_lists))] == want


def test_async_scheduling_gives_the_outputs_of_planning_after_each_step(tmp_path_factory):
    """Steps planned while the one before runs (placeholders for unseen samples) give the
    same tokens, logprobs and finish reasons as planning after each result: with stop ids
    that end requests while a step is in flight, seeded sampling, and a KV cache small
    enough to preempt requests whose step is in flight."""
    path = tiny("llama", tmp_path_factory)
    token_lists = prompts(6)
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    with LLM(path, num_workers=2, async_scheduling=False, progress=False) as llm:
        free_run = [o.token_ids for o in llm.generate(token_lists, greedy)]
    params = [
        SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[free_run[0][5]], logprobs=2),
        SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[free_run[1][10]]),
        SamplingParams(max_tokens=7, temperature=0.9, seed=3, logprobs=1),
        SamplingParams(max_tokens=24, temperature=0.8, seed=4, ignore_eos=True),
        SamplingParams(max_tokens=1, temperature=0),
        SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=0),
    ]
    outs = {}
    for ahead in (False, True):
        with LLM(
            path, num_workers=2, async_scheduling=ahead, block_size=4, num_kv_blocks=20,
            progress=False,
        ) as llm:  # fmt: skip
            assert llm.engine.async_scheduling == ahead
            outs[ahead] = llm.generate(token_lists, params)
    assert sum(o.num_preemptions for o in outs[True]) > 0
    assert [o.finish_reason for o in outs[True]][:2] == ["stop", "stop"]
    for sync, ahead in zip(outs[False], outs[True]):
        assert ahead.token_ids == sync.token_ids and ahead.finish_reason == sync.finish_reason
        if sync.logprobs is not None:
            assert len(ahead.logprobs) == len(ahead.token_ids)
            assert ahead.logprobs == pytest.approx(sync.logprobs, abs=1e-5)


def test_an_error_while_taking_results_drops_the_step_planned_ahead(tmp_path_factory):
    """Async scheduling plans step t+1 on step t's results. If taking step t's results fails
    halfway (here: before worker 1's are taken), step t+1 is dropped with it; the requests
    whose results were lost redo that step (a penalty's token history forgets the lost
    sample), and every output equals a clean run."""
    path = tiny("llama", tmp_path_factory)
    token_lists = prompts(4)
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    penalized = SamplingParams(
        max_tokens=8, temperature=0, ignore_eos=True, repetition_penalty=3.0,
        frequency_penalty=2.0,
    )  # fmt: skip
    params = [greedy, penalized, greedy, penalized]
    with LLM(path, num_workers=2, progress=False) as llm:
        want = [o.token_ids for o in llm.generate(token_lists, params)]
        engine = llm.engine
        assert engine.async_scheduling
        update, calls = engine.scheduler.update, []

        def failing_update(output, sampled, worker=None):
            calls.append(worker)
            if len(calls) > 6 and worker == 1 and "failed" not in calls:
                calls.append("failed")
                raise RuntimeError("injected")
            return update(output, sampled, worker)

        engine.scheduler.update = failing_update
        for i, p in enumerate(token_lists):
            engine.add_request(p, params[i], request_id=f"x{i}")
        outs: dict[str, list[int]] = {}
        with pytest.raises(RuntimeError, match="injected"):
            run_to_end(engine, outs)
        assert engine._ahead is None
        run_to_end(engine, outs)
    assert [outs[f"x{i}"] for i in range(len(token_lists))] == want


def test_a_huge_page_setting_of_the_callers_is_kept():
    assert with_huge_pages({"PATH": "/bin"}) == {"PATH": "/bin", THP_ENV: "1"}
    assert with_huge_pages({THP_ENV: "0"}) == {THP_ENV: "0"}
