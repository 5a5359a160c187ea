"""Every wire message round-trips through msgpack; bad bytes raise typed decode errors."""

from __future__ import annotations

import msgspec
import pytest

from titanserve.core.engine_config import EngineConfig
from titanserve.core.sampling_params import SamplingParams
from titanserve.ipc import messages as m

SAMPLES = [
    m.StepPlan(
        step_id=3,
        seqs=[
            m.SeqPlan(
                request_id="a", token_ids=[1, 2, 3], start_pos=0, block_ids=[4, 5], sample=True,
                new=m.NewRequest(
                    sampling=SamplingParams(max_tokens=4, temperature=0.5, stop=["x"], seed=7),
                    num_prompt_tokens=3, history_token_ids=[1, 2, 3],
                ),
            ),
            m.SeqPlan(request_id="b", token_ids=[9], start_pos=17, block_ids=[1], sample=True),
        ],
        finished_ids=["c"],
    ),
    m.StepResult(
        step_id=3,
        seqs=[
            m.SeqResult(request_id="a", token_id=5, logprob=-0.25, top_logprobs=[(5, -0.25)],
                        logits_row=0, prompt_logits_rows=(1, 4), prompt_logits_start_pos=0),
            m.SeqResult(request_id="b"),
        ],
        compute_time_s=0.5,
        comm_time_s=0.125,
        comm_wait_s=0.0625,
    ),
    m.WorkerReady(rank=1, local_experts=[4, 5, 6, 7], expert_param_count=1024, num_kv_blocks=64),
    m.WorkerError(rank=0, message="boom", fatal=True, lost_rank=1),
    m.Shutdown(),
    m.Hello(rank=1, pid=4242),
    m.LoadModel(
        config=EngineConfig(model="/m", num_workers=2, num_kv_blocks=9, max_model_len=64),
        model_path="/m",
        comm_port=29500,
    ),
    m.Heartbeat(rank=0),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda s: type(s).__name__)
def test_round_trip(message):
    data = msgspec.msgpack.encode(message)
    to_worker = (m.StepPlan, m.LoadModel, m.Shutdown)
    union = m.ToWorker if isinstance(message, to_worker) else m.FromWorker
    assert msgspec.msgpack.decode(data, type=union) == message


def test_truncated_and_garbage_bytes_raise_decode_errors():
    data = msgspec.msgpack.encode(SAMPLES[0])
    decoder = msgspec.msgpack.Decoder(m.ToWorker)
    with pytest.raises(msgspec.DecodeError):
        decoder.decode(data[: len(data) // 2])
    with pytest.raises(msgspec.DecodeError):
        decoder.decode(b"\xc1garbage")
    with pytest.raises(msgspec.ValidationError):  # a worker-bound socket refuses results
        decoder.decode(msgspec.msgpack.encode(SAMPLES[1]))


def test_invalid_sampling_params_are_refused_at_decode():
    bad = msgspec.msgpack.encode({"type": "NewRequest", "sampling": {"max_tokens": 0},
                                  "num_prompt_tokens": 1})
    with pytest.raises(msgspec.ValidationError, match="max_tokens"):
        msgspec.msgpack.decode(bad, type=m.NewRequest)


def test_load_model_with_an_invalid_engine_config_is_refused_at_decode():
    good = msgspec.to_builtins(SAMPLES[-2])
    good["config"]["num_workers"] = 0
    with pytest.raises(msgspec.ValidationError, match="num_workers"):
        msgspec.msgpack.Decoder(m.ToWorker).decode(msgspec.msgpack.encode(good))
