"""Client <-> scheduler messages: round trips, field limits, and bad bytes that never crash."""

from __future__ import annotations

import random

import msgspec
import pytest

from titanserve.core.errors import InvalidRequest
from titanserve.core.sampling_params import SamplingParams
from titanserve.ipc import messages as m

ENCODER = msgspec.msgpack.Encoder()
TO_SCHEDULER = msgspec.msgpack.Decoder(m.ToScheduler)
TO_CLIENT = msgspec.msgpack.Decoder(m.ToClient)

TO_SCHEDULER_SAMPLES = [
    m.GenerateRequest(request_id="a", prompt="Hello", sampling=SamplingParams()),
    m.GenerateRequest(
        request_id="b",
        prompt_token_ids=[0, 1, 151643],
        sampling=SamplingParams(max_tokens=4, temperature=0.5, stop=["x"], seed=7, logprobs=2),
        stream=True,
    ),
    m.GenerateRequest(
        request_id="c",
        messages=[
            m.ChatMessage(role="system", content="Be brief."),
            m.ChatMessage(role="user", content="Hi ✓"),
            m.ChatMessage(role="assistant", content=""),
            m.ChatMessage(role="tool", content='{"ok": true}'),
        ],
        sampling=SamplingParams(temperature=0.0),
        add_generation_prompt=False,
    ),
    m.AbortRequest(request_id="a"),
    m.HealthRequest(),
    m.StatsRequest(),
]

TO_CLIENT_SAMPLES = [
    m.OutputDelta(request_id="a", new_token_ids=[5], new_text=" the"),
    m.OutputDelta(
        request_id="b",
        new_token_ids=[5, 6],
        new_text=" the end",
        finished=True,
        finish_reason="length",
        logprobs=[-0.25, -1.5],
        top_logprobs=[[(5, -0.25), (9, -2.0)], [(6, -1.5), (5, -1.75)]],
        num_prompt_tokens=3,
        num_generated_tokens=2,
    ),
    m.OutputDelta(request_id="c", finished=True, finish_reason="abort"),
    m.OutputBatch(deltas=[m.OutputDelta(request_id="a", new_token_ids=[5]),
                          m.OutputDelta(request_id="d", finished=True, finish_reason="stop")]),
    m.ErrorReply(request_id="a", kind="overloaded", message="queue is full: retry later"),
    m.ErrorReply(kind="invalid_request", message="message could not be decoded"),
    m.HealthReply(ok=True, num_workers=2, workers_alive=2, uptime_s=12.5),
    m.StatsReply(
        num_running=3,
        num_waiting=1,
        num_requests_total=40,
        num_prompt_tokens_total=1200,
        num_generated_tokens_total=800,
        kv_cache_usage=[0.25, 0.5],
        prefix_cache_hit_rate=0.125,
        num_steps_total=900,
        step_time_mean_s=0.015,
        overhead_fraction=0.0625,
        overhead_parts={"all-to-all wait": 0.0125, "all-to-all work": 0.025,
                        "engine + IPC": 0.025},
        workers_compute_apart=0.0875,
    ),
]

SAMPLES = [(s, TO_SCHEDULER) for s in TO_SCHEDULER_SAMPLES] + [
    (s, TO_CLIENT) for s in TO_CLIENT_SAMPLES
]
SAMPLE_IDS = [f"{type(s).__name__}-{i}" for i, (s, _) in enumerate(SAMPLES)]


def generate_request(**fields) -> bytes:
    """A GenerateRequest encoded from raw fields, as an untrusted client could send it."""
    return ENCODER.encode({"type": "GenerateRequest", "request_id": "r", "sampling": {}, **fields})


def chat(content: str = "hi", role: str = "user") -> dict:
    return {"type": "ChatMessage", "role": role, "content": content}


@pytest.mark.parametrize("sample, decoder", SAMPLES, ids=SAMPLE_IDS)
def test_round_trip(sample, decoder):
    assert decoder.decode(ENCODER.encode(sample)) == sample


@pytest.mark.parametrize("sample, decoder", SAMPLES, ids=SAMPLE_IDS)
def test_the_other_directions_decoder_refuses(sample, decoder):
    other = TO_CLIENT if decoder is TO_SCHEDULER else TO_SCHEDULER
    with pytest.raises(msgspec.ValidationError, match="Invalid value"):
        other.decode(ENCODER.encode(sample))


N_ID, N_CHARS = m.MAX_REQUEST_ID_CHARS, m.MAX_PROMPT_CHARS
N_TOKENS, N_MESSAGES = m.MAX_PROMPT_TOKENS, m.MAX_CHAT_MESSAGES
PROMPT = {"prompt": "x"}
LIMITS = {  # name: (other fields, a field at its limit, the same field one past it)
    "request_id": (PROMPT, {"request_id": "r" * N_ID}, {"request_id": "r" * (N_ID + 1)}),
    "empty_request_id": (PROMPT, {"request_id": "r"}, {"request_id": ""}),
    "prompt": ({}, {"prompt": "x" * N_CHARS}, {"prompt": "x" * (N_CHARS + 1)}),
    "prompt_chars_not_bytes": ({}, {"prompt": "é" * N_CHARS}, {"prompt": "é" * (N_CHARS + 1)}),
    "token_ids": (
        {},
        {"prompt_token_ids": [0] * N_TOKENS},
        {"prompt_token_ids": [0] * (N_TOKENS + 1)},
    ),
    "negative_token_id": ({}, {"prompt_token_ids": [0, 7]}, {"prompt_token_ids": [0, -1]}),
    "token_id_not_int": ({}, {"prompt_token_ids": [1]}, {"prompt_token_ids": [1.5]}),
    "messages": (
        {},
        {"messages": [chat()] * N_MESSAGES},
        {"messages": [chat()] * (N_MESSAGES + 1)},
    ),
    "content": (
        {},
        {"messages": [chat("x" * N_CHARS)]},
        {"messages": [chat("x" * (N_CHARS + 1))]},
    ),
    "role": ({}, {"messages": [chat(role="tool")]}, {"messages": [chat(role="developer")]}),
}


@pytest.mark.parametrize("others, at_limit, past_limit", LIMITS.values(), ids=LIMITS.keys())
def test_limits_accept_the_limit_and_refuse_one_past_it(others, at_limit, past_limit):
    (field,) = at_limit
    request = TO_SCHEDULER.decode(generate_request(**others, **at_limit))
    assert msgspec.to_builtins(request)[field] == at_limit[field]
    with pytest.raises(msgspec.ValidationError, match=rf"at `\$\.{field}"):
        TO_SCHEDULER.decode(generate_request(**others, **past_limit))


def test_abort_request_id_is_bounded():
    abort = lambda request_id: ENCODER.encode({"type": "AbortRequest", "request_id": request_id})
    assert TO_SCHEDULER.decode(abort("r" * N_ID)) == m.AbortRequest(request_id="r" * N_ID)
    for bad in ("", "r" * (N_ID + 1)):
        with pytest.raises(msgspec.ValidationError, match=r"at `\$\.request_id`"):
            TO_SCHEDULER.decode(abort(bad))


def test_error_kind_is_one_of_the_typed_client_errors():
    error = lambda kind: ENCODER.encode({"type": "ErrorReply", "kind": kind, "message": "m"})
    for kind in ("invalid_request", "overloaded", "worker_lost", "timeout", "internal"):
        assert TO_CLIENT.decode(error(kind)) == m.ErrorReply(kind=kind, message="m")
    with pytest.raises(msgspec.ValidationError, match=r"at `\$\.kind`"):
        TO_CLIENT.decode(error("bogus"))


def test_largest_single_field_requests_fit_the_client_message_size():
    widest_prompt = m.GenerateRequest(
        request_id="r" * N_ID, prompt="\U0001f600" * N_CHARS, sampling=SamplingParams()
    )
    widest_ids = m.GenerateRequest(
        request_id="r" * N_ID, prompt_token_ids=[2**32 - 1] * N_TOKENS, sampling=SamplingParams()
    )
    assert len(ENCODER.encode(widest_prompt)) < m.MAX_CLIENT_MESSAGE_BYTES
    assert len(ENCODER.encode(widest_ids)) < m.MAX_CLIENT_MESSAGE_BYTES


HI = m.ChatMessage(role="user", content="hi")
ONE_OF = {
    "none": {},
    "prompt_and_ids": {"prompt": "", "prompt_token_ids": [1]},
    "prompt_and_messages": {"prompt": "x", "messages": [HI]},
    "ids_and_messages": {"prompt_token_ids": [1], "messages": []},
    "all_three": {"prompt": "x", "prompt_token_ids": [1], "messages": [HI]},
}


@pytest.mark.parametrize("fields", ONE_OF.values(), ids=ONE_OF.keys())
def test_exactly_one_of_prompt_token_ids_or_messages(fields):
    with pytest.raises(msgspec.ValidationError, match="give exactly one of prompt"):
        TO_SCHEDULER.decode(generate_request(**msgspec.to_builtins(fields)))
    with pytest.raises(InvalidRequest, match="give exactly one of prompt"):
        m.GenerateRequest(request_id="r", sampling=SamplingParams(), **fields)


def test_empty_prompts_pass_the_wire_for_the_engine_to_judge():
    for fields in ({"prompt": ""}, {"prompt_token_ids": []}, {"messages": []}):
        assert TO_SCHEDULER.decode(generate_request(**fields)) == m.GenerateRequest(
            request_id="r", sampling=SamplingParams(), **fields
        )


def test_nested_sampling_params_are_validated_at_decode():
    with pytest.raises(msgspec.ValidationError, match="temperature must be >= 0"):
        TO_SCHEDULER.decode(generate_request(prompt="x", sampling={"temperature": -1}))
    with pytest.raises(msgspec.ValidationError, match=r"at `\$\.sampling.max_tokens`"):
        TO_SCHEDULER.decode(generate_request(prompt="x", sampling={"max_tokens": "many"}))


def test_invalid_utf8_raises_unicode_decode_error_which_decode_errors_covers():
    data = ENCODER.encode(m.AbortRequest(request_id="ab")).replace(b"\xa2ab", b"\xa2\xffb")
    with pytest.raises(UnicodeDecodeError):  # not a msgspec.DecodeError: msgspec issue #714
        TO_SCHEDULER.decode(data)
    assert UnicodeDecodeError in m.DECODE_ERRORS and msgspec.DecodeError in m.DECODE_ERRORS


@pytest.mark.parametrize("decoder", [TO_SCHEDULER, TO_CLIENT], ids=["to_scheduler", "to_client"])
def test_garbage_and_unknown_tags_raise_decode_errors(decoder):
    rng = random.Random(0)
    garbage = [b"", b"\xc1", b"\xff" * 8, b"\x81\xa4type", ENCODER.encode([1, 2, 3])]
    garbage += [rng.randbytes(rng.randrange(1, 64)) for _ in range(200)]
    for data in garbage:
        with pytest.raises(m.DECODE_ERRORS):
            decoder.decode(data)
    for tag in ("Bogus", "ChatMessage", "Shutdown", "StepPlan", ""):
        with pytest.raises(msgspec.ValidationError, match="Invalid value"):
            decoder.decode(ENCODER.encode({"type": tag, "request_id": "r"}))
    with pytest.raises(msgspec.ValidationError, match="Object missing required field `type`"):
        decoder.decode(ENCODER.encode({"request_id": "r"}))


@pytest.mark.parametrize("sample, decoder", SAMPLES, ids=SAMPLE_IDS)
def test_every_truncation_raises_a_decode_error(sample, decoder):
    data = ENCODER.encode(sample)
    for end in range(len(data)):
        with pytest.raises(msgspec.DecodeError):
            decoder.decode(data[:end])


@pytest.mark.parametrize("sample, decoder", SAMPLES, ids=SAMPLE_IDS)
def test_corrupted_bytes_decode_or_raise_decode_errors_never_anything_else(sample, decoder):
    rng = random.Random(1)
    data = ENCODER.encode(sample)
    for _ in range(1000):
        corrupted = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            corrupted[rng.randrange(len(data))] = rng.randrange(256)
        try:
            decoder.decode(bytes(corrupted))
        except m.DECODE_ERRORS:
            pass
