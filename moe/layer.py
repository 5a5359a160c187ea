"""The MoE layer: route locally, compute experts grouped, add the shared expert.

Expert parallel: when the placement spans several workers, an `ExpertParallel` exchange
(all-to-all dispatch/combine) wraps the very same grouped compute.
Legend: T tokens, H hidden, E experts (global), El local experts, K top-k, I expert width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from titanserve.core.config import ModelConfig
from titanserve.core.model.layers import GatedMLP
from titanserve.core.model.stages import Staged, finish
from titanserve.kernels import ops
from titanserve.moe.balance import PairDestinations
from titanserve.moe.placement import ExpertPlacement, slot_map, with_no_expert
from titanserve.moe.router import route

if TYPE_CHECKING:
    from titanserve.moe.dispatch import ExpertParallel


class MoELayer(nn.Module):
    LINEAR_WEIGHTS = ("gate",)  # see kernels.cpu_linear.pack_linear_weights
    EXPERT_WEIGHTS = ("w_gate_up", "w_down")  # see kernels.fused_moe.use_input_major_experts

    def __init__(self, cfg: ModelConfig, placement: ExpertPlacement) -> None:
        super().__init__()
        self.cfg = cfg
        self.placement = placement
        num_local = len(placement.local_experts)
        inter, hidden = cfg.moe_intermediate_size, cfg.hidden_size
        self.gate = nn.Parameter(torch.empty(cfg.num_experts, hidden), requires_grad=False)
        self.w_gate_up = nn.Parameter(
            torch.empty(num_local, 2 * inter, hidden), requires_grad=False
        )
        self.w_down = nn.Parameter(torch.empty(num_local, hidden, inter), requires_grad=False)
        self.shared_expert = (
            GatedMLP(hidden, cfg.shared_expert_intermediate_size)
            if cfg.shared_expert_intermediate_size
            else None
        )
        self.shared_expert_gate = (
            nn.Parameter(torch.empty(1, hidden), requires_grad=False)
            if cfg.shared_expert_gate
            else None
        )
        # (E + 1,) global id -> weight slot or -1; id -1 (no expert, see moe.dispatch) indexes
        # the last entry, which is always -1.
        self.register_buffer("expert_map", with_no_expert(placement.expert_map()),
                             persistent=False)
        self.slot_experts = placement.local_experts  # the expert each weight slot holds
        # Set by the worker when experts are sharded: the exchange (shared by every layer) and
        # which worker computes each pair (this layer's, since placements may differ by layer).
        self.exchange: ExpertParallel | None = None
        self.destinations: PairDestinations | None = None
        # (E,) pairs this worker's tokens routed to each expert, halved at each re-placement;
        # counted only while `count_loads` (see moe.rebalance).
        self.count_loads = False
        self.register_buffer(
            "expert_load", torch.zeros(cfg.num_experts, dtype=torch.int64), persistent=False
        )

    def use_placement(
        self, placement: ExpertPlacement, slot_experts: list[int] | None = None
    ) -> None:
        """Compute, from now on, the experts `placement` gives this worker, expert
        `slot_experts[i]` (-1: none) with the weights in slot i (default: its experts in
        order, as loaded), and send pairs where it says."""
        self.placement = placement
        self.slot_experts = list(placement.local_experts if slot_experts is None else slot_experts)
        self.expert_map.copy_(with_no_expert(slot_map(self.slot_experts, self.cfg.num_experts)))
        self.destinations = PairDestinations(placement, self.expert_map.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, H) -> (T, H)
        return finish(self.stages(x))

    def stages(self, x: torch.Tensor) -> Staged[torch.Tensor]:  # (T, H) -> (T, H)
        """The forward, staged (see `core.model.stages`): it yields with each exchange of an
        expert-parallel layer in flight."""
        router_logits = ops.linear(x, self.gate)  # (T, E)
        weights, ids = route(self.cfg, router_logits)  # (T, K) fp32, (T, K) int32
        weights = weights.to(x.dtype)
        counts = None
        if self.count_loads:
            counts = torch.bincount(ids.reshape(-1), minlength=self.cfg.num_experts)  # (E,)
            self.expert_load += counts
        shared = self.shared_output if self.shared_expert is not None else None
        if self.exchange is not None:  # the shared expert runs while the dispatch is in flight
            return (yield from self.exchange.stages(
                x, weights, ids, self.compute_experts, self.destinations, shared, counts
            ))
        out = self.compute_experts(x, weights, ids)
        return out if shared is None else out + shared(x)

    def shared_output(self, x: torch.Tensor) -> torch.Tensor:  # (T, H) -> (T, H)
        """The shared expert's output, gated where the model gates it."""
        shared = self.shared_expert(x)
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(F.linear(x, self.shared_expert_gate)) * shared
        return shared

    def compute_experts(
        self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor:
        """Grouped compute on this worker's experts: sum_k w[t,k] * expert_{ids[t,k]}(x[t]).
        Pairs routed to experts that are not local, or to none (id -1), contribute nothing."""
        return ops.fused_moe(
            x, self.w_gate_up, self.w_down, weights.float(), ids, expert_map=self.expert_map
        )
