"""Recorded expert loads: how many (token, expert) pairs each MoE layer routed to each expert,
saved to a JSON file and used to place experts from the first step (SGLang's
`--init-expert-location` from a recorded expert distribution does the same).

Routers skew differently in every layer (the demo's SmolLM2 MoE sends 19-99% of a layer's
pairs to the experts of worker 0 under the contiguous placement), and each combine waits for
the busiest worker. `moe.rebalance` learns a balanced placement while serving, at the cost of
reloading experts every few steps; a placement read at start costs nothing while serving.
Record with `record_expert_loads=PATH` (written when the engine shuts down), then serve with
`expert_loads=PATH`: each layer gets `ExpertPlacement.balanced` of its recorded loads, and
each worker reads only its experts. Loads recorded with any worker count fit any other.

File: {"format": FORMAT, "num_experts": E, "layers": {"<layer index>": [E ints]}}.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

from titanserve.core.errors import ConfigError
from titanserve.moe.placement import ExpertPlacement

FORMAT = "titanserve-expert-loads/1"

# layer index -> (E,) pairs routed to each expert
ExpertLoads = dict[int, list[int]]


def write_expert_loads(path: str | Path, loads: ExpertLoads, num_experts: int) -> None:
    """Save `loads` (written to a temporary file first: a reader never sees half a file)."""
    path = Path(path).expanduser()
    body = {"format": FORMAT, "num_experts": num_experts,
            "layers": {str(layer): list(counts) for layer, counts in sorted(loads.items())}}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body) + "\n")
    tmp.replace(path)


def check_writable(path: str | Path, num_experts: int) -> None:
    """Refuse at start, not at shutdown, a recording that could not be written: a dense
    model, or a folder that is not there."""
    if not num_experts:
        raise ConfigError("record_expert_loads needs a mixture-of-experts model")
    folder = Path(path).expanduser().absolute().parent
    if not folder.is_dir():
        raise ConfigError(f"cannot record expert loads to {str(path)!r}: no folder {str(folder)!r}")


def read_expert_loads(
    path: str | Path, num_experts: int, moe_layers: Collection[int]
) -> ExpertLoads:
    """The loads saved at `path`, checked against the model (its expert count and MoE layer
    indices); a one-line ConfigError for a missing, malformed or mismatched file. Layers the
    file leaves out keep the contiguous placement."""
    try:
        body = json.loads(Path(path).expanduser().read_text())
    except OSError as e:
        raise ConfigError(f"cannot read expert loads {str(path)!r}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"expert loads {str(path)!r} is not JSON: {e}") from None
    where = f"expert loads {str(path)!r}"
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise ConfigError(f"{where} is not a {FORMAT} file")
    if body.get("num_experts") != num_experts:
        raise ConfigError(
            f"{where} was recorded for {body.get('num_experts')} experts; "
            f"this model has {num_experts}"
        )
    layers = body.get("layers")
    if not isinstance(layers, dict):
        raise ConfigError(f"{where}: 'layers' must map layer indices to loads")
    loads: ExpertLoads = {}
    for key, counts in layers.items():
        if not key.isdigit() or int(key) not in moe_layers:
            raise ConfigError(f"{where}: layer {key!r} is not a MoE layer of this model")
        valid = isinstance(counts, list) and len(counts) == num_experts and all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts
        )
        if not valid:
            raise ConfigError(
                f"{where}: layer {key} needs {num_experts} non-negative integer loads"
            )
        loads[int(key)] = counts
    return loads


def layer_placements(
    loads: ExpertLoads, num_experts: int, world_size: int, rank: int, redundant: int = 0
) -> dict[int, ExpertPlacement]:
    """Each recorded layer's placement: the contiguous one (with `redundant` copies per
    worker) re-placed by its loads. Every worker computes the same from the same loads."""
    base = ExpertPlacement.contiguous(num_experts, world_size, rank, redundant)
    return {layer: base.balanced(counts) for layer, counts in loads.items()}


def add_loads(total: ExpertLoads, more: ExpertLoads) -> ExpertLoads:
    """`total` plus `more`, layer by layer (one worker's counts added to the others')."""
    for layer, counts in more.items():
        if layer in total:
            total[layer] = [a + b for a, b in zip(total[layer], counts)]
        else:
            total[layer] = list(counts)
    return total
