"""Linear layers with oneDNN-packed weights on CPU: the same rows as `F.linear` for every shape
the engine passes; packing a module keeps its outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from titanserve.core.model.layers import GatedMLP
from titanserve.kernels import cpu_linear

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN"
)


@pytest.mark.parametrize("rows", [0, 1, 7, 64, 1030])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_matches_f_linear(rows, with_bias):
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 40, generator=g)  # (N, K)
    bias = torch.randn(96, generator=g) if with_bias else None
    x = torch.randn(rows, 40, generator=g)  # (M, K)
    packed = cpu_linear.pack(weight)
    assert packed.is_mkldnn and packed.shape == weight.shape and packed.dtype == weight.dtype
    with torch.inference_mode():
        out = cpu_linear.linear(x, packed, bias)
    assert out.shape == (rows, 96) and out.dtype == torch.float32
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_packed_linear_takes_3d_and_strided_inputs():
    weight = torch.randn(32, 16)
    packed = cpu_linear.pack(weight)
    x3 = torch.randn(2, 5, 16)  # (B, S, K)
    wide = torch.randn(9, 48)[:, 8:24]  # (9, 16), row stride 48
    with torch.inference_mode():
        torch.testing.assert_close(cpu_linear.linear(x3, packed), F.linear(x3, weight))
        torch.testing.assert_close(cpu_linear.linear(wide, packed), F.linear(wide, weight))


def test_dense_weights_go_through_f_linear():
    weight, x = torch.randn(8, 4), torch.randn(3, 4)
    assert torch.equal(cpu_linear.linear(x, weight), F.linear(x, weight))


@pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no bf16 support in oneDNN here"
)
def test_packed_bf16_linear():
    weight = torch.randn(64, 32).bfloat16()
    x = torch.randn(10, 32).bfloat16()
    with torch.inference_mode():
        out = cpu_linear.linear(x, cpu_linear.pack(weight))
    assert out.dtype == torch.bfloat16
    reference = F.linear(x.float(), weight.float())  # both round the fp32 sums once
    torch.testing.assert_close(out.float(), reference, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(
    "weight",
    [
        torch.randn(2, 4, 4),  # 3-D (stacked experts)
        torch.randn(4, 4, dtype=torch.float64),
        torch.randn(4, 4, device="meta"),
    ],
    ids=["3d", "fp64", "meta"],
)
def test_weights_that_cannot_be_packed_are_refused(weight):
    assert not cpu_linear.can_pack(weight)
    with pytest.raises(ValueError, match="cannot pack"):
        cpu_linear.pack(weight)


def test_an_already_packed_weight_is_not_packed_again():
    assert not cpu_linear.can_pack(cpu_linear.pack(torch.randn(4, 4)))


def test_pack_linear_weights_packs_every_listed_weight_and_keeps_outputs(pack_every_weight):
    torch.manual_seed(0)
    mlp = GatedMLP(hidden_size=32, intermediate_size=48)
    torch.nn.init.normal_(mlp.gate_up_proj, std=0.2)
    torch.nn.init.normal_(mlp.down_proj, std=0.2)
    x = torch.randn(20, 32)
    with torch.inference_mode():
        before = mlp(x)
        assert cpu_linear.pack_linear_weights(mlp) == 2
        after = mlp(x)
    assert mlp.gate_up_proj.is_mkldnn and mlp.down_proj.is_mkldnn
    assert isinstance(mlp.gate_up_proj, torch.nn.Parameter)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert cpu_linear.pack_linear_weights(mlp) == 0  # nothing left to pack


def test_small_weights_stay_dense():
    """Below MIN_PACKED_ELEMENTS a weight runs faster through F.linear: it is not packed."""
    torch.manual_seed(0)
    mlp = GatedMLP(hidden_size=256, intermediate_size=256)  # (512, 256) and (256, 256)
    torch.nn.init.normal_(mlp.gate_up_proj, std=0.1)
    torch.nn.init.normal_(mlp.down_proj, std=0.1)
    assert mlp.gate_up_proj.numel() == cpu_linear.MIN_PACKED_ELEMENTS
    assert mlp.down_proj.numel() < cpu_linear.MIN_PACKED_ELEMENTS
    x = torch.randn(5, 256)
    with torch.inference_mode():
        before = mlp(x)
        assert cpu_linear.pack_linear_weights(mlp) == 1
        after = mlp(x)
    assert mlp.gate_up_proj.is_mkldnn and not mlp.down_proj.is_mkldnn
    assert cpu_linear.worth_packing(torch.zeros(cpu_linear.MIN_PACKED_ELEMENTS, 1))
    assert not cpu_linear.worth_packing(torch.zeros(cpu_linear.MIN_PACKED_ELEMENTS - 1, 1))
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_a_build_whose_packed_linear_fails_keeps_weights_dense(monkeypatch, pack_every_weight):
    """An exotic oneDNN build where packing raises (or computes wrong): nothing is packed,
    and the model's layers run through F.linear."""
    def broken(weight, rows_hint):
        raise RuntimeError("mkldnn: unsupported")

    cpu_linear._packed_linear_works.cache_clear()
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", broken)
    try:
        mlp = GatedMLP(hidden_size=8, intermediate_size=12)
        assert not cpu_linear.can_pack(mlp.down_proj)
        assert cpu_linear.pack_linear_weights(mlp) == 0
        assert not mlp.down_proj.is_mkldnn
    finally:
        monkeypatch.undo()
        cpu_linear._packed_linear_works.cache_clear()
    assert cpu_linear.can_pack(torch.randn(4, 4))


def test_row_buckets_are_few_and_pad_by_at_most_an_eighth():
    buckets = [cpu_linear.padded_rows(rows) for rows in range(0, 8193)]
    assert buckets[:17] == [0, 1, 2, 4, 4, 8, 8, 8, 8] + [16] * 8
    assert all(b >= rows for rows, b in enumerate(buckets))
    assert all(b - rows <= rows / 8 for rows, b in enumerate(buckets) if rows > 16)
    assert all(cpu_linear.padded_rows(b) == b for b in buckets)  # a bucket is its own bucket
    assert len(set(buckets[1:257])) == 37 and len(set(buckets[1:])) == 77


def test_padded_rows_never_reach_the_output():
    """Row counts between buckets: the padding rows are computed and sliced off."""
    weight, bias = torch.randn(24, 8), torch.randn(24)
    packed = cpu_linear.pack(weight)
    for rows in (3, 17, 33, 1000):
        x = torch.randn(rows, 8)
        with torch.inference_mode():
            out = cpu_linear.linear(x, packed, bias)
        assert out.shape == (rows, 24) and out.is_contiguous()
        torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_warm_up_builds_each_packed_shape_once_per_bucket():
    weights = [cpu_linear.pack(torch.randn(16, 8)), cpu_linear.pack(torch.randn(16, 8)),
               cpu_linear.pack(torch.randn(4, 8)), torch.randn(16, 8)]  # the dense one: skipped
    assert cpu_linear.warm_up_packed(weights, max_rows=20) == 2 * 7  # 1 2 4 8 16 18 20
    assert cpu_linear.warm_up_packed(weights, max_rows=0) == 0
