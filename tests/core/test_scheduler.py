"""Scheduler policy, driven with fake sampled tokens (no model): token budgets, max_num_seqs,
chunked prefill, decodes first, prefix-cache hits, preemption by recompute, aborts, and no
block leaks over a long random run (placement: test_placement.py)."""

from __future__ import annotations

import random

import pytest

from titanserve.core.block_manager import BlockManager
from titanserve.core.block_tables import BlockTables
from titanserve.core.request import Request, RequestStatus
from titanserve.core.sampling_params import SamplingParams
from titanserve.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_batched_tokens: int = 16,
    max_num_seqs: int = 8,
    max_model_len: int = 1024,
    num_workers: int = 1,
    enable_prefix_caching: bool = True,
    two_batch_min_seqs: int = 0,
) -> Scheduler:
    config = SchedulerConfig(
        max_num_batched_tokens, max_num_seqs, max_model_len, num_workers, two_batch_min_seqs
    )
    return Scheduler(
        config,
        [
            BlockManager(num_blocks, block_size, enable_prefix_caching)
            for _ in range(num_workers)
        ],
    )


def make_request(
    request_id: str, token_ids: list[int], max_tokens: int = 4, **sampling
) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, **sampling)
    return Request(request_id, token_ids, params, eos_token_ids=(0,))


def run_step(scheduler: Scheduler, token_id: int = 7) -> SchedulerOutput:
    """One step, every sampling request receiving `token_id`."""
    out = scheduler.schedule()
    scheduler.update(out, {s.request.request_id: token_id for s in out.scheduled if s.sample})
    return out


def chunks(out: SchedulerOutput) -> dict[str, int]:
    return {s.request.request_id: s.num_new_tokens for s in out.scheduled}


class FakeKV:
    """Workers whose KV caches hold token ids instead of tensors: every plan writes its
    tokens at its slots, then every position the step attends to must hold the right token.
    This catches a block table that points at another request's (or an evicted) block.
    Like a real worker it fills a placeholder (async scheduling) with its own last sample."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.block_size = scheduler.block_managers[0].block_size
        self.slots = [
            [[None] * self.block_size for _ in range(bm.num_blocks)]
            for bm in scheduler.block_managers
        ]
        self.last_sample: dict[tuple[int, str], int] = {}
        # what a worker keeps of the tables (the plans carry what they gained)
        self.tables = [BlockTables(4) for _ in scheduler.block_managers]

    def run(self, out: SchedulerOutput, sample=lambda: 7) -> dict[str, int]:
        """Run a step's plans; returns the token sampled for each sampling request."""
        sampled = {}
        for worker, plan in enumerate(out.plans):
            for request_id in plan.finished_ids:
                self.tables[worker].drop(request_id)
            for seq in plan.seqs:
                request = scheduler_request(out, seq.request_id)
                bs, slots = self.block_size, self.slots[worker]
                table = self.tables[worker].blocks(self.tables[worker].update(seq)).tolist()
                tokens = seq.token_ids
                if seq.follows_sample:
                    assert tokens == [] and request.num_tokens >= seq.start_pos
                    tokens = [self.last_sample[(worker, seq.request_id)]]
                for i, token in enumerate(tokens):
                    pos = seq.start_pos + i
                    slots[table[pos // bs]][pos % bs] = token
                context = seq.start_pos + len(tokens)
                if request.status == RequestStatus.RUNNING and request.worker == worker:
                    # a prefix: the step planned ahead may have grown the table since
                    assert table == request.block_ids[: len(table)], seq.request_id
                    held = [slots[table[p // bs]][p % bs] for p in range(context)]
                    assert held == request.all_token_ids[:context], seq.request_id
                # else it ended (or was preempted) while the step was in flight: work wasted
                if seq.sample:
                    sampled[seq.request_id] = self.last_sample[(worker, seq.request_id)] = sample()
        return sampled


def scheduler_request(out: SchedulerOutput, request_id: str) -> Request:
    return next(s.request for s in out.scheduled if s.request.request_id == request_id)


def test_chunked_prefill_splits_a_long_prompt_into_budget_sized_chunks():
    scheduler = make_scheduler(max_num_batched_tokens=16)
    prompt = list(range(3, 53))  # 50 tokens
    scheduler.add(make_request("a", prompt, max_tokens=3))
    plans = []
    while scheduler.has_unfinished():
        out = run_step(scheduler)
        plans.extend(out.plans[0].seqs)
    assert [(p.start_pos, len(p.token_ids), p.sample) for p in plans] == [
        (0, 16, False),
        (16, 16, False),
        (32, 16, False),
        (48, 2, True),
        (50, 1, True),
        (51, 1, True),
    ]
    assert [p.token_ids for p in plans[:4]] == [prompt[:16], prompt[16:32], prompt[32:48], [51, 52]]
    assert plans[4].token_ids == plans[5].token_ids == [7]
    # each plan sends the blocks the table gained since the one before
    assert [(p.block_start, len(p.block_ids)) for p in plans] == [
        (0, 4), (4, 4), (8, 4), (12, 1), (13, 0), (13, 0)
    ]
    assert plans[0].new is not None and plans[0].new.num_prompt_tokens == 50
    assert all(p.new is None for p in plans[1:])


def test_decodes_are_scheduled_before_new_prefills():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    scheduler.add(make_request("a", [5] * 6, max_tokens=10))
    assert chunks(run_step(scheduler)) == {"a": 6}
    scheduler.add(make_request("b", [6] * 20))
    out = run_step(scheduler)
    assert chunks(out) == {"a": 1, "b": 7}
    assert [s.request_id for s in out.plans[0].seqs] == ["a", "b"]


def test_running_prefill_keeps_its_budget_before_waiting_requests():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    scheduler.add(make_request("long", [5] * 30))
    scheduler.add(make_request("late", [6] * 4))
    assert chunks(run_step(scheduler)) == {"long": 8}
    assert chunks(run_step(scheduler)) == {"long": 8}
    assert chunks(run_step(scheduler)) == {"long": 8}
    assert chunks(run_step(scheduler)) == {"long": 6, "late": 2}


def test_single_token_rows_lead_the_plan():
    """NOTE in the scheduler: the runner relies on single-token rows coming first."""
    scheduler = make_scheduler(max_num_batched_tokens=12)
    scheduler.add(make_request("long", [5] * 14))
    assert chunks(run_step(scheduler)) == {"long": 12}
    scheduler.add(make_request("one", [6]))
    out = run_step(scheduler)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [
        ("long", 2),
        ("one", 1),
    ]
    assert [s.request_id for s in out.plans[0].seqs] == ["one", "long"]


def test_budget_and_max_num_seqs_hold_on_every_worker_every_step():
    rng = random.Random(0)
    budget, max_seqs = 24, 3
    scheduler = make_scheduler(
        num_blocks=40, max_num_batched_tokens=budget, max_num_seqs=max_seqs, num_workers=2
    )
    for i in range(60):
        prompt = [rng.randrange(3, 50) for _ in range(rng.randrange(1, 60))]
        scheduler.add(make_request(f"r{i}", prompt, max_tokens=rng.randrange(1, 12)))
    biggest_step = 0
    while scheduler.has_unfinished():
        out = run_step(scheduler, token_id=rng.randrange(3, 50))
        for plan in out.plans:
            num_tokens = sum(len(seq.token_ids) for seq in plan.seqs)
            assert num_tokens <= budget
            assert len(plan.seqs) <= max_seqs
            biggest_step = max(biggest_step, num_tokens)
        for worker in range(2):
            assert sum(r.worker == worker for r in scheduler.running) <= max_seqs
    assert biggest_step == budget


def test_prefix_hit_computes_only_the_uncached_tail():
    scheduler = make_scheduler(block_size=4, max_num_batched_tokens=64)
    prompt = list(range(3, 13))  # 10 tokens: 2 full blocks
    scheduler.add(make_request("a", prompt))
    a = scheduler.requests["a"]
    run_step(scheduler)
    scheduler.add(make_request("b", prompt[:8] + [60, 61, 62]))
    scheduler.add(make_request("c", prompt[:8]))
    out = run_step(scheduler)
    seqs = {seq.request_id: seq for seq in out.plans[0].seqs}
    assert (seqs["b"].start_pos, seqs["b"].token_ids) == (8, [60, 61, 62])
    assert seqs["b"].block_ids[:2] == a.block_ids[:2]
    # c is all cached blocks: its last block is computed again to produce a token
    assert (seqs["c"].start_pos, seqs["c"].token_ids) == (4, prompt[4:8])
    assert seqs["c"].block_ids[0] == a.block_ids[0]


def test_prompt_logits_request_never_takes_cached_blocks():
    scheduler = make_scheduler(block_size=4, max_num_batched_tokens=64)
    prompt = list(range(3, 13))
    scheduler.add(make_request("a", prompt))
    run_step(scheduler)
    scheduler.add(make_request("b", prompt, return_prompt_logits=True))
    out = run_step(scheduler)
    (seq,) = [s for s in out.plans[0].seqs if s.request_id == "b"]
    assert (seq.start_pos, seq.token_ids) == (0, prompt)


def test_preemption_keeps_generated_tokens_and_recomputes_them():
    # 4 blocks of 4 tokens: two requests of 6 prompt tokens fill the cache at 8 tokens each.
    scheduler = make_scheduler(
        num_blocks=4, block_size=4, max_num_batched_tokens=16, enable_prefix_caching=False
    )
    scheduler.add(make_request("a", [5] * 6, max_tokens=10))
    scheduler.add(make_request("b", [6] * 6, max_tokens=6, repetition_penalty=1.2))
    a, b = scheduler.requests["a"], scheduler.requests["b"]
    for token in (10, 11, 12):
        assert run_step(scheduler, token).preempted == []
    assert a.num_tokens == b.num_tokens == 9
    out = run_step(scheduler, 13)  # a needs a third block: b (the newest) is preempted
    assert out.preempted == [b]
    assert chunks(out) == {"a": 1}
    assert b.status == RequestStatus.WAITING
    assert (b.num_computed_tokens, b.block_ids, b.worker) == (0, [], None)
    assert b.output_token_ids == [10, 11, 12]
    assert b.num_preemptions == 1
    assert out.plans[0].finished_ids == ["b"]  # the worker drops b's sampling state
    while "a" in scheduler.requests:
        out = run_step(scheduler, 14)
        assert "b" not in chunks(out)
    assert a.output_token_ids == [10, 11, 12, 13] + [14] * 6
    out = run_step(scheduler, 20)
    (seq,) = out.plans[0].seqs
    assert (seq.start_pos, seq.token_ids, seq.sample) == (0, [6] * 6 + [10, 11, 12], True)
    assert seq.new.num_prompt_tokens == 6
    assert seq.new.history_token_ids == [6] * 6 + [10, 11, 12]
    while scheduler.has_unfinished():
        run_step(scheduler, 21)
    assert b.output_token_ids == [10, 11, 12, 20, 21, 21]
    assert b.finish_reason == "length"


def test_abort_releases_blocks_and_tells_the_worker():
    scheduler = make_scheduler(num_blocks=8, block_size=4, enable_prefix_caching=False)
    scheduler.add(make_request("a", [5] * 10, max_tokens=20))
    run_step(scheduler)
    request = scheduler.requests["a"]
    scheduler.finish(request, "abort")
    assert (request.finish_reason, request.block_ids) == ("abort", [])
    assert scheduler.block_managers[0].num_free_blocks == 8
    assert scheduler.schedule().plans[0].finished_ids == ["a"]
    # That step was empty, so no worker got it: the next step that runs says it again, once.
    scheduler.add(make_request("b", [6] * 3))
    assert scheduler.schedule().plans[0].finished_ids == ["a"]
    assert scheduler.schedule().plans[0].finished_ids == []


@pytest.mark.parametrize("status", [RequestStatus.WAITING, RequestStatus.RUNNING])
def test_a_request_caught_between_the_queues_can_be_aborted(status):
    """A Ctrl-C can stop a schedule after it took a request off one queue and before it put
    it on the other (admission, preemption): aborting it still works, and nothing leaks."""
    scheduler = make_scheduler(num_blocks=8, block_size=4, enable_prefix_caching=False)
    scheduler.add(make_request("a", [5] * 6))
    request = scheduler.waiting.popleft()  # as admission does, stopped before it runs
    request.status = status
    scheduler.finish(request, "abort")
    assert request.finish_reason == "abort" and "a" not in scheduler.requests
    assert not scheduler.waiting and not scheduler.running
    scheduler.add(make_request("b", [6] * 3, max_tokens=2))
    while scheduler.has_unfinished():
        run_step(scheduler)
    assert scheduler.block_managers[0].num_free_blocks == 8


def test_request_aborted_while_its_step_ran_is_left_alone():
    scheduler = make_scheduler()
    scheduler.add(make_request("a", [5] * 6))
    out = scheduler.schedule()
    request = scheduler.requests["a"]
    scheduler.finish(request, "abort")
    assert scheduler.update(out, {"a": 9}) == []
    assert (request.num_computed_tokens, request.output_token_ids) == (0, [])


def test_token_level_finish_reasons():
    scheduler = make_scheduler(max_num_batched_tokens=64, max_model_len=12)
    scheduler.add(make_request("eos", [5] * 4, max_tokens=8))
    scheduler.add(make_request("ignore", [5] * 4, max_tokens=3, ignore_eos=True))
    scheduler.add(make_request("stop_id", [5] * 4, max_tokens=8, stop_token_ids=[9]))
    scheduler.add(make_request("context", [5] * 10, max_tokens=8, ignore_eos=True))
    requests = dict(scheduler.requests)
    run_step(scheduler, 9)
    run_step(scheduler, 0)
    while scheduler.has_unfinished():
        run_step(scheduler, 8)
    reasons = {rid: (r.finish_reason, r.output_token_ids) for rid, r in requests.items()}
    assert reasons == {
        "eos": ("stop", [9, 0]),
        "ignore": ("length", [9, 0, 8]),
        "stop_id": ("stop", [9]),
        "context": ("length", [9, 0]),  # 10 + 2 tokens fill max_model_len
    }


@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async"])
def test_no_block_leaks_after_1000_random_requests(ahead):
    """Random prompts over a few shared prefixes, random lengths, eos and aborts, on a cache
    small enough to preempt often. Every block is free with ref count 0 at the end, and the
    fake KV always holds each request's own tokens. `ahead`: each step is planned while the
    one before is still in flight (async scheduling), so requests end, are aborted and are
    preempted with a step in flight, and decodes follow samples the scheduler has not seen."""
    rng = random.Random(1234)
    block_size, num_blocks = 4, 24
    scheduler = make_scheduler(
        num_blocks=num_blocks,
        block_size=block_size,
        max_num_batched_tokens=32,
        max_num_seqs=6,
        max_model_len=num_blocks * block_size,
        num_workers=2,
    )
    kv = FakeKV(scheduler)
    prefixes = [[rng.randrange(3, 20) for _ in range(n)] for n in (4, 9, 13)]
    num_added = num_preempted = num_aborted = num_cache_hits = num_steps = num_follows = 0
    in_flight = None
    while num_added < 1000 or scheduler.has_unfinished() or in_flight:
        num_steps += 1
        assert num_steps < 50_000, "the scheduler stopped making progress"
        for _ in range(rng.randrange(0, 3) if num_added < 1000 else 0):
            prefix = rng.choice(prefixes) if rng.random() < 0.6 else []
            prompt = prefix + [rng.randrange(3, 20) for _ in range(rng.randrange(1, 30))]
            max_tokens = rng.randrange(1, num_blocks * block_size - len(prompt))
            scheduler.add(make_request(f"r{num_added}", prompt, max_tokens=max_tokens))
            num_added += 1
        out = scheduler.schedule(ahead_of=in_flight)
        for plan in out.plans:
            sizes = [1 if seq.follows_sample else len(seq.token_ids) for seq in plan.seqs]
            assert sizes == sorted(sizes, key=lambda n: n != 1)  # single-token rows first
            assert sum(sizes) <= 32
        num_preempted += len(out.preempted)
        num_cache_hits += sum(
            seq.start_pos > 0 and seq.new is not None for plan in out.plans for seq in plan.seqs
        )
        num_follows += sum(seq.follows_sample for plan in out.plans for seq in plan.seqs)
        if ahead:  # the step before runs and is updated only now
            done, in_flight = in_flight, (out if out.scheduled else None)
        else:
            done = out
        if done is not None:
            sampled = kv.run(done, lambda: rng.choice([0, *range(3, 20)]))
            scheduler.update(done, sampled)
        if scheduler.running and rng.random() < 0.05:
            scheduler.finish(rng.choice(scheduler.running), "abort")
            num_aborted += 1
        assert_block_accounting(scheduler)
    assert num_preempted > 50 and num_aborted > 50 and num_cache_hits > 50
    assert (num_follows > 1000) == ahead
    for block_manager in scheduler.block_managers:
        assert block_manager.ref_counts == [0] * num_blocks
        assert block_manager.num_free_blocks == num_blocks
    assert scheduler.running == [] and not scheduler.waiting and scheduler.requests == {}


def assert_block_accounting(scheduler: Scheduler) -> None:
    """Ref counts equal the table entries that point at each block; free means ref 0."""
    for worker, block_manager in enumerate(scheduler.block_managers):
        expected = [0] * block_manager.num_blocks
        for request in scheduler.running:
            if request.worker == worker:
                for block in request.block_ids:
                    expected[block] += 1
        assert block_manager.ref_counts == expected
        free = {b for b in range(block_manager.num_blocks) if expected[b] == 0}
        assert set(block_manager.free_blocks) == free
    for request in scheduler.waiting:
        assert (request.block_ids, request.num_computed_tokens) == ([], 0)


def test_update_of_one_worker_leaves_the_others_for_their_results():
    """Results arrive worker by worker: updating worker 0 advances only its sequences."""
    scheduler = make_scheduler(num_workers=2, max_num_batched_tokens=64)
    for i in range(4):
        scheduler.add(make_request(f"r{i}", [5, 6, 7], max_tokens=1))
    out = scheduler.schedule()
    workers = {s.request.request_id: s.worker for s in out.scheduled}
    assert sorted(workers.values()) == [0, 0, 1, 1]
    sampled = {rid: 9 for rid in workers}
    taken = scheduler.update(out, sampled, worker=0)
    assert sorted(r.request_id for r, _ in taken) == sorted(r for r, w in workers.items() if w == 0)
    assert all(r.is_finished and token == 9 for r, token in taken)
    for s in out.scheduled:
        assert s.request.num_computed_tokens == (3 if s.worker == 0 else 0)
    taken = scheduler.update(out, sampled, worker=1)
    assert len(taken) == 2 and not scheduler.has_unfinished()


def test_async_plan_follows_the_sample_in_flight_and_stops_where_length_ends_it():
    scheduler = make_scheduler(block_size=4, max_num_batched_tokens=64)
    scheduler.add(make_request("a", [5] * 6, max_tokens=3))
    first = scheduler.schedule()
    second = scheduler.schedule(ahead_of=first)  # first's token is not known yet
    (seq,) = second.plans[0].seqs
    assert (seq.start_pos, seq.token_ids, seq.follows_sample, seq.sample) == (6, [], True, True)
    assert seq.block_start + len(seq.block_ids) == 2  # room for position 6
    request = scheduler.requests["a"]
    assert (request.num_computed_tokens, request.num_tokens) == (0, 6)  # nothing changed yet
    assert [(r.request_id, t) for r, t in scheduler.update(first, {"a": 10})] == [("a", 10)]
    third = scheduler.schedule(ahead_of=second)
    assert [(s.start_pos, s.follows_sample) for s in third.plans[0].seqs] == [(7, True)]
    scheduler.update(second, {"a": 11})
    assert scheduler.schedule(ahead_of=third).scheduled == []  # third's token is the 3rd
    scheduler.update(third, {"a": 12})
    assert (request.finish_reason, request.output_token_ids) == ("length", [10, 11, 12])
    assert request.num_computed_tokens == 8


def test_async_step_of_a_request_eos_ended_meanwhile_is_dropped():
    scheduler = make_scheduler(block_size=4, max_num_batched_tokens=64)
    scheduler.add(make_request("a", [5] * 6, max_tokens=10))
    first = scheduler.schedule()
    second = scheduler.schedule(ahead_of=first)
    scheduler.update(first, {"a": 0})  # eos
    request = scheduler.requests.get("a")
    assert request is None and scheduler.block_managers[0].num_free_blocks == 64
    assert scheduler.update(second, {"a": 3}) == []
    assert scheduler.schedule().plans[0].finished_ids == ["a"]
