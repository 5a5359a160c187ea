"""Expert-parallel exchange: all-to-all dispatch of tokens to the workers that own their
experts, grouped expert compute there, all-to-all combine back, sum over workers.

A token goes once to each worker that computes any of its K pairs (as DeepEP's dispatch
does), not once a pair: that worker sums its pairs before the combine. With top-2 of 8
experts on 2 workers that is ~1.6 rows a token instead of 2, with top-8 on 4 workers ~3.6
instead of 8, and a token whose experts are all on one worker gets the single-worker sum.
`moe.balance` picks the worker of each pair (an expert's owner, or the holder of its copy).

Legend: T local tokens, K top-k, H hidden, M rows sent (token, worker), N rows received,
W workers, E experts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import torch

from titanserve.core.model.stages import Staged, finish
from titanserve.ipc.collectives import Collective
from titanserve.moe.balance import PairDestinations

# Largest integer each dtype holds exactly (and so the largest expert count packable in it).
_EXACT_IDS = {torch.float32: 2**24, torch.bfloat16: 2**8, torch.float16: 2**11}

# (x (N, H), weights (N, K), global ids (N, K), -1: no expert) -> (N, H) weighted sum;
# x and weights may be strided views (rows of a received message).
ExpertCompute = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class ExpertParallel:
    """Wraps a layer's grouped expert compute with dispatch/combine over a collective.

    NOTE: every worker calls this for every MoE layer of every step, with 0 tokens too,
    because the all-to-alls are collective.
    """

    def __init__(self, collective: Collective) -> None:
        self.collective = collective
        # Time inside the all-to-alls, and of it waiting for slower workers' messages; summed
        # until reset by the worker.
        self.comm_time_s = self.comm_wait_s = 0.0

    def _all_to_all(
        self, parts: list[torch.Tensor], meanwhile: Callable[[], torch.Tensor] | None = None
    ) -> Staged[tuple[torch.Tensor, list[int], torch.Tensor | None]]:
        """(what every worker sent here, concatenated in rank order; rows from each; what
        `meanwhile()` returned). `meanwhile()` runs once this worker's parts are sent; then
        it yields (another micro-batch computes, see `core.model.stages`) before it waits
        for the others' parts. Time in between is compute, not communication."""
        t0 = time.perf_counter()
        pending = self.collective.all_to_all_cat_start(parts)
        self.comm_time_s += time.perf_counter() - t0
        extra = None
        try:
            if meanwhile is not None:
                extra = meanwhile()
        except BaseException:  # receive all the same: the others have sent, stay in step
            pending.wait()
            raise
        yield
        t0, waited = time.perf_counter(), self.collective.peer_wait_s
        out, counts = pending.wait()
        self.comm_time_s += time.perf_counter() - t0
        self.comm_wait_s += self.collective.peer_wait_s - waited
        return out, counts, extra

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        """`stages`, run alone."""
        return finish(self.stages(*args, **kwargs))

    def stages(
        self,
        x: torch.Tensor,  # (T, H)
        weights: torch.Tensor,  # (T, K) router weights
        ids: torch.Tensor,  # (T, K) global expert ids
        compute: ExpertCompute,
        destinations: PairDestinations,  # the layer's: which worker computes each pair
        shared: Callable[[torch.Tensor], torch.Tensor] | None = None,
        expert_counts: torch.Tensor | None = None,  # (E,) pairs of each expert, if counted
    ) -> Staged[torch.Tensor]:
        """The experts' weighted sum for each token, plus `shared(x)` (a shared expert): that
        one is computed while the dispatch is in flight, so that a worker that is early at the
        exchange computes instead of waiting for the others. A staged forward: it yields with
        each exchange in flight."""
        T, K = ids.shape
        W, H = self.collective.world_size, x.shape[1]
        dest = destinations(ids, expert_counts)  # (T, K) worker of each pair
        # A token goes once to each worker that computes any of its pairs, with all K ids.
        # NOTE: few torch ops on purpose: each costs ~10-30 µs here, as a step's compute has
        # just evicted the code that runs it (cold caches).
        to_worker = torch.zeros(T, W, dtype=torch.bool, device=x.device).scatter_(1, dest, True)
        worker_of_row, token_of_row = to_worker.t().nonzero(as_tuple=True)  # (M,) by worker
        send_counts = to_worker.sum(0).tolist()
        # A receiver computes a row's pairs for the experts it holds: the others map to -1 in
        # its expert map. Where an expert has a copy, both holders hold it; then each pair
        # not meant for a worker is sent to it as id -1 (no expert).
        theirs = None  # (M, K) pairs of each row that its receiver must not compute
        if destinations.has_copies:
            theirs = dest.index_select(0, token_of_row) != worker_of_row.unsqueeze(1)
        # One message per peer: rows of [hidden | K expert ids | K router weights]. The ids
        # are exact in x.dtype while E <= _EXACT_IDS[dtype], else ids and weights ride in a
        # second (fp32) exchange.
        packed = destinations.owner.numel() <= _EXACT_IDS.get(x.dtype, 0)
        meanwhile = partial(shared, x) if shared is not None else None  # (T, H)
        if packed:
            rows = torch.cat([x, ids.to(x.dtype), weights.to(x.dtype)], dim=1).index_select(
                0, token_of_row)  # (M, H + 2K)
            if theirs is not None:
                rows[:, H : H + K].masked_fill_(theirs, -1)
            received, recv_counts, shared_out = yield from self._all_to_all(
                list(rows.split(send_counts)), meanwhile
            )  # (N, H + 2K)
            rx, rids, rweights = received[:, :H], received[:, H : H + K], received[:, H + K :]
        else:
            meta = torch.cat([ids.float(), weights.float()], dim=1).index_select(0, token_of_row)
            if theirs is not None:
                meta[:, :K].masked_fill_(theirs, -1)  # (M, 2K)
            rx, recv_counts, shared_out = yield from self._all_to_all(
                list(x.index_select(0, token_of_row).split(send_counts)), meanwhile
            )  # (N, H)
            rmeta, _, _ = yield from self._all_to_all(list(meta.split(send_counts)))  # (N, 2K)
            rids, rweights = rmeta[:, :K], rmeta[:, K:]
        # (N, H): each row's local pairs, weighted and summed (in fp32, rounded once)
        expert_out = compute(rx, rweights, rids.long())
        back, _, _ = yield from self._all_to_all(list(expert_out.split(recv_counts)))  # (M, H)
        # the sum over workers runs in fp32, as the top-k sum in the grouped compute
        out = torch.zeros(T, H, dtype=torch.float32, device=x.device)  # (T, H)
        out.index_add_(0, token_of_row, back.float())
        out = out.to(x.dtype)
        return out if shared_out is None else out + shared_out
