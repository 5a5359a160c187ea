"""Expert load balancing: re-place each MoE layer's experts by the loads the workers measured.

A router sends far more pairs to some experts than to others, differently in every layer (the
demo's upcycled SmolLM2 MoE, 64 prompts: from 18% to 99% of a layer's pairs went to the
experts of worker 0 under the contiguous placement), and every worker waits at each combine
for the busiest. Every `expert_rebalance_steps` steps all workers, at the same step, gather
their per-layer counts, each computes the same new placement per layer
(`ExpertPlacement.balanced`: hottest experts copied, then packed onto the least loaded
workers), and reads from the checkpoint only the experts that come to it, into the slots of
those that left. The checkpoint's files are in the page cache after the first load, so that
costs a copy and a re-pack per expert, not disk reads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from titanserve.core.model.decoder import DecoderModel
from titanserve.core.model.loader import load_expert_weights
from titanserve.ipc.collectives import Collective
from titanserve.kernels.cpu_experts import PackedExperts
from titanserve.moe.layer import MoELayer
from titanserve.moe.placement import ExpertPlacement

# A layer moves its experts only when that lowers its busiest worker's rows by more than this
# fraction: a placement that is nearly as good stays, with nothing to reload.
MIN_GAIN = 0.10


def moe_layers(model: DecoderModel) -> dict[int, MoELayer]:
    """Layer index -> MoE layer (dense layers left out)."""
    return {i: model.layers[i].mlp for i in model.cfg.moe_layers}


def counted_loads(model: DecoderModel, reset: bool = False) -> dict[int, list[int]]:
    """Layer index -> (E,) pairs its MoE layer has counted (see `MoELayer.count_loads`);
    `reset`: then zero the counts."""
    loads = {}
    for index, layer in moe_layers(model).items():
        loads[index] = layer.expert_load.tolist()
        if reset:
            layer.expert_load.zero_()
    return loads


def rebalance_experts(model: DecoderModel, collective: Collective, model_path: Path) -> int:
    """Re-place the experts of every MoE layer by the loads counted so far (older windows
    halved at each call), on every worker at once (a collective); returns how many layers
    changed placement. Only the experts that come to this worker are read, into the slots
    of those that left."""
    layers = moe_layers(model)
    if not layers:
        return 0
    local = torch.stack([layer.expert_load for layer in layers.values()]).cpu()  # (L, E)
    total = torch.stack([t.cpu() for t in collective.all_gather(local)]).sum(0)  # (L, E)
    moved: dict[int, tuple[ExpertPlacement, list[int]]] = {}  # index -> (placement, slots)
    incoming: dict[int, dict[int, int]] = {}  # index -> {expert: slot} to read
    for (index, layer), loads in zip(layers.items(), total.tolist()):
        layer.expert_load.div_(2, rounding_mode="floor")  # older windows count less and less
        new = layer.placement.balanced(loads)
        if max(new.worker_loads(loads)) >= (1 - MIN_GAIN) * max(
            layer.placement.worker_loads(loads)
        ):
            continue
        kept = set(new.local_experts)
        slots = [e if e in kept else -1 for e in layer.slot_experts]
        arriving = [e for e in new.local_experts if e not in slots]
        for e in arriving:
            slots[slots.index(-1)] = e
        moved[index] = (new, slots)
        if arriving:
            incoming[index] = {e: slots.index(e) for e in arriving}
    _read_into_slots(model, model_path, {i: layers[i] for i in incoming}, incoming)
    for index, (placement, slots) in moved.items():
        layers[index].use_placement(placement, slots)
    return len(moved)


def _read_into_slots(
    model: DecoderModel,
    model_path: Path,
    layers: dict[int, MoELayer],
    incoming: dict[int, dict[int, int]],
) -> None:
    """Read each layer's arriving experts from the checkpoint into the given slots of its
    stacks, in the layout the kernels use (packed for oneDNN, or relaid: written in place)."""
    stacks = {}
    for index, layer in layers.items():
        for name in MoELayer.EXPERT_WEIGHTS:
            stack = getattr(layer, name)
            stacks[f"layers.{index}.mlp.{name}"] = torch.empty(
                (len(incoming[index]), *stack.shape[1:]), dtype=stack.dtype, device=stack.device
            )  # (n, N, K) checkpoint layout
    load_expert_weights(model, model_path, {i: list(e) for i, e in incoming.items()}, stacks)
    for index, layer in layers.items():
        for name in MoELayer.EXPERT_WEIGHTS:
            stack, read = getattr(layer, name), stacks[f"layers.{index}.mlp.{name}"]
            for row, slot in enumerate(incoming[index].values()):
                if isinstance(stack, PackedExperts):
                    stack.replace(slot, read[row])
                else:
                    stack.data[slot].copy_(read[row])
