"""Where the scheduler places a new request among the workers: the longest cached prefix, else
the least loaded by the tokens its requests may still compute, never past max_num_seqs."""

from __future__ import annotations

from tests.core.test_scheduler import make_request, make_scheduler, run_step


def test_placement_prefers_longest_cached_prefix_else_least_loaded():
    scheduler = make_scheduler(block_size=4, max_num_batched_tokens=64, num_workers=2)
    shared = list(range(3, 11))
    scheduler.add(make_request("a", shared + [40, 41], max_tokens=20))
    scheduler.add(make_request("b", [50] * 14, max_tokens=20))
    run_step(scheduler)
    assert (scheduler.requests["a"].worker, scheduler.requests["b"].worker) == (0, 1)
    scheduler.add(make_request("x", [60] * 5, max_tokens=20))  # tie on load: lower usage wins
    run_step(scheduler)
    assert scheduler.requests["x"].worker == 0
    scheduler.add(make_request("c", shared + [70]))  # cached on worker 0, the busier one
    scheduler.add(make_request("d", [80] * 5))  # no prefix anywhere: least loaded
    out = run_step(scheduler)
    assert (scheduler.requests["c"].worker, scheduler.requests["d"].worker) == (0, 1)
    (c_seq,) = [s for s in out.plans[0].seqs if s.request_id == "c"]
    assert c_seq.start_pos == 8


def test_placement_balances_the_outputs_left_not_the_request_count():
    scheduler = make_scheduler(block_size=4, max_num_batched_tokens=64, num_workers=2)
    scheduler.add(make_request("long", [5] * 6, max_tokens=100))
    scheduler.add(make_request("short1", [6] * 6, max_tokens=5))
    scheduler.add(make_request("short2", [7] * 6, max_tokens=5))
    run_step(scheduler)
    workers = {rid: r.worker for rid, r in scheduler.requests.items()}
    assert workers == {"long": 0, "short1": 1, "short2": 1}  # 99 outputs left vs 4
    scheduler.add(make_request("next", [8] * 6, max_tokens=50))
    run_step(scheduler)
    assert scheduler.requests["next"].worker == 1  # 8 + 49 left on 1 < 98 on 0


def test_placement_counts_the_prompt_tokens_still_to_prefill():
    """A worker given a long prompt has more to compute than one with a few more outputs
    left: the next requests go to the other (the two prefills would stall the step)."""
    scheduler = make_scheduler(block_size=4, max_num_batched_tokens=256, num_workers=2)
    scheduler.add(make_request("long", [5] * 40, max_tokens=2))
    scheduler.add(make_request("short1", [6] * 4, max_tokens=8))
    scheduler.add(make_request("short2", [7] * 4, max_tokens=8))  # 42 left on 0, 12 on 1
    run_step(scheduler)
    workers = {rid: r.worker for rid, r in scheduler.requests.items()}
    assert workers == {"long": 0, "short1": 1, "short2": 1}


def test_placement_skips_a_worker_at_max_num_seqs_even_with_a_cached_prefix():
    scheduler = make_scheduler(
        block_size=4, max_num_batched_tokens=64, max_num_seqs=1, num_workers=2
    )
    shared = list(range(3, 11))
    scheduler.add(make_request("a", shared + [40], max_tokens=20))
    run_step(scheduler)
    scheduler.add(make_request("c", shared + [70]))
    out = run_step(scheduler)
    assert scheduler.requests["c"].worker == 1
    assert out.plans[1].seqs[0].start_pos == 0

