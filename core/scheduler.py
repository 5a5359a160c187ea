"""Continuous-batching scheduler: a token budget per worker per step, running requests
first, then waiting ones (chunked prefill), prefix-cache-aware placement, preemption by
recompute. It decides with token counts and block ids only; its output is plain data.

Async scheduling: `schedule(ahead_of=out)` plans the next step while `out` still runs. Its
tokens count as computed, and each token it samples as known but not yet seen: a decode
that follows one is planned with a placeholder that the worker fills with the token it
sampled for that request in the step before (`SeqPlan.follows_sample`). Nothing in the
requests changes until `update`, so a step that is abandoned leaves no trace."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from functools import cached_property

from titanserve.core.block_manager import BlockManager
from titanserve.core.request import Request, RequestStatus
from titanserve.ipc.messages import NewRequest, SeqPlan, StepPlan


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # per worker per step
    max_num_seqs: int = 256  # running requests per worker
    max_model_len: int = 4096
    num_workers: int = 1
    # Steps that run at least this many sequences (all workers) go as two micro-batches, one's
    # all-to-alls in flight while the other computes (StepPlan.two_batches); 0: never.
    two_batch_min_seqs: int = 0


@dataclass
class ScheduledSeq:
    request: Request
    num_new_tokens: int
    sample: bool
    worker: int  # where it runs this step (the request's own field is cleared when it ends)
    start: int  # position of its first token (the request's computed count, or one ahead)


@dataclass
class SchedulerOutput:
    step_id: int
    plans: list[StepPlan]  # one per worker
    scheduled: list[ScheduledSeq]
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @cached_property
    def by_worker(self) -> list[list[ScheduledSeq]]:
        """`scheduled` split per worker (in order), for handling results worker by worker."""
        split: list[list[ScheduledSeq]] = [[] for _ in self.plans]
        for s in self.scheduled:
            split[s.worker].append(s)
        return split


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_managers: list[BlockManager]) -> None:
        assert len(block_managers) == config.num_workers
        self.config = config
        self.block_managers = block_managers
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.step_id = 0
        # prefix cache hit rate = cached / placed tokens (placements after preemption count)
        self.num_placed_tokens = self.num_cached_tokens = 0
        # Worker-side state to drop, per worker, sent with the next plan.
        self._finished_ids: list[list[str]] = [[] for _ in block_managers]

    # ------------------------------------------------------------------ queue verbs
    def add(self, request: Request) -> None:
        assert request.request_id not in self.requests, "duplicate request id"
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish(self, request: Request, reason: str) -> None:
        """Finish (or abort) a request and release everything it holds."""
        if request.is_finished:
            return
        queue, other = (
            (self.running, self.waiting)
            if request.status == RequestStatus.RUNNING
            else (self.waiting, self.running)
        )
        try:
            queue.remove(request)
        except ValueError:  # a KeyboardInterrupt stopped a schedule while moving it
            if request in other:
                other.remove(request)
        self._release(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        del self.requests[request.request_id]

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ schedule
    def schedule(self, ahead_of: SchedulerOutput | None = None) -> SchedulerOutput:
        """Plan the next step. With `ahead_of` (a submitted step not yet updated), plan the
        one after it: see the module docstring."""
        cfg = self.config
        in_flight = {s.request.request_id: s for s in (ahead_of.scheduled if ahead_of else ())}
        budgets = [cfg.max_num_batched_tokens] * cfg.num_workers
        scheduled: list[ScheduledSeq] = []
        preempted: list[Request] = []

        pending = deque(self.running)
        while pending:
            request = pending.popleft()
            w = request.worker
            computed, known = request.num_computed_tokens, request.num_tokens
            prior = in_flight.get(request.request_id)
            if prior is not None:
                computed += prior.num_new_tokens
                if prior.sample:  # its token is known only after the step
                    if self._ends_by_length_after(request):
                        continue
                    known += 1
            num_new = min(known - computed, budgets[w])
            if num_new <= 0:
                continue
            target = computed + num_new
            # Most decode steps fit in the blocks a request holds: nothing to allocate.
            needs_blocks = self.block_managers[w].blocks_needed(target) > len(request.block_ids)
            if needs_blocks and not self._grow(request, target, pending, preempted):
                continue  # preempted itself
            budgets[w] -= num_new
            scheduled.append(ScheduledSeq(request, num_new, target == known, w, computed))

        if self.waiting and not preempted:
            self._admit(budgets, scheduled)
        self.step_id += 1
        return SchedulerOutput(self.step_id, self._plans(scheduled), scheduled, preempted)

    def _admit(self, budgets: list[int], scheduled: list[ScheduledSeq]) -> None:
        """Place waiting requests, in order, while they fit (see `_place`)."""
        num_running = [0] * self.config.num_workers
        tokens_left = [0] * self.config.num_workers  # per worker: tokens it may still compute
        for request in self.running:
            num_running[request.worker] += 1
            tokens_left[request.worker] += request.tokens_left
        while self.waiting:
            request = self.waiting[0]
            placed = self._place(request, budgets, num_running, tokens_left)
            if placed is None:
                break
            w, cached, num_new = placed
            self.waiting.popleft()
            request.worker = w
            request.num_computed_tokens = len(cached) * self.block_managers[w].block_size
            self.num_placed_tokens += request.num_tokens
            self.num_cached_tokens += request.num_computed_tokens
            self.block_managers[w].allocate(request, cached, request.num_computed_tokens + num_new)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            num_running[w] += 1
            tokens_left[w] += request.tokens_left
            budgets[w] -= num_new
            start = request.num_computed_tokens
            scheduled.append(
                ScheduledSeq(request, num_new, start + num_new == request.num_tokens, w, start)
            )

    def _grow(
        self, request: Request, target: int, pending: deque[Request], preempted: list[Request]
    ) -> bool:
        """Give `request` blocks for `target` tokens, preempting its worker's newest requests
        (itself last) until they fit. False when it was preempted itself."""
        w = request.worker
        block_manager = self.block_managers[w]
        while not block_manager.can_append(request, target):
            victim = next((r for r in reversed(pending) if r.worker == w), request)
            if victim is not request:
                pending.remove(victim)
            self._preempt(victim)
            preempted.append(victim)
            if victim is request:
                return False
        block_manager.append(request, target)
        return True

    def _place(
        self, request: Request, budgets: list[int], num_running: list[int], tokens_left: list[int]
    ) -> tuple[int, list[int], int] | None:
        """Pick the worker holding the longest cached prefix, else the least loaded one.

        Load is decode-length aware: the tokens its requests may still compute (prompt tokens
        not yet prefilled, and the outputs max_tokens still allows; EOS may end them sooner),
        then the number of requests. Balancing what is left, not just how many, keeps
        workers' steps even, prefills and batches as requests end, which matters most where
        workers meet at every MoE all-to-all.
        """
        options = []
        for w, block_manager in enumerate(self.block_managers):
            if budgets[w] <= 0 or num_running[w] >= self.config.max_num_seqs:
                continue
            # Prompt logits are wanted at every position: nothing may come from the cache.
            wants_all = request.sampling.return_prompt_logits
            cached = [] if wants_all else block_manager.find_cached_prefix(request)
            options.append(
                (-len(cached), tokens_left[w], num_running[w], block_manager.usage, w, cached)
            )
        for *_, w, cached in sorted(options, key=lambda o: o[:5]):
            num_cached = len(cached) * self.block_managers[w].block_size
            num_new = min(request.num_tokens - num_cached, budgets[w])
            if self.block_managers[w].can_allocate(cached, num_cached + num_new):
                return w, cached, num_new
        return None

    def _plans(self, scheduled: list[ScheduledSeq]) -> list[StepPlan]:
        per_worker: list[list[SeqPlan]] = [[] for _ in self.block_managers]
        # NOTE: decodes (one new token) come first in every plan; the runner relies on it.
        for s in sorted(scheduled, key=lambda s: s.num_new_tokens != 1):
            r = s.request
            start, end = s.start, s.start + s.num_new_tokens
            new = None
            if r.needs_reset:
                new = NewRequest(
                    sampling=r.sampling,
                    num_prompt_tokens=r.num_prompt_tokens,
                    history_token_ids=list(r.all_token_ids) if r.sampling.needs_penalties else [],
                )
                r.needs_reset = False
                r.num_sent_blocks = 0  # the worker starts its table afresh
            per_worker[r.worker].append(
                SeqPlan(
                    request_id=r.request_id,
                    token_ids=r.all_token_ids[start:end],  # [] for a placeholder
                    start_pos=start,
                    block_ids=r.block_ids[r.num_sent_blocks :],
                    sample=s.sample,
                    new=new,
                    follows_sample=end > r.num_tokens,
                    block_start=r.num_sent_blocks,
                )
            )
            r.num_sent_blocks = len(r.block_ids)
        least = self.config.two_batch_min_seqs
        two_batches = 0 < least <= len(scheduled)
        plans = [
            StepPlan(step_id=self.step_id, seqs=seqs, finished_ids=list(self._finished_ids[w]),
                     two_batches=two_batches)  # fmt: skip
            for w, seqs in enumerate(per_worker)
        ]
        if scheduled:  # an empty step is not sent: its finished ids wait for the next one
            self._finished_ids = [[] for _ in self.block_managers]
        return plans

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix, on every worker, and the hit rate counted so far."""
        for block_manager in self.block_managers:
            block_manager.reset_prefix_cache()
        self.num_placed_tokens = self.num_cached_tokens = 0

    # ------------------------------------------------------------------ update
    def update(
        self, output: SchedulerOutput, sampled: dict[str, int], worker: int | None = None
    ) -> list[tuple[Request, int]]:
        """Advance counters after a step (only `worker`'s sequences if given, as its results
        arrive); `sampled` maps request id -> new token. Returns the (request, token) pairs
        taken, in order: a request finished, aborted or preempted meanwhile takes none. A
        request a token-level rule (eos, stop ids, length) ends is finished here."""
        taken = []
        for s in output.scheduled if worker is None else output.by_worker[worker]:
            r = s.request
            if r.status is not RequestStatus.RUNNING:
                continue  # ended, aborted or preempted while the step ran
            assert s.start == r.num_computed_tokens, "steps must be updated in order"
            r.num_computed_tokens += s.num_new_tokens
            self.block_managers[r.worker].cache_full_blocks(r)
            if s.sample:
                token_id = sampled[r.request_id]
                r.append_output(token_id)
                taken.append((r, token_id))
                reason = r.check_stop()
                if reason is None and r.num_tokens >= self.config.max_model_len:
                    reason = "length"
                if reason is not None:
                    self.finish(r, reason)
        return taken

    # ------------------------------------------------------------------ internals
    def _ends_by_length_after(self, request: Request) -> bool:
        """Whether the token a running step samples for `request` ends it by length."""
        return (
            request.max_outputs_left <= 1 or request.num_tokens + 1 >= self.config.max_model_len
        )

    def _preempt(self, request: Request) -> None:
        """Preemption by recompute: drop the KV, keep the generated tokens."""
        self.running.remove(request)
        self._release(request)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.needs_reset = True
        self.waiting.appendleft(request)

    def _release(self, request: Request) -> None:
        if request.worker is not None:
            self.block_managers[request.worker].free(request)
            self._finished_ids[request.worker].append(request.request_id)
            request.worker = None
