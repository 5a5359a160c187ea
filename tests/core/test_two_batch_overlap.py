"""Two-batch overlap: staged forwards (core.model.stages), the split of a step into two
micro-batches, the exchanges they interleave, and the engine serving that way."""

from __future__ import annotations

import pytest
import torch

from tests.core.test_multiworker import check_against_hf, tiny
from tests.core.test_scheduler import make_request, make_scheduler, run_step
from titanserve.core.config import ModelConfig
from titanserve.core.model.stages import finish, interleave
from titanserve.core.model_runner import ModelRunner, split_in_halves
from titanserve.core.sampling_params import SamplingParams
from titanserve.ipc.collectives.zmq_mesh import ZmqMeshCollective
from titanserve.ipc.messages import NewRequest, SeqPlan, StepPlan
from titanserve.moe.dispatch import ExpertParallel
from titanserve.moe.layer import MoELayer
from titanserve.moe.placement import ExpertPlacement


def staged(name: str, exchanges: int, log: list[str], fail_at: int | None = None):
    """A pass that computes, starts an exchange and yields, `exchanges` times."""
    for i in range(exchanges):
        if i == fail_at:
            raise RuntimeError(f"{name} failed")
        log.append(f"{name} start {i}")
        yield
        log.append(f"{name} wait {i}")
    return f"{name} done"


def test_finish_runs_a_pass_alone_with_each_exchange_waited_at_once():
    log: list[str] = []
    assert finish(staged("a", 2, log)) == "a done"
    assert log == ["a start 0", "a wait 0", "a start 1", "a wait 1"]


def test_interleave_keeps_one_exchange_of_each_pass_in_flight_and_waits_in_start_order():
    log: list[str] = []
    assert interleave([staged("a", 2, log), staged("b", 2, log)]) == ["a done", "b done"]
    assert log == [
        "a start 0", "b start 0",
        "a wait 0", "a start 1",  # a computes while b's exchange 0 is in flight
        "b wait 0", "b start 1",
        "a wait 1", "b wait 1",
    ]  # fmt: skip


def test_a_failing_pass_closes_the_other():
    log: list[str] = []
    other = staged("b", 3, log)
    with pytest.raises(RuntimeError, match="a failed"):
        interleave([staged("a", 3, log, fail_at=1), other])
    with pytest.raises(StopIteration):  # closed: it never resumes
        next(other)


@pytest.mark.parametrize(
    "num_tokens, cut",
    [
        ([], 0),
        ([1], 0),  # one sequence: the other micro-batch is empty
        ([1] * 32, 16),
        ([1] * 5, 2),
        ([1, 1, 1, 100], 3),  # a long prefill chunk goes alone
        ([100, 1, 1, 1], 1),
        ([1, 1, 40, 40], 3),
    ],
)
def test_a_step_splits_where_the_larger_micro_batch_is_smallest(num_tokens, cut):
    assert split_in_halves(num_tokens) == cut


class RecordingMesh(ZmqMeshCollective):
    """A one-rank mesh that logs each all-to-all's start and wait, by sequence number."""

    def __init__(self) -> None:
        super().__init__(0, 1)
        self.log: list[tuple[str, int]] = []

    def all_to_all_cat_start(self, send):
        seq = self._seq
        self.log.append(("start", seq))
        pending = super().all_to_all_cat_start(send)
        wait = pending.wait

        def logged_wait():
            self.log.append(("wait", seq))
            return wait()

        pending.wait = logged_wait
        return pending


def runner_with_exchange(path) -> tuple[ModelRunner, RecordingMesh]:
    cfg = ModelConfig.from_hf(path)
    placement = ExpertPlacement.contiguous(cfg.num_experts)
    runner = ModelRunner(path, cfg, torch.float32, 16, 64, 256, placement, progress=False)
    mesh = RecordingMesh()
    exchange = ExpertParallel(mesh)
    for module in runner.model.modules():
        if isinstance(module, MoELayer):
            module.exchange = exchange
            module.use_placement(placement)
    runner.lockstep = True
    return runner, mesh


def test_two_micro_batches_give_the_one_batch_results_with_exchanges_in_flight(
    tiny_model, random_prompts
):
    """The runner's split, the interleaved passes and the exchange all together: the same
    tokens and logits as one batch, each exchange waited for only after the other micro-
    batch has started its own."""
    path = tiny_model("mixtral")
    greedy = SamplingParams(temperature=0.0, return_logits=True)
    prompts = random_prompts([5, 9, 3, 12])
    results = []
    for two_batches in (False, True):
        runner, mesh = runner_with_exchange(path)
        seqs = [
            SeqPlan(request_id=f"r{i}", token_ids=p, start_pos=0, block_ids=[i], sample=True,
                    new=NewRequest(sampling=greedy, num_prompt_tokens=len(p)))
            for i, p in enumerate(prompts)
        ]  # fmt: skip
        result, logits = runner.execute(StepPlan(step_id=0, seqs=seqs, two_batches=two_batches))
        results.append(([s.token_id for s in result.seqs], logits, mesh.log))
    (tokens, logits, log), (tokens2, logits2, log2) = results
    assert tokens2 == tokens and (logits2 - logits).abs().max().item() <= 1e-5
    layers = ModelConfig.from_hf(path).num_layers
    assert log == [(verb, seq) for seq in range(2 * layers) for verb in ("start", "wait")]
    # micro-batch 0 runs even ops, 1 odd ones; each op is waited for once the next started
    assert log2[:4] == [("start", 0), ("start", 1), ("wait", 0), ("start", 2)]
    assert len(log2) == 2 * len(log)
    for k, (verb, seq) in enumerate(log2):
        if verb == "wait":
            assert ("start", seq + 1) in log2[:k] or seq == 4 * layers - 1


@pytest.mark.parametrize("least, expected", [(3, [False, True]), (0, [False, False])])
def test_steps_with_enough_sequences_go_as_two_micro_batches_on_every_worker(least, expected):
    scheduler = make_scheduler(block_size=4, max_num_batched_tokens=64, num_workers=2,
                               two_batch_min_seqs=least)  # fmt: skip
    for i in range(2):
        scheduler.add(make_request(f"a{i}", [1, 2, 3], max_tokens=8))
    out = run_step(scheduler)
    assert len(out.scheduled) == 2 and [p.two_batches for p in out.plans] == [expected[0]] * 2
    scheduler.add(make_request("b", [1, 2, 3], max_tokens=8))
    out = run_step(scheduler)  # one worker runs two sequences, the other one: both split
    assert len(out.scheduled) == 3 and [p.two_batches for p in out.plans] == [expected[1]] * 2


@pytest.mark.parametrize("family, num_workers", [("qwen2-moe", 2), ("mixtral", 4)])
def test_two_batch_overlap_matches_transformers(family, num_workers, tmp_path_factory,
                                                monkeypatch):
    """Steps run as two micro-batches, each one's all-to-alls in flight while the other
    computes (a shared expert's too, in Qwen2-MoE): the same tokens and logits."""
    from titanserve.core import engine
    from titanserve.core.multiproc_executor import MultiProcExecutor

    monkeypatch.setattr(engine, "TWO_BATCH_MIN_SEQS_PER_WORKER", 1)
    two_batches, submit = [], MultiProcExecutor.submit

    def watched_submit(self, plans):
        assert len({plan.two_batches for plan in plans}) == 1  # every worker alike
        two_batches.append(plans[0].two_batches)
        submit(self, plans)

    monkeypatch.setattr(MultiProcExecutor, "submit", watched_submit)
    check_against_hf(tiny(family, tmp_path_factory), num_workers, "zmq", two_batch_overlap=True)
    assert any(two_batches)
