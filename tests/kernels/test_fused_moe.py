"""fused_moe: torch implementation vs a per-(token, slot) loop, Triton vs torch; routing edge
cases (empty input, one hot expert, idle experts, non-local experts), GPT-OSS's clamped SwiGLU
with biases, chunking, tile overrides and tuned tables."""

import json

import pytest
import torch
import torch.nn.functional as F

import titanserve.kernels.fused_moe as fused_moe_mod
from titanserve.kernels import forced_backend, ops
from titanserve.kernels.fused_moe import (
    config_file_name,
    fused_moe_torch,
    fused_moe_triton,
    get_config,
    input_major,
    pick_config,
)
from titanserve.kernels.launch import interpreting

interp = pytest.mark.skipif(not interpreting(), reason="Triton is compiling (GPU): see gpu tests")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_moe(T, K, E, H, N, routing="random", mapped=False, biases=False, dtype=torch.float32,
             device="cpu", seed=0):
    """Inputs for fused_moe. mapped: 2E global experts, the even ones local (e // 2)."""
    gen = torch.Generator().manual_seed(seed)
    E_global = 2 * E if mapped else E
    ids = torch.stack([torch.randperm(E_global, generator=gen)[:K] for _ in range(T)]) if T else (
        torch.zeros(0, K, dtype=torch.int64))
    if routing == "one_expert":  # every token's first slot to the same expert
        ids[:, 0] = 0
        ids[:, 1:] = torch.arange(1, K)  # distinct from slot 0
    elif routing == "sparse":  # only experts 0 and 2 get tokens
        ids = torch.tensor([0, 2] * K)[:K].repeat(T, 1) if K <= 2 else ids
    args = dict(
        x=torch.randn(T, H, generator=gen),
        w_gate_up=torch.randn(E, 2 * N, H, generator=gen) / H**0.5,
        w_down=torch.randn(E, H, N, generator=gen) / N**0.5,
        topk_weights=torch.rand(T, K, generator=gen),
        topk_ids=ids,
        expert_map=torch.tensor([e // 2 if e % 2 == 0 else -1 for e in range(E_global)],
                                dtype=torch.int32) if mapped else None,
        gate_up_bias=torch.randn(E, 2 * N, generator=gen) if biases else None,
        down_bias=torch.randn(E, H, generator=gen) if biases else None,
    )
    return {k: (v.to(device, dtype) if v is not None and v.is_floating_point() and
                k != "topk_weights" else v.to(device) if v is not None else None)
            for k, v in args.items()}


def fused_moe_loop(x, w_gate_up, w_down, topk_weights, topk_ids, expert_map=None,
                   activation="silu", gate_up_bias=None, down_bias=None, limit=7.0, alpha=1.702):
    T, H = x.shape
    inter = w_down.shape[2]
    out = torch.zeros(T, H)
    for t in range(T):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            e = e if expert_map is None else int(expert_map[e])
            if e < 0:
                continue
            h = w_gate_up[e].float() @ x[t].float()
            if gate_up_bias is not None:
                h = h + gate_up_bias[e].float()
            g, u = h[:inter], h[inter:]
            if activation == "silu":
                a = F.silu(g) * u
            else:
                g, u = g.clamp(max=limit), u.clamp(-limit, limit)
                a = g * torch.sigmoid(alpha * g) * (u + 1)
            y = w_down[e].float() @ a
            if down_bias is not None:
                y = y + down_bias[e].float()
            out[t] += topk_weights[t, k] * y
    return out.to(x.dtype)


# (T, K, E, H, N, routing, mapped): odd sizes, one hot expert, idle experts, non-local experts.
CASES = [
    (1, 1, 3, 32, 16, "random", False),
    (7, 2, 8, 32, 24, "random", True),
    (7, 3, 3, 48, 40, "one_expert", False),
    (33, 2, 8, 32, 24, "sparse", True),
    (33, 3, 3, 48, 40, "random", False),
]


# MAX_PADDING 0: always the per-expert loop; inf: always the padded batched matmuls.
@pytest.mark.parametrize("max_padding", [0.0, float("inf")], ids=["looped", "batched"])
@pytest.mark.parametrize("T,K,E,H,N,routing,mapped", CASES)
def test_torch_matches_loop(T, K, E, H, N, routing, mapped, max_padding, monkeypatch):
    monkeypatch.setattr(fused_moe_mod, "MAX_PADDING", max_padding)
    args = make_moe(T, K, E, H, N, routing, mapped)
    torch.testing.assert_close(fused_moe_torch(**args), fused_moe_loop(**args))


@pytest.mark.parametrize("max_padding", [0.0, float("inf")], ids=["looped", "batched"])
def test_input_major_weights_give_the_same_result(max_padding, monkeypatch):
    """Expert weights stored (E, K, N) under their (E, N, K) shape (`input_major`, what the
    CPU runner uses): same values, contiguous transposes, the same expert outputs (up to
    BLAS's summation order)."""
    monkeypatch.setattr(fused_moe_mod, "MAX_PADDING", max_padding)
    args = make_moe(33, 2, 8, 32, 24, "random", True)
    want = fused_moe_torch(**args)
    for name in ("w_gate_up", "w_down"):
        weights = args[name]
        args[name] = input_major(weights)
        assert args[name].shape == weights.shape and torch.equal(args[name], weights)
        assert not args[name].is_contiguous() and args[name][0].t().is_contiguous()
    torch.testing.assert_close(fused_moe_torch(**args), want, rtol=1e-6, atol=1e-6)


@interp
def test_triton_takes_input_major_weights():
    """A CPU model's experts are input-major; forcing the Triton backend afterwards still works."""
    args = make_moe(9, 2, 4, 32, 16)
    want = fused_moe_torch(**args)
    args.update(w_gate_up=input_major(args["w_gate_up"]), w_down=input_major(args["w_down"]))
    torch.testing.assert_close(fused_moe_triton(**args), want, atol=1e-4, rtol=1e-4)


def test_batched_path_is_taken_only_while_padding_is_cheap(monkeypatch):
    calls = []
    for name in ("_experts_batched", "_experts_looped"):
        real = getattr(fused_moe_mod, name)
        monkeypatch.setattr(fused_moe_mod, name,
                            lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    fused_moe_torch(**make_moe(33, 2, 8, 32, 24, "random", False))  # ~8 rows per expert
    fused_moe_torch(**make_moe(33, 2, 8, 32, 24, "one_expert", False))  # 33 rows vs 66 pairs
    monkeypatch.setattr(fused_moe_mod, "BATCHED_MAX_ROWS", 4)  # a prefill-sized batch
    fused_moe_torch(**make_moe(33, 2, 8, 32, 24, "random", False))
    assert calls == ["_experts_batched", "_experts_looped", "_experts_looped"]


@pytest.mark.parametrize("max_padding", [0.0, float("inf")], ids=["looped", "batched"])
@pytest.mark.parametrize("mapped", [False, True])
def test_torch_swiglu_oai_with_biases_matches_loop(mapped, max_padding, monkeypatch):
    monkeypatch.setattr(fused_moe_mod, "MAX_PADDING", max_padding)
    args = make_moe(7, 2, 4, 32, 24, mapped=mapped, biases=True)
    args["x"] = args["x"] * 4  # reach the clamp
    got = fused_moe_torch(**args, activation="swiglu_oai", swiglu_limit=2.0)
    torch.testing.assert_close(got, fused_moe_loop(**args, activation="swiglu_oai", limit=2.0))


def test_empty_input():
    args = make_moe(0, 2, 8, 32, 16)
    assert fused_moe_torch(**args).shape == (0, 32)


@interp
@pytest.mark.parametrize("T,K,E,H,N,routing,mapped", [(0, 2, 8, 32, 16, "random", True), *CASES])
def test_triton_matches_torch(T, K, E, H, N, routing, mapped):
    args = make_moe(T, K, E, H, N, routing, mapped)
    torch.testing.assert_close(fused_moe_triton(**args), fused_moe_torch(**args))


@interp
@pytest.mark.parametrize("mapped", [False, True])
def test_triton_swiglu_oai_biases_fp16(mapped):
    args = make_moe(33, 2, 4, 32, 24, mapped=mapped, biases=True, dtype=torch.float16)
    got = fused_moe_triton(**args, activation="swiglu_oai")
    torch.testing.assert_close(got, fused_moe_torch(**args, activation="swiglu_oai"),
                               atol=1e-2, rtol=1e-2)


@interp
def test_triton_small_tiles_and_chunks(monkeypatch):
    """16-wide tiles: several n-blocks and k-steps per GEMM; 8 pairs per chunk: 5 chunks."""
    monkeypatch.setattr(fused_moe_mod, "_MAX_PAIRS_PER_CHUNK", 8)
    args = make_moe(17, 2, 3, 48, 40, mapped=True)
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}
    torch.testing.assert_close(fused_moe_triton(**args, config=config), fused_moe_torch(**args))


@interp
def test_ops_dispatch_int32_ids():
    args = make_moe(7, 2, 8, 32, 16)
    args["topk_ids"] = args["topk_ids"].to(torch.int32)
    with forced_backend("triton"):
        got = ops.fused_moe(**args)
    torch.testing.assert_close(got, fused_moe_torch(**args))


def test_tuned_table_is_loaded_and_nearest_m_wins(tmp_path, monkeypatch):
    small = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}
    large = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    name = config_file_name(8, 1024, 2048, torch.bfloat16, "NVIDIA H100 80GB HBM3")
    assert name == "E=8,N=1024,K=2048,device_name=NVIDIA_H100_80GB_HBM3,dtype=bfloat16.json"
    (tmp_path / name).write_text(json.dumps({"1": small, "512": large}))
    monkeypatch.setattr(fused_moe_mod, "MOE_CONFIG_DIR", tmp_path)
    fused_moe_mod._tuned_table.cache_clear()
    table = fused_moe_mod._tuned_table(name)
    assert pick_config(table, 3) == small and pick_config(table, 400) == large
    fused_moe_mod._tuned_table.cache_clear()


def test_default_config_grows_with_tokens_per_expert():
    x = torch.zeros(1, 8)
    assert get_config(1, 64, 512, 1024, 8, x)["BLOCK_M"] == 16
    assert get_config(8192, 64, 512, 1024, 8, x)["BLOCK_M"] == 64


def test_argument_errors():
    args = make_moe(3, 2, 4, 32, 16)
    with pytest.raises(ValueError, match="activation"):
        ops.fused_moe(**args, activation="gelu")
    with pytest.raises(ValueError, match="w_down"):
        ops.fused_moe(**{**args, "w_down": args["w_down"][:, :, :8]})
    with pytest.raises(ValueError, match="dtype|share"):
        ops.fused_moe(**{**args, "x": args["x"].half()})
    with pytest.raises(ValueError, match="expert_map"):
        ops.fused_moe(**{**args, "topk_ids": args["topk_ids"] + 4})  # global ids, no map


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("mapped,activation", [(False, "silu"), (True, "silu"),
                                               (False, "swiglu_oai")])
@pytest.mark.parametrize("T", [1, 33, 1000])
def test_triton_matches_torch_cuda_bf16(T, mapped, activation):
    biases = activation == "swiglu_oai"
    args = make_moe(T, 4, 16, 512, 256, mapped=mapped, biases=biases, dtype=torch.bfloat16,
                    device="cuda")
    got = fused_moe_triton(**args, activation=activation)
    want = fused_moe_torch(**args, activation=activation)
    # Both round to bf16 at different points (the clamped SwiGLU's `u + 1` makes that show), so
    # measure each against the fp32 computation: ours may not be further off than torch's.
    exact = fused_moe_torch(**{k: v.float() if torch.is_tensor(v) and v.is_floating_point()
                               else v for k, v in args.items()}, activation=activation)
    ours, theirs = (got.float() - exact).abs(), (want.float() - exact).abs()
    assert ours.max() <= 1.5 * theirs.max() + 1e-3
    assert ours.mean() <= 1.5 * theirs.mean() + 1e-4
    torch.testing.assert_close(got, want, atol=5e-2, rtol=2e-2)
