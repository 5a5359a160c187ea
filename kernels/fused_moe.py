"""Fused MoE expert computation: per routed (token, expert) pair, gate_up GEMM -> activation
-> down GEMM, scaled by the router weight and summed over the top-k.

Legend: T tokens, H hidden, I expert intermediate size, E experts (E_local on this worker),
K top-k.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from titanserve.kernels.backend import MOE_CONFIG_DIR, backend
from titanserve.kernels.cpu_experts import is_packed
from titanserve.kernels.cpu_linear import linear, padded_rows
from titanserve.kernels.launch import cdiv, require, require_launchable
from titanserve.kernels.moe_align import align_blocks
from titanserve.kernels.weight_layout import relayout_listed_weights

ACTIVATIONS = ("silu", "swiglu_oai")
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
# Default tiles by routed pairs per expert (T*K/E): small GEMMs want short, wide blocks.
_DEFAULT_CONFIGS = (
    (16, {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}),
    (96, {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}),
    (None, {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}),
)
_MAX_PAIRS_PER_CHUNK = 16384  # bounds the (pairs, H) fp32 scratch of the Triton path


def activate(
    gate: torch.Tensor, up: torch.Tensor, activation: str, limit: float, alpha: float
) -> torch.Tensor:
    """`silu(gate) * up`, or GPT-OSS's clamped SwiGLU `g * sigmoid(alpha * g) * (u + 1)`."""
    if activation == "silu":
        return F.silu(gate) * up
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


def fused_moe_torch(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: torch.Tensor | None = None,
    activation: str = "silu",
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    swiglu_limit: float = 7.0,
    swiglu_alpha: float = 1.702,
) -> torch.Tensor:
    """`out[t] = sum_k w[t,k] * down_e(act(gate_e(x_t), up_e(x_t)))`, e = local(topk_ids[t,k]).

    Pairs routed to experts that `expert_map` marks non-local (-1) contribute 0. Accumulates in
    fp32; the result is in x.dtype. The weights are dense stacks or `cpu_experts.PackedExperts`
    (then always the per-expert loop).
    """
    T, H = x.shape
    E_local = w_gate_up.shape[0]
    K = topk_ids.shape[1]
    local = topk_ids.reshape(-1).long()  # (T*K,)
    if expert_map is not None:
        local = expert_map.to(x.device).long()[local]
    pairs = torch.nonzero(local >= 0).squeeze(1)  # (P,) pair indices t*K + k on this worker
    order = torch.argsort(local[pairs], stable=True)
    pairs = pairs[order]  # (P,) grouped by local expert
    counts = torch.bincount(local[pairs], minlength=E_local).tolist()
    if len(counts) > E_local:
        raise ValueError(f"fused_moe: topk_ids route to expert {len(counts) - 1} but only "
                         f"{E_local} are here; pass expert_map (global -> local or -1)")
    tokens = pairs // K  # (P,)
    weights = topk_weights.reshape(-1)[pairs].float()  # (P,)
    act = (activation, swiglu_limit, swiglu_alpha)
    packed = is_packed(w_gate_up, w_down)
    buckets = [padded_rows(n) for n in counts] if packed else counts
    if buckets != counts:
        ys = _experts_packed(x, tokens, counts, buckets, w_gate_up, w_down, gate_up_bias,
                             down_bias, act)
    else:  # dense stacks, or every expert's rows already a bucket (1 token: 1 row each)
        xs = x.index_select(0, tokens)  # (P, H)
        longest = max(counts, default=0)
        batched = (not packed and 0 < longest <= BATCHED_MAX_ROWS
                   and longest * E_local <= MAX_PADDING * len(pairs))
        experts = _experts_batched if batched else _experts_looped
        ys = experts(xs, counts, w_gate_up, w_down, gate_up_bias, down_bias, act)  # (P, H) fp32
    ys.mul_(weights[:, None])
    # Each (token, k) pair owns one row: scatter without accumulation, then sum over k.
    per_pair = torch.zeros(T * K, H, dtype=torch.float32, device=x.device)  # (T*K, H)
    per_pair.index_copy_(0, pairs, ys)
    return per_pair.view(T, K, H).sum(dim=1).to(x.dtype)  # (T, H)


def input_major(weights: torch.Tensor) -> torch.Tensor:
    """Expert weights (E, N, K) with the same shape and values, stored (E, K, N) in memory: the
    torch path multiplies by `weights[e].t()`, which is then contiguous. BLAS copies a
    transposed operand into its own layout on every call; given it as is, a tiny Mixtral's
    decode step (64 requests, 8 experts) ran in 13.6 ms instead of 15.3 ms on this CPU."""
    return weights.transpose(1, 2).contiguous().transpose(1, 2)


def use_input_major_experts(model: torch.nn.Module) -> int:
    """In place, lay out every torch-backend expert weight a module lists in `EXPERT_WEIGHTS`
    (its (E, N, K) stacks) with `input_major`; returns how many. The Triton kernels keep the
    checkpoint's layout."""
    def takes(weights: torch.Tensor) -> bool:
        return weights.dim() == 3 and backend(weights) == "torch"

    return relayout_listed_weights(model, "EXPERT_WEIGHTS", takes, input_major)


# Small batches (decode) run every expert in two batched matmuls over rows padded to the
# busiest expert's count, while that padding stays cheap; large ones (prefill) loop over
# experts, where per-call overhead no longer matters and padded copies would.
MAX_PADDING = 2.0  # padded rows <= MAX_PADDING * routed pairs
BATCHED_MAX_ROWS = 256  # rows of the busiest expert


def _ffn_tail(h, gate_up_bias, down, down_bias, dtype, act) -> torch.Tensor:
    """gate_up output h (..., n, 2I) fp32 of one expert or all (batched) -> bias, activation,
    `down` projection (a -> a @ w_down^T) (+ bias): (..., n, H) fp32."""
    inter = h.shape[-1] // 2
    if gate_up_bias is not None:
        h = h + gate_up_bias.float().unsqueeze(-2)
    y = down(activate(h[..., :inter], h[..., inter:], *act).to(dtype)).float()
    return y if down_bias is None else y + down_bias.float().unsqueeze(-2)


def _experts_batched(xs, counts, w_gate_up, w_down, gate_up_bias, down_bias, act):
    """Rows sorted by expert, padded to (E, max count, H): two batched matmuls for all experts
    (small decode batches spend most of a per-expert loop in per-call overhead)."""
    E, longest, H = len(counts), max(counts), xs.shape[1]
    sizes = torch.tensor(counts, device=xs.device)  # (E,)
    expert = torch.repeat_interleave(torch.arange(E, device=xs.device), sizes)  # (P,)
    first = torch.cumsum(sizes, 0) - sizes  # (E,)
    dest = expert * longest + torch.arange(len(xs), device=xs.device) - first[expert]  # (P,)
    padded = xs.new_zeros(E * longest, H).index_copy_(0, dest, xs).view(E, longest, H)
    h = torch.bmm(padded, w_gate_up.transpose(1, 2)).float()  # (E, longest, 2I)
    y = _ffn_tail(h, gate_up_bias, lambda a: torch.matmul(a, w_down.transpose(-1, -2)),
                  down_bias, xs.dtype, act)  # (E, longest, H)
    return y.view(E * longest, H).index_select(0, dest)  # (P, H)


def _experts_looped(xs, counts, w_gate_up, w_down, gate_up_bias, down_bias, act):
    """One matmul pair per expert on its rows (rows sorted by expert)."""
    ys = torch.empty(len(xs), xs.shape[1], dtype=torch.float32, device=xs.device)  # (P, H)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = slice(start, start + n)
        start += n
        ys[rows] = _expert_ffn(xs[rows], e, w_gate_up, w_down, gate_up_bias, down_bias, act)
    return ys


def _experts_packed(x, tokens, counts, buckets, w_gate_up, w_down, gate_up_bias, down_bias,
                    act):
    """The per-expert loop over oneDNN-packed experts (`cpu_experts.PackedExperts`). Each
    expert's rows are gathered padded to `buckets`, its linears' row bucket (`padded_rows`),
    all in one buffer, so that no linear pads a copy of its own (a few ops more per call, in a
    loop of 2 per expert per layer); the padding rows repeat token 0 and are dropped."""
    sizes = np.asarray(counts)  # (E,)
    buckets = np.asarray(buckets)  # (E,)
    bucket_starts = np.cumsum(buckets) - buckets  # (E,)
    shift = np.repeat(bucket_starts - (np.cumsum(sizes) - sizes), sizes)  # (P,)
    dest = torch.from_numpy(shift + np.arange(len(shift))).to(x.device)  # (P,) buffer row
    rows_total = int(buckets.sum())
    row_tokens = tokens.new_zeros(rows_total).index_copy_(0, dest, tokens)  # (R,)
    xs = x.index_select(0, row_tokens)  # (R, H)
    ys = torch.empty(rows_total, x.shape[1], dtype=torch.float32, device=x.device)  # (R, H)
    for e, (n, start, size) in enumerate(zip(counts, bucket_starts.tolist(), buckets.tolist())):
        if n:
            rows = slice(start, start + size)
            ys[rows] = _expert_ffn(xs[rows], e, w_gate_up, w_down, gate_up_bias, down_bias, act)
    return ys.index_select(0, dest)  # (P, H)


def _expert_ffn(xs, e, w_gate_up, w_down, gate_up_bias, down_bias, act) -> torch.Tensor:
    """Expert e on rows xs (n, H), dense or packed weights -> (n, H) fp32."""
    h = linear(xs, w_gate_up[e]).float()  # (n, 2I)
    return _ffn_tail(
        h,
        None if gate_up_bias is None else gate_up_bias[e],
        lambda a, w=w_down[e]: linear(a, w),
        None if down_bias is None else down_bias[e],
        xs.dtype,
        act,
    )


def config_file_name(E: int, N: int, K: int, dtype: torch.dtype, device_name: str) -> str:
    """Name of a tuned table for E experts, intermediate size N, hidden size K."""
    dtype_name = str(dtype).removeprefix("torch.")
    return f"E={E},N={N},K={K},device_name={device_name.replace(' ', '_')},dtype={dtype_name}.json"


@functools.lru_cache(maxsize=64)
def _tuned_table(file_name: str) -> dict[int, dict] | None:
    dirs = [d for d in (MOE_CONFIG_DIR, Path(__file__).parent / "configs") if d is not None]
    for path in (d / file_name for d in dirs):
        if path.is_file():
            return {int(m): cfg for m, cfg in json.loads(path.read_text()).items()}
    return None


def pick_config(table: dict[int, dict], T: int) -> dict:
    """The entry of a tuned table (keyed by token count) whose key is nearest T."""
    return table[min(table, key=lambda m: abs(m - T))]


def get_config(T: int, E: int, N: int, K: int, top_k: int, x: torch.Tensor) -> dict:
    """Tiles for T tokens: the tuned table's entry nearest T when one exists, else a default."""
    if x.is_cuda:
        name = config_file_name(E, N, K, x.dtype, torch.cuda.get_device_name(x.device))
        table = _tuned_table(name)
        if table:
            return pick_config(table, T)
    per_expert = T * top_k / max(E, 1)
    return next(cfg for bound, cfg in _DEFAULT_CONFIGS if bound is None or per_expert <= bound)


@triton.jit(do_not_specialize=["num_pairs"])  # see core.warmup
def _gate_up_kernel(
    x_ptr, w_ptr, bias_ptr, inter_ptr, sorted_ids_ptr, block_expert_ids_ptr,
    num_pairs, num_experts, top_k, H, inter_size,
    stride_xt, stride_we, stride_wn, stride_be, limit, alpha,
    SWIGLU_OAI: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """inter[pair, n] = act(x[token] . w[e, n], x[token] . w[e, I + n]), one block of pairs."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ids_ptr + pid_m).to(tl.int64)
    if (expert < 0) | (expert >= num_experts):  # a block past the used ones, or not local
        return
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pairs < num_pairs
    tokens = (pairs // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < inter_size
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :]
    g_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
    u_ptrs = g_ptrs + inter_size * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok = offs_k < H - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        acc_g = tl.dot(a, tl.load(g_ptrs, mask=w_mask, other=0.0), acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, tl.load(u_ptrs, mask=w_mask, other=0.0), acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    if HAS_BIAS:
        b_ptrs = bias_ptr + expert * stride_be + offs_n
        acc_g += tl.load(b_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(b_ptrs + inter_size, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if SWIGLU_OAI:
        g = tl.minimum(acc_g, limit)
        u = tl.minimum(tl.maximum(acc_u, -limit), limit)
        h = g * tl.sigmoid(alpha * g) * (u + 1.0)
    else:
        h = acc_g * tl.sigmoid(acc_g) * acc_u
    out_ptrs = inter_ptr + pairs.to(tl.int64)[:, None] * inter_size + offs_n[None, :]
    tl.store(out_ptrs, h.to(inter_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["num_pairs"])
def _down_kernel(
    inter_ptr, w_ptr, bias_ptr, topk_weights_ptr, out_ptr, sorted_ids_ptr, block_expert_ids_ptr,
    num_pairs, num_experts, H, inter_size, stride_we, stride_wn, stride_be,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[pair, n] = topk_weight[pair] * (inter[pair] . w[e, n] + bias[e, n]), fp32."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ids_ptr + pid_m).to(tl.int64)
    if (expert < 0) | (expert >= num_experts):
        return
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pairs < num_pairs
    rows = pairs.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = inter_ptr + rows[:, None] * inter_size + offs_k[None, :]
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter_size, BLOCK_K):
        k_ok = offs_k < inter_size - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        b = tl.load(bias_ptr + expert * stride_be + offs_n, mask=col_ok, other=0.0)
        acc += b.to(tl.float32)[None, :]
    acc *= tl.load(topk_weights_ptr + rows, mask=row_ok, other=0.0)[:, None]
    tl.store(out_ptr + rows[:, None] * H + offs_n[None, :], acc,
             mask=row_ok[:, None] & col_ok[None, :])


def fused_moe_triton(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: torch.Tensor | None = None,
    activation: str = "silu",
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    swiglu_limit: float = 7.0,
    swiglu_alpha: float = 1.702,
    config: dict | None = None,
) -> torch.Tensor:
    """Triton `fused_moe_torch`: align pairs into per-expert blocks of BLOCK_M rows, grouped
    GEMM gate_up with the activation fused, grouped GEMM down with the router weight in the
    epilogue into a per-pair fp32 buffer, then a fixed-order sum over the top-k
    (deterministic). `config` overrides the tile sizes (see `get_config`)."""
    require_launchable("fused_moe", x, w_gate_up, w_down, topk_weights, topk_ids, expert_map,
                       gate_up_bias, down_bias)
    require(x.stride(1) == 1, "fused_moe: x needs a contiguous last dim")
    # Weights laid out for the torch path (`input_major`: a CPU model, then a backend forced
    # to Triton) are copied into the layout the kernels read; GPU weights never are.
    w_gate_up, w_down = (w if w.stride(2) == 1 else w.contiguous() for w in (w_gate_up, w_down))
    T, H = x.shape
    E_local, two_i, _ = w_gate_up.shape
    inter_size = two_i // 2
    top_k = topk_ids.shape[1]
    chunk = max(1, _MAX_PAIRS_PER_CHUNK // top_k)
    if T > chunk:
        return torch.cat([
            fused_moe_triton(
                x[s : s + chunk], w_gate_up, w_down, topk_weights[s : s + chunk],
                topk_ids[s : s + chunk], expert_map, activation, gate_up_bias, down_bias,
                swiglu_limit, swiglu_alpha, config)
            for s in range(0, T, chunk)
        ])
    cfg = config or get_config(T, E_local, inter_size, H, top_k, x)
    BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    launch = {"num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 3)}
    ids = topk_ids
    if expert_map is not None:  # non-local pairs go to a dummy expert E_local, sorted last
        local = expert_map.to(torch.int32)[topk_ids.long()]  # (T, K)
        ids = torch.where(local < 0, E_local, local)
    num_experts = E_local + (expert_map is not None)
    sorted_ids, block_expert_ids, _ = align_blocks(ids, num_experts, BM)
    # One program per block the alignment may fill; the unused ones and the dummy expert's
    # return at once. So no step waits for the GPU here, and a CUDA graph can hold the
    # launch (core.cuda_graphs).
    num_blocks = block_expert_ids.shape[0]
    num_pairs = T * top_k
    pair_out = torch.zeros(num_pairs, H, dtype=torch.float32, device=x.device)  # (T*K, H)
    if num_pairs > 0:
        precision = "ieee" if x.dtype == torch.float32 else "tf32"
        inter = torch.empty(num_pairs, inter_size, dtype=x.dtype, device=x.device)  # (T*K, I)
        _gate_up_kernel[(num_blocks, cdiv(inter_size, BN))](
            x, w_gate_up, gate_up_bias if gate_up_bias is not None else x, inter, sorted_ids,
            block_expert_ids, num_pairs, E_local, top_k, H, inter_size, x.stride(0),
            w_gate_up.stride(0), w_gate_up.stride(1),
            gate_up_bias.stride(0) if gate_up_bias is not None else 0,
            float(swiglu_limit), float(swiglu_alpha), SWIGLU_OAI=activation == "swiglu_oai",
            HAS_BIAS=gate_up_bias is not None, PRECISION=precision,
            BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, **launch,
        )
        weights = topk_weights.reshape(-1).float().contiguous()  # (T*K,)
        _down_kernel[(num_blocks, cdiv(H, BN))](
            inter, w_down, down_bias if down_bias is not None else x, weights, pair_out,
            sorted_ids, block_expert_ids, num_pairs, E_local, H, inter_size, w_down.stride(0),
            w_down.stride(1), down_bias.stride(0) if down_bias is not None else 0,
            HAS_BIAS=down_bias is not None, PRECISION=precision,
            BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, **launch,
        )
    return pair_out.view(T, top_k, H).sum(dim=1).to(x.dtype)  # (T, H)
