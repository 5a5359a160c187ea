"""A worker's block tables: plans extend them, new requests start afresh, gaps are refused,
rows and columns grow, and a gather pads with block 0."""

from __future__ import annotations

import pytest

from titanserve.core.block_tables import BlockTables
from titanserve.ipc.messages import SeqPlan


def plan(request_id: str, block_ids: list[int], block_start: int = 0) -> SeqPlan:
    return SeqPlan(request_id=request_id, token_ids=[1], start_pos=0, block_ids=block_ids,
                   sample=True, block_start=block_start)  # fmt: skip


def test_plans_extend_a_table_and_a_restart_replaces_it():
    tables = BlockTables(max_blocks_per_seq=4, rows=2)
    row = tables.update(plan("a", [7, 3]))
    assert tables.update(plan("a", [], block_start=2)) == row  # nothing gained
    tables.update(plan("a", [9], block_start=2))
    assert tables.blocks(row).tolist() == [7, 3, 9]
    tables.update(plan("a", [5]))  # sent afresh (recomputed): the old entries go
    assert tables.blocks(row).tolist() == [5]
    assert tables.gather([row], 3).tolist() == [[5, 0, 0]]


def test_a_plan_that_skips_blocks_is_refused():
    tables = BlockTables(max_blocks_per_seq=4)
    tables.update(plan("a", [1, 2]))
    with pytest.raises(ValueError, match="from #3, but this worker holds 2"):
        tables.update(plan("a", [4], block_start=3))
    with pytest.raises(ValueError, match="from #1, but this worker holds 0"):
        tables.update(plan("b", [4], block_start=1))


def test_rows_and_columns_grow_and_dropped_rows_are_reused_clean():
    tables = BlockTables(max_blocks_per_seq=2, rows=2)
    rows = [tables.update(plan(f"r{i}", [i, i + 10])) for i in range(5)]
    assert len(set(rows)) == 5 and len(tables) == 5
    tables.update(plan("r4", [20, 21, 22], block_start=2))  # past the first width
    assert tables.blocks(rows[4]).tolist() == [4, 14, 20, 21, 22]
    assert [tables.blocks(r).tolist() for r in rows[:4]] == [[i, i + 10] for i in range(4)]
    tables.drop("r4")
    tables.drop("unknown")  # fine
    row = tables.update(plan("new", [8]))
    assert row == rows[4]
    assert tables.gather([row, rows[0]], 5).tolist() == [[8, 0, 0, 0, 0], [0, 10, 0, 0, 0]]
