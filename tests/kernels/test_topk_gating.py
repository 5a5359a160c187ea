"""topk_gating: torch implementation vs a per-token loop (Mixtral/Qwen softmax, DeepSeek-V3
sigmoid + bias + group-limited), and the Triton kernel vs torch."""

import math

import pytest
import torch

from titanserve.kernels import forced_backend, ops
from titanserve.kernels.launch import interpreting
from titanserve.kernels.topk_gating import topk_gating_torch, topk_gating_triton

interp = pytest.mark.skipif(not interpreting(), reason="Triton is compiling (GPU): see gpu tests")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def gating_loop(logits, top_k, scoring="softmax", renormalize=True, bias=None, num_groups=1,
                topk_groups=1, scale=1.0):
    all_weights, all_ids = [], []
    for row in logits.float().tolist():
        E = len(row)
        if scoring == "softmax":
            exps = [math.exp(v - max(row)) for v in row]
            scores = [v / sum(exps) for v in exps]
        else:
            scores = [1.0 / (1.0 + math.exp(-v)) for v in row]
        choice = [s + (float(bias[e]) if bias is not None else 0.0) for e, s in enumerate(scores)]
        allowed = list(range(E))
        if num_groups > 1:
            size = E // num_groups
            group_scores = []
            for g in range(num_groups):
                best = sorted(choice[g * size : (g + 1) * size], reverse=True)
                group_scores.append(sum(best[:2]) if scoring == "sigmoid" else best[0])
            groups = sorted(range(num_groups), key=lambda g: -group_scores[g])[:topk_groups]
            allowed = [e for e in range(E) if e // size in groups]
        ids = sorted(allowed, key=lambda e: -choice[e])[:top_k]
        weights = [scores[e] for e in ids]
        if renormalize:
            weights = [w / sum(weights) for w in weights]
        all_weights.append([w * scale for w in weights])
        all_ids.append(ids)
    return (torch.tensor(all_weights, dtype=torch.float32).reshape(-1, top_k),
            torch.tensor(all_ids, dtype=torch.int32).reshape(-1, top_k))


CASES = [
    dict(top_k=1),
    dict(top_k=2),
    dict(top_k=3, renormalize=False),
    dict(top_k=3, scoring="sigmoid", bias=True, num_groups=4, topk_groups=2, scale=2.5),
    dict(top_k=2, scoring="sigmoid", num_groups=8, topk_groups=3, renormalize=False),
    dict(top_k=2, scoring="softmax", num_groups=2, topk_groups=1),  # DeepSeek-V2 style
]


def _args(case, E, gen):
    case = dict(case)
    bias = torch.randn(E, generator=gen) * 0.1 if case.pop("bias", False) else None
    return dict(top_k=case.pop("top_k"), scoring=case.get("scoring", "softmax"),
                renormalize=case.get("renormalize", True), correction_bias=bias,
                num_groups=case.get("num_groups", 1), topk_groups=case.get("topk_groups", 1),
                routed_scaling_factor=case.get("scale", 1.0))


@pytest.mark.parametrize("case", CASES)
def test_torch_matches_loop(case):
    gen = torch.Generator().manual_seed(len(case))
    logits = torch.randn(9, 8, generator=gen)
    args = _args(case, 8, gen)
    weights, ids = topk_gating_torch(logits, **args)
    want_w, want_ids = gating_loop(
        logits, args["top_k"], args["scoring"], args["renormalize"], args["correction_bias"],
        args["num_groups"], args["topk_groups"], args["routed_scaling_factor"])
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w)


@interp
@pytest.mark.parametrize("T", [0, 1, 7, 33])
@pytest.mark.parametrize("E,top_k", [(3, 1), (3, 3), (8, 2)])
def test_triton_matches_torch_softmax(T, E, top_k):
    gen = torch.Generator().manual_seed(T + E)
    logits = torch.randn(T, E, generator=gen)
    got, want = topk_gating_triton(logits, top_k), topk_gating_torch(logits, top_k)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0])


@interp
@pytest.mark.parametrize("case", CASES[2:])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_torch_variants(case, dtype):
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(33, 8, generator=gen).to(dtype)
    args = _args(case, 8, gen)
    got, want = topk_gating_triton(logits, **args), topk_gating_torch(logits, **args)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0])


@interp
def test_triton_ties_go_to_the_lowest_expert():
    weights, ids = topk_gating_triton(torch.zeros(2, 8), 3)
    assert ids.tolist() == [[0, 1, 2], [0, 1, 2]]
    torch.testing.assert_close(weights, torch.full((2, 3), 1 / 3))


@interp
def test_ops_dispatch():
    logits = torch.randn(7, 8)
    with forced_backend("triton"):
        got = ops.topk_gating(logits, 2)
    want = topk_gating_torch(logits, 2)
    assert torch.equal(got[1], want[1])


def test_argument_errors():
    logits = torch.randn(3, 8)
    with pytest.raises(ValueError, match="scoring"):
        ops.topk_gating(logits, 2, scoring="tanh")
    with pytest.raises(ValueError, match="top_k"):
        ops.topk_gating(logits, 9)
    with pytest.raises(ValueError, match="top_k"):
        ops.topk_gating(logits, 5, num_groups=4, topk_groups=2)  # only 4 experts kept
    with pytest.raises(ValueError, match="num_groups"):
        ops.topk_gating(logits, 2, num_groups=3)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_torch_cuda_bf16(case):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(257, 64, generator=gen).to("cuda", torch.bfloat16)
    args = _args(case, 64, gen)
    if args["correction_bias"] is not None:
        args["correction_bias"] = args["correction_bias"].cuda()
    (got_w, got_ids), (want_w, want_ids) = (topk_gating_triton(logits, **args),
                                            topk_gating_torch(logits, **args))
    # bf16 logits tie often: ours takes the lowest expert, torch.topk on CUDA any of them. So
    # the experts may differ only by equal choice values, rank by rank.
    logits = logits.float()
    scores = logits.softmax(-1) if args["scoring"] == "softmax" else logits.sigmoid()  # (T, E)
    choice = scores + (0 if args["correction_bias"] is None else args["correction_bias"])
    torch.testing.assert_close(choice.gather(1, got_ids.long()), choice.gather(1, want_ids.long()),
                               atol=1e-6, rtol=0)
    same = (got_ids == want_ids).all(1)  # (T,) rows without a tie that matters
    assert same.float().mean() > 0.9
    torch.testing.assert_close(got_w[same], want_w[same], atol=1e-5, rtol=1e-5)
