"""The offline LLM API end to end on a tiny qwen3: stop rules, finish reasons, seeded
sampling across batches, prefix caching and preemption invariance, input validation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from titanserve import LLM, SamplingParams
from titanserve.core.errors import InvalidRequest

FAMILY = "qwen3"


def make_llm(path: Path, **kwargs) -> LLM:
    return LLM(str(path), **{"dtype": "float32", "progress": False, **kwargs})


def greedy(max_tokens: int = 24, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kwargs)


def record_plans(llm: LLM) -> list:
    """Spy on the executor: every SeqPlan the scheduler sends from now on."""
    seqs, submit = [], llm.engine.executor.submit

    def recording(plans):
        seqs.extend(seq for plan in plans for seq in plan.seqs)
        return submit(plans)

    llm.engine.executor.submit = recording
    return seqs


def text_after_each_token(llm: LLM, prompt: list[int], params: SamplingParams) -> list[str]:
    """The request's visible text after 1, 2, ... tokens (no stop strings: nothing held)."""
    texts, text = [], ""
    for delta in llm.stream([prompt], params):
        text += delta.new_text
        texts.append(text)
    return texts


def test_stop_string_cuts_the_text_in_outputs_and_streams(tiny_model, random_prompts):
    (prompt,) = random_prompts([12], seed=3)
    with make_llm(tiny_model(FAMILY)) as llm:
        (ref,) = llm.generate([prompt], greedy())
        start = len(ref.text) // 3
        stop = ref.text[start : start + 3]
        cut = ref.text.index(stop)
        (out,) = llm.generate([prompt], greedy(stop=[stop]))
        deltas = list(llm.stream([prompt], greedy(stop=[stop, "never seen"])))
    assert (out.text, out.finish_reason) == (ref.text[:cut], "stop")
    assert out.token_ids == ref.token_ids[: len(out.token_ids)]
    assert len(out.token_ids) < 24
    assert "".join(d.new_text for d in deltas) == ref.text[:cut]
    assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
    assert deltas[-1].finish_reason == "stop"


@pytest.mark.parametrize("num_workers", [1, 2])
def test_a_stop_string_ending_one_request_leaves_the_batch_and_cache_intact(
    tiny_model, random_prompts, num_workers
):
    """Stop strings are seen while the next step runs (output processing overlaps the
    workers): that step's extra token must not leak, nor its blocks, nor disturb the others."""
    prompts = random_prompts([12, 30, 7, 19], seed=4)
    with make_llm(tiny_model(FAMILY), num_workers=num_workers) as llm:
        if num_workers > 1:
            llm.engine.executor.overlaps = True  # also where no core is spare for it
        refs = llm.generate(prompts, greedy())
        stop = refs[1].text[len(refs[1].text) // 4 :][:3]
        params = [greedy(), greedy(stop=[stop]), greedy(), greedy()]
        outs = llm.generate(prompts, params)
        engine = llm.engine
        assert not engine.has_unfinished() and not engine.trackers
        for block_manager in engine.scheduler.block_managers:
            assert block_manager.num_free_blocks == block_manager.num_blocks
    cut = refs[1].text.index(stop)
    assert (outs[1].text, outs[1].finish_reason) == (refs[1].text[:cut], "stop")
    n = len(outs[1].token_ids)
    assert outs[1].token_ids == refs[1].token_ids[:n] and n < len(refs[1].token_ids)
    for i in (0, 2, 3):
        assert (outs[i].token_ids, outs[i].text) == (refs[i].token_ids, refs[i].text)


def test_stop_string_completed_by_the_last_allowed_token_still_stops(tiny_model, random_prompts):
    """vLLM checks stop strings after max_tokens too: the string never reaches the text."""
    (prompt,) = random_prompts([12], seed=3)
    with make_llm(tiny_model(FAMILY)) as llm:
        texts = text_after_each_token(llm, prompt, greedy())
        # the first token after the 4th that adds two or more characters
        n = next(i + 1 for i in range(4, len(texts)) if len(texts[i]) >= len(texts[i - 1]) + 2)
        stop = texts[n - 1][-2:]
        cut = texts[n - 1].index(stop)
        (out,) = llm.generate([prompt], greedy(max_tokens=n, stop=[stop]))
    assert cut > len(texts[n - 2]) - 2  # the stop string only appears with token n
    assert (out.text, out.finish_reason, len(out.token_ids)) == (texts[n - 1][:cut], "stop", n)


def test_stream_deltas_add_up_to_the_final_text(tiny_model, random_prompts):
    prompts = random_prompts([7, 19], seed=4)
    with make_llm(tiny_model(FAMILY)) as llm:
        refs = llm.generate(prompts, greedy())
        streamed = {}
        for delta in llm.stream(prompts, greedy()):
            streamed[delta.request_id] = streamed.get(delta.request_id, "") + delta.new_text
    assert sorted(streamed.values()) == sorted(ref.text for ref in refs)


def test_stop_token_ids_end_generation_at_the_first_one(tiny_model, random_prompts):
    (prompt,) = random_prompts([9], seed=5)
    with make_llm(tiny_model(FAMILY)) as llm:
        (ref,) = llm.generate([prompt], greedy())
        stop_id = ref.token_ids[6]
        k = ref.token_ids.index(stop_id)
        (out,) = llm.generate([prompt], greedy(stop_token_ids=[stop_id]))
    assert (out.token_ids, out.finish_reason) == (ref.token_ids[: k + 1], "stop")


def test_max_tokens_finishes_with_length(tiny_model, random_prompts):
    (prompt,) = random_prompts([9], seed=5)
    with make_llm(tiny_model(FAMILY)) as llm:
        (out,) = llm.generate([prompt], greedy(max_tokens=5))
    assert (len(out.token_ids), out.finish_reason) == (5, "length")


def test_eos_stops_generation_unless_ignore_eos(tiny_model, random_prompts, tmp_path):
    """A copy of the checkpoint whose config names a token the model emits as its eos."""
    (prompt,) = random_prompts([9], seed=5)
    with make_llm(tiny_model(FAMILY)) as llm:
        (ref,) = llm.generate([prompt], greedy(max_tokens=16))
    eos_id = ref.token_ids[5]
    path = shutil.copytree(tiny_model(FAMILY), tmp_path / "model")
    config = json.loads((path / "config.json").read_text())
    config["eos_token_id"] = [eos_id]
    (path / "config.json").write_text(json.dumps(config))
    tokenizer_eos = 2  # <|im_end|>, from tokenizer_config.json
    k = next(i for i, t in enumerate(ref.token_ids) if t in (eos_id, tokenizer_eos))
    sampling = dict(max_tokens=16, temperature=0.0)
    with make_llm(path) as llm:
        stopped, ignored = llm.generate(
            [prompt, prompt],
            [SamplingParams(**sampling), SamplingParams(**sampling, ignore_eos=True)],
        )
    assert (stopped.token_ids, stopped.finish_reason) == (ref.token_ids[: k + 1], "stop")
    assert (ignored.token_ids, ignored.finish_reason) == (ref.token_ids, "length")


def test_seeded_sampling_is_the_same_in_any_batch_and_engine(tiny_model, random_prompts):
    prompt, *others = random_prompts([10, 4, 30, 17, 8], seed=6)
    seeded = lambda seed: SamplingParams(  # noqa: E731
        max_tokens=12, temperature=1.0, top_p=0.9, seed=seed, ignore_eos=True
    )
    other_params = [
        SamplingParams(max_tokens=5, temperature=1.0, ignore_eos=True),
        greedy(max_tokens=20),
        SamplingParams(max_tokens=9, temperature=0.7, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=15, temperature=1.3, presence_penalty=1.0, ignore_eos=True),
    ]
    with make_llm(tiny_model(FAMILY), seed=0) as llm:
        reference, other_seed = llm.generate([prompt, prompt], [seeded(11), seeded(12)])
    with make_llm(tiny_model(FAMILY), seed=7, max_num_batched_tokens=16) as llm:
        batch = llm.generate(
            [*others[:2], prompt, *others[2:]], [*other_params[:2], seeded(11), *other_params[2:]]
        )
    assert batch[2].token_ids == reference.token_ids
    assert other_seed.token_ids != reference.token_ids


def test_prefix_caching_on_and_off_give_the_same_greedy_output(tiny_model, random_prompts):
    shared, *suffixes = random_prompts([40, 3, 9, 17, 1, 25], seed=8)
    prompts = [shared + suffix for suffix in suffixes]
    results = {}
    for caching in (True, False):
        with make_llm(tiny_model(FAMILY), enable_prefix_caching=caching) as llm:
            seqs = record_plans(llm)
            first = llm.generate(prompts[:1], greedy(return_logits=True))
            results[caching] = first + llm.generate(prompts[1:], greedy(return_logits=True))
        first_chunks = {seq.start_pos for seq in seqs if seq.new is not None}
        assert first_chunks == ({0, 32} if caching else {0})  # 2 blocks of 16 reused
    for on, off in zip(results[True], results[False]):
        assert on.token_ids == off.token_ids
        assert (on.logits - off.logits).abs().max().item() <= 1e-4


def test_preemption_gives_the_same_greedy_output(tiny_model, random_prompts):
    prompts = random_prompts([5, 20, 11, 16, 8, 14], seed=9)
    with make_llm(tiny_model(FAMILY)) as llm:
        refs = llm.generate(prompts, greedy(max_tokens=16, return_logits=True))
    # 16 blocks of 4 tokens; each request grows to <= 36 tokens (9 blocks).
    with make_llm(
        tiny_model(FAMILY), block_size=4, num_kv_blocks=16, max_num_batched_tokens=16
    ) as llm:
        outs = llm.generate(prompts, greedy(max_tokens=16, return_logits=True))
    assert sum(out.num_preemptions for out in outs) > 0
    for out, ref in zip(outs, refs):
        assert out.token_ids == ref.token_ids
        assert (out.logits - ref.logits).abs().max().item() <= 1e-4


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([], "prompt is empty"),
        ("", "prompt is empty"),
        ([5, 384, 7], "token id 384 is outside the vocabulary [0, 384)"),
        ([5, -1], "token id -1 is outside the vocabulary [0, 384)"),
        ([5] * 64, "prompt has 64 tokens; the context holds 64"),
    ],
    ids=["empty-ids", "empty-text", "id-too-big", "id-negative", "too-long"],
)
def test_bad_prompt_is_refused_and_the_engine_serves_on(
    tiny_model, random_prompts, prompt, message
):
    (good,) = random_prompts([10], seed=10)
    with make_llm(tiny_model(FAMILY), max_model_len=64) as llm:
        (ref,) = llm.generate([good], greedy())
        with pytest.raises(InvalidRequest) as excinfo:
            llm.generate([good, prompt], greedy())
        assert message in str(excinfo.value)
        assert "\n" not in str(excinfo.value)
        assert not llm.engine.has_unfinished()  # the good prompt of that call was not queued
        (again,) = llm.generate([good], greedy())
        (longest,) = llm.generate([[5] * 63], greedy(max_tokens=1))
    assert again.token_ids == ref.token_ids
    assert longest.finish_reason == "length"


def test_prompt_larger_than_the_kv_cache_is_refused_up_front(tiny_model, random_prompts):
    good, too_long = random_prompts([10, 65], seed=12)
    with make_llm(tiny_model(FAMILY), block_size=4, num_kv_blocks=16) as llm:  # 64 slots
        with pytest.raises(InvalidRequest, match="prompt has 65 tokens; the KV cache holds 64"):
            llm.generate([good, too_long], greedy(max_tokens=4))
        assert not llm.engine.has_unfinished()
        (out,) = llm.generate([good], greedy(max_tokens=4))
    assert (len(out.token_ids), out.finish_reason) == (4, "length")


def test_bad_request_leaves_requests_in_flight_alone(tiny_model, random_prompts):
    (good,) = random_prompts([10], seed=10)
    with make_llm(tiny_model(FAMILY)) as llm:
        (ref,) = llm.generate([good], greedy())
        engine = llm.engine
        rid = engine.add_request(good, greedy())
        out = engine.get_output(rid)
        engine.step()
        with pytest.raises(InvalidRequest, match="prompt is empty"):
            engine.add_request([], greedy())
        with pytest.raises(InvalidRequest, match="already in use"):
            engine.add_request(good, greedy(), request_id=rid)
        while engine.has_unfinished():
            engine.step()
    assert (out.token_ids, out.finish_reason) == (ref.token_ids, "length")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (dict(max_tokens=0), "max_tokens must be >= 1, got 0"),
        (dict(temperature=-0.5), "temperature must be >= 0, got -0.5"),
        (dict(top_p=0.0), "top_p must be in (0, 1]"),
        (dict(stop=[""]), "stop strings must not be empty"),
    ],
)
def test_bad_sampling_params_are_refused_with_one_line(params, message):
    with pytest.raises(InvalidRequest) as excinfo:
        SamplingParams(**params)
    assert message in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(dtype="float8"), "unknown dtype 'float8'"),
        (dict(block_size=0), "block_size must be >= 1, got 0"),
        (dict(max_model_len=4096), "max_model_len 4096 exceeds the model's context (1024)"),
        (dict(no_such_option=1), "unknown engine option(s): no_such_option"),
    ],
)
def test_bad_engine_options_are_refused_with_one_line(tiny_model, options, message):
    with pytest.raises(ValueError) as excinfo:
        make_llm(tiny_model(FAMILY), **options)
    assert message in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


def test_context_manager_shuts_the_engine_down(tiny_model, random_prompts):
    (prompt,) = random_prompts([6], seed=11)
    with make_llm(tiny_model(FAMILY)) as llm:
        (out,) = llm.generate([prompt], greedy(max_tokens=3))
        assert llm.engine.executor is not None
    assert len(out.token_ids) == 3
    assert llm.engine.executor is None
    with pytest.raises(InvalidRequest, match="the engine is shut down"):
        llm.generate([prompt], greedy(max_tokens=3))


def test_request_that_would_outgrow_the_kv_cache_stops_at_its_capacity(tiny_model, random_prompts):
    (prompt,) = random_prompts([60], seed=13)
    with make_llm(tiny_model(FAMILY), block_size=4, num_kv_blocks=16) as llm:  # 64 slots
        assert llm.engine.max_model_len == 64
        (out,) = llm.generate([prompt], greedy(max_tokens=20))
    assert (len(out.token_ids), out.finish_reason) == (4, "length")


def test_explicit_context_longer_than_the_kv_cache_is_a_config_error(tiny_model):
    from titanserve.core.errors import ConfigError

    with pytest.raises(ConfigError, match="does not fit in the KV cache"):
        make_llm(tiny_model(FAMILY), block_size=4, num_kv_blocks=16, max_model_len=128)


def test_options_that_do_nothing_yet_are_refused_not_ignored(tiny_model):
    from titanserve.core.errors import ConfigError

    with pytest.raises(ConfigError, match="sequence parallel"):
        make_llm(tiny_model(FAMILY), sp_threshold=1024)
    with pytest.raises(ConfigError, match="unknown engine option"):
        make_llm(tiny_model(FAMILY), max_num_seq=4)


def test_engine_accounts_step_time_and_model_compute(tiny_model, random_prompts):
    prompts = random_prompts([12, 30], seed=14)
    with make_llm(tiny_model(FAMILY)) as llm:
        llm.generate(prompts, greedy(max_tokens=8))
        engine = llm.engine
        assert 0.0 < engine.compute_time_s <= engine.step_time_s
        assert 0.0 <= engine.overhead_fraction < 1.0


def test_worker_state_of_finished_requests_is_dropped(tiny_model, random_prompts):
    """A worker keeps per-request sampling state until a plan lists the request as finished.
    A step that schedules nothing is never sent (an idle server step, or async scheduling's
    step planned ahead of the last one), so the ids it would carry wait for the next step."""
    with make_llm(tiny_model("llama"), worker_processes=False) as llm:  # runner read
        states = llm.engine.executor.runner.states
        first = llm.generate(random_prompts([5, 7, 9]), greedy(4))
        assert len(states) == 3  # nothing has run since they finished
        assert llm.engine.step() == []  # an idle step
        (second,) = llm.generate(random_prompts([6], seed=1), greedy(4))
        assert set(states) == {second.request_id}
        assert not set(states) & {o.request_id for o in first}
        # and so are their block tables
        assert len(llm.engine.executor.runner.block_tables) == 1


def test_a_step_sent_but_never_collected_still_runs(tiny_model, random_prompts):
    """A worker runs every plan it is sent; so does the in-process executor when the engine
    failed between sending a step and collecting it: the next plans carry only the blocks
    that step did not, and generation goes on as in a clean run."""
    prompts = random_prompts([9, 20], seed=3)
    with make_llm(tiny_model("llama")) as llm:
        want = [o.token_ids for o in llm.generate(prompts, greedy(6))]
        engine = llm.engine
        for i, prompt in enumerate(prompts):
            engine.add_request(prompt, greedy(6), request_id=f"x{i}")
        engine.executor.submit(engine.scheduler.schedule().plans)  # then the engine failed
        outs: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for delta in engine.step():
                outs.setdefault(delta.request_id, []).extend(delta.new_token_ids)
    assert [outs[f"x{i}"] for i in range(2)] == want


def test_an_interrupted_run_raises_its_own_exception_when_cleanup_fails(
    tiny_model, random_prompts, monkeypatch
):
    """Ctrl-C during `generate`: the requests are aborted, and an abort that fails (state a
    step left half-changed) does not replace the KeyboardInterrupt."""
    prompts = random_prompts([8, 8], seed=11)
    with make_llm(tiny_model(FAMILY)) as llm:
        engine, steps = llm.engine, []
        real_step = engine.step

        def interrupted_step():
            steps.append(1)
            if len(steps) == 2:
                raise KeyboardInterrupt
            return real_step()

        def failing_abort(request_id):
            raise ValueError(f"{request_id} is half-moved")

        monkeypatch.setattr(engine, "step", interrupted_step)
        monkeypatch.setattr(engine, "abort", failing_abort)
        with pytest.raises(KeyboardInterrupt):
            llm.generate(prompts, greedy())
        steps.clear()
        with pytest.raises(KeyboardInterrupt):
            list(llm.stream(prompts, greedy()))
