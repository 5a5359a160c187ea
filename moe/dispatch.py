"""Expert-parallel exchange: all-to-all dispatch of (token, expert) pairs to the workers that
own the experts, grouped expert compute there, all-to-all combine back, weighted sum.

`moe.balance` picks the worker of each pair (an expert's owner, or the holder of its copy).

Legend: T local tokens, K top-k, H hidden, P = T*K pairs, N pairs received, W workers,
E experts.
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
    ) -> torch.Tensor:
        """The experts' weighted sum for each token, plus `shared(x)` (a shared expert): that
        one is computed while the dispatch is in flight, so that a worker that is early at the
        exchange computes instead of waiting for the others."""
        T, K = ids.shape
        W = self.collective.world_size
        flat_ids = ids.reshape(-1).long()  # (P,)
        dest = destinations(flat_ids)  # (P,) worker of each pair
        order = torch.argsort(dest, stable=True)  # pairs grouped by destination worker
        send_counts = torch.bincount(dest, minlength=W).tolist()
        token_of_pair = order // K  # (P,)
        H = x.shape[1]
        # One message per peer: rows of [hidden | expert id | router weight]. The weight is
        # already in x.dtype; the id is exact in it while E <= _EXACT_IDS[dtype], else the id
        # and weight ride in a second (fp32) exchange.
        packed = destinations.owner.numel() <= _EXACT_IDS.get(x.dtype, 0)
        meta = torch.stack(
            [
                flat_ids[order].to(x.dtype if packed else torch.float32),
                weights.reshape(-1)[order].to(x.dtype if packed else torch.float32),
            ],
            dim=1,
        )  # (P, 2)
        rows = x.index_select(0, token_of_pair)  # (P, H)
        meanwhile = partial(shared, x) if shared is not None else None  # (T, H)
        if packed:
            received, recv_counts, shared_out = self._all_to_all(
                list(torch.cat([rows, meta], dim=1).split(send_counts)), meanwhile
            )  # (N, H + 2)
            rx, rmeta = received[:, :H], received[:, H:]
        else:
            rx, recv_counts, shared_out = self._all_to_all(
                list(rows.split(send_counts)), meanwhile
            )  # (N, H)
            rmeta, _, _ = self._all_to_all(list(meta.split(send_counts)))  # (N, 2)
        expert_out = compute(
            rx.contiguous(), rmeta[:, 1:2].to(x.dtype), rmeta[:, 0:1].long()
        )  # (N, H), already scaled by the router weight
        back, _, _ = self._all_to_all(list(expert_out.split(recv_counts)))  # (P, H)
        # the top-k sum runs in fp32, as in the single-worker grouped compute
        out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)  # (T, H)
        out.index_add_(0, token_of_pair, back.float())
        out = out.to(x.dtype)
        return out if shared_out is None else out + shared_out
