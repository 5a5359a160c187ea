"""Re-placement reads: a worker that receives no expert opens no checkpoint file."""

from __future__ import annotations

from titanserve.core.model.loader import load_expert_weights


def test_no_arriving_expert_reads_nothing(tmp_path):
    # tmp_path holds no checkpoint: any attempt to list or open its files raises ConfigError
    load_expert_weights(None, tmp_path, {}, {})
    load_expert_weights(None, tmp_path, {3: [], 7: []}, {})
