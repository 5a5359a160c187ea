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

from titanserve.ipc.collectives import Collective
from titanserve.moe.balance import PairDestinations

# Largest integer each dtype holds exactly (and so the largest expert count packable in it).
_EXACT_IDS = {torch.float32: 2**24, torch.bfloat16: 2**8, torch.float16: 2**11}

# (x (N, H), weights (N, K), global ids (N, K), -1: no expert) -> (N, H) weighted sum
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
    ) -> tuple[torch.Tensor, list[int], torch.Tensor | None]:
        """(what every worker sent here, concatenated in rank order; rows from each; what
        `meanwhile()` returned). `meanwhile()` runs once this worker's parts are sent, before
        it waits for the others' (its time is compute, not communication)."""
        t0, waited = time.perf_counter(), self.collective.peer_wait_s
        pending = self.collective.all_to_all_cat_start(parts)
        t1, extra = time.perf_counter(), None
        try:
            if meanwhile is not None:
                extra = meanwhile()
        finally:  # receive even if it failed: the others have sent, the collective stays in step
            t0 += time.perf_counter() - t1
            out, counts = pending.wait()
        self.comm_time_s += time.perf_counter() - t0
        self.comm_wait_s += self.collective.peer_wait_s - waited
        return out, counts, extra

    def __call__(
        self,
        x: torch.Tensor,  # (T, H)
        weights: torch.Tensor,  # (T, K) router weights
        ids: torch.Tensor,  # (T, K) global expert ids
        compute: ExpertCompute,
        destinations: PairDestinations,  # the layer's: which worker computes each pair
        shared: Callable[[torch.Tensor], torch.Tensor] | None = None,
        expert_counts: torch.Tensor | None = None,  # (E,) pairs of each expert, if counted
    ) -> torch.Tensor:
        """The experts' weighted sum for each token, plus `shared(x)` (a shared expert): that
        one is computed while the dispatch is in flight, so that a worker that is early at the
        exchange computes instead of waiting for the others."""
        T, K = ids.shape
        W = self.collective.world_size
        dest = destinations(ids.reshape(-1).long(), expert_counts).view(T, K)  # (T, K) worker
        # A token goes once to each worker that computes any of its pairs, with all K ids:
        # those of pairs computed elsewhere are -1 (no expert), their weights 0.
        to_worker = (dest.unsqueeze(2) == torch.arange(W, device=dest.device)).any(1)  # (T, W)
        worker_of_row, token_of_row = to_worker.t().nonzero(as_tuple=True)  # (M,) by worker
        send_counts = to_worker.sum(0).tolist()
        theirs = dest.index_select(0, token_of_row) != worker_of_row.unsqueeze(1)  # (M, K)
        H = x.shape[1]
        # One message per peer: rows of [hidden | K expert ids | K router weights]. The
        # weights are already in x.dtype; the ids are exact in it while E <= _EXACT_IDS[dtype],
        # else ids and weights ride in a second (fp32) exchange.
        packed = destinations.owner.numel() <= _EXACT_IDS.get(x.dtype, 0)
        meta_dtype = x.dtype if packed else torch.float32
        meta = torch.cat(
            [
                ids.index_select(0, token_of_row).masked_fill(theirs, -1).to(meta_dtype),
                weights.index_select(0, token_of_row).masked_fill(theirs, 0).to(meta_dtype),
            ],
            dim=1,
        )  # (M, 2K)
        rows = x.index_select(0, token_of_row)  # (M, H)
        meanwhile = partial(shared, x) if shared is not None else None  # (T, H)
        if packed:
            received, recv_counts, shared_out = self._all_to_all(
                list(torch.cat([rows, meta], dim=1).split(send_counts)), meanwhile
            )  # (N, H + 2K)
            rx, rmeta = received[:, :H], received[:, H:]
        else:
            rx, recv_counts, shared_out = self._all_to_all(
                list(rows.split(send_counts)), meanwhile
            )  # (N, H)
            rmeta, _, _ = self._all_to_all(list(meta.split(send_counts)))  # (N, 2K)
        expert_out = compute(
            rx.contiguous(), rmeta[:, K:].to(x.dtype), rmeta[:, :K].long()
        )  # (N, H): each row's local pairs, weighted and summed (in fp32, rounded once)
        back, _, _ = self._all_to_all(list(expert_out.split(recv_counts)))  # (M, H)
        # the sum over workers runs in fp32, as the top-k sum in the grouped compute
        out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)  # (T, H)
        out.index_add_(0, token_of_row, back.float())
        out = out.to(x.dtype)
        return out if shared_out is None else out + shared_out
