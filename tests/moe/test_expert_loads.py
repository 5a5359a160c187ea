"""Recorded expert loads: the file round-trips, bad files get one-line errors, and each layer
is placed by its own loads, the same on every worker."""

from __future__ import annotations

import json

import pytest

from titanserve.core.errors import ConfigError
from titanserve.moe.expert_loads import (
    FORMAT,
    add_loads,
    layer_placements,
    read_expert_loads,
    write_expert_loads,
)

SKEWED = [100, 90, 80, 70, 1, 1, 1, 1]  # worker 0's contiguous half takes nearly every pair


def test_file_round_trips_and_leaves_no_temporary(tmp_path):
    loads = {3: list(range(8)), 1: SKEWED}
    path = tmp_path / "loads.json"
    write_expert_loads(path, loads, 8)
    assert read_expert_loads(path, 8, [1, 2, 3]) == loads
    assert json.loads(path.read_text())["format"] == FORMAT
    assert [p.name for p in tmp_path.iterdir()] == ["loads.json"]


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("{", "is not JSON"),
        ('{"format": "other"}', "is not a titanserve-expert-loads/1 file"),
        ({"num_experts": 4, "layers": {}}, "recorded for 4 experts; this model has 8"),
        ({"num_experts": 8, "layers": []}, "'layers' must map layer indices"),
        ({"num_experts": 8, "layers": {"0": SKEWED}}, "layer '0' is not a MoE layer"),
        ({"num_experts": 8, "layers": {"x": SKEWED}}, "layer 'x' is not a MoE layer"),
        ({"num_experts": 8, "layers": {"1": SKEWED[:7]}}, "layer 1 needs 8 non-negative"),
        ({"num_experts": 8, "layers": {"1": [-1] + SKEWED[1:]}}, "layer 1 needs 8 non-neg"),
        ({"num_experts": 8, "layers": {"1": [0.5] + SKEWED[1:]}}, "layer 1 needs 8 non-neg"),
        ({"num_experts": 8, "layers": {"1": [True] + SKEWED[1:]}}, "layer 1 needs 8 non-neg"),
    ],
)
def test_bad_files_get_one_line_errors(tmp_path, body, match):
    path = tmp_path / "loads.json"
    if isinstance(body, dict):
        body = json.dumps({"format": FORMAT, **body})
    path.write_text(body)
    with pytest.raises(ConfigError, match=match) as err:
        read_expert_loads(path, 8, [1, 2, 3])
    assert "\n" not in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="cannot read expert loads .*nope.json"):
        read_expert_loads(tmp_path / "nope.json", 8, [1])


def test_each_layer_is_placed_by_its_own_loads():
    """A skewed layer is re-packed (worker 0 gave up experts 1 and 2 for the cold ones), an
    even one stays even; every rank computes the same map."""
    loads = {0: SKEWED, 1: [10] * 8}
    by_rank = [layer_placements(loads, 8, 2, rank) for rank in range(2)]
    skewed = by_rank[0][0]
    assert skewed.owner == by_rank[1][0].owner
    assert set(skewed.local_experts) >= {0, 3} and {1, 2}.isdisjoint(skewed.local_experts)
    rows = skewed.worker_loads(SKEWED)
    assert max(rows) - min(rows) <= 2  # was 340 against 4
    assert by_rank[0][1].worker_loads([10] * 8) == [40.0, 40.0]
    assert by_rank[1][0].local_experts == sorted(set(range(8)) - set(skewed.local_experts))


def test_copies_go_to_the_hottest_experts():
    placement = layer_placements({0: SKEWED}, 8, 2, 0, redundant=1)[0]
    assert sorted(e for e, r in enumerate(placement.replica) if r >= 0) == [0, 1]
    assert len(placement.local_experts) == 5  # slot counts are kept


def test_add_loads_sums_layer_by_layer():
    total = add_loads({}, {1: [1, 2], 3: [0, 1]})
    assert add_loads(total, {1: [1, 1], 5: [2, 2]}) == {1: [2, 3], 3: [0, 1], 5: [2, 2]}
