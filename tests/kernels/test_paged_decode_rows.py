"""paged_decode_attn_rows (CPU decode through embedding_bag, reading the cache in place) vs
paged_decode_attn_torch: GQA/MQA, empty contexts, block size 1, length groups, pages shared by
several sequences (prefix caching), unused table entries pointing at live blocks."""

import pytest
import torch

from tests.kernels.test_paged_decode import CASES, assert_decode_close, decode_loop, make_decode
from titanserve.core.model.kv_cache import allocate_kv_caches, key_pages, value_pages
from titanserve.kernels.paged_decode import paged_decode_attn_torch
from titanserve.kernels.paged_decode_rows import decode_rows, paged_decode_attn_rows


def run_rows(q, k_cache, v_cache, tables, lens, scale=None):
    Hq, D = q.shape[1:]
    Hk, block_size = k_cache.shape[2], k_cache.shape[1]
    rows = decode_rows(tables, lens, Hk, Hq // Hk, k_cache.shape[0], block_size, D)
    scale = D**-0.5 if scale is None else scale
    return rows, paged_decode_attn_rows(q, key_pages(k_cache), value_pages(v_cache), rows, scale)


@pytest.mark.parametrize("Hq,Hk,D,block_size,max_blocks,lens", CASES)
def test_rows_match_the_loop(Hq, Hk, D, block_size, max_blocks, lens):
    args = make_decode(
        len(lens), Hq, Hk, D, block_size, max_blocks, lens, head_major=True, keys_transposed=True
    )
    _, got = run_rows(*args)
    assert_decode_close(got, decode_loop(*args), atol=1e-5, rtol=1e-5)


def test_mixed_lengths_and_shared_pages():
    lens = [1, 0, 60, 3] * 8 + [7] * 8  # 40 sequences of very different lengths
    q, k_cache, v_cache, tables, lens = make_decode(
        len(lens), 8, 2, 16, 4, 15, lens, num_blocks=160, head_major=True, keys_transposed=True
    )
    tables[::5, 0] = tables[2, 0]  # one page in many sequences' tables, as a cached prefix is
    lens[::5] = torch.clamp(lens[::5], min=1)
    rows, got = run_rows(q, k_cache, v_cache, tables, lens, scale=0.3)
    assert rows.seq_of_page.shape[0] == sum(-(-n // 4) for n in lens.tolist())  # no padding
    want = paged_decode_attn_torch(q, k_cache, v_cache, tables, lens, scale=0.3)
    assert_decode_close(got, want, atol=1e-5, rtol=1e-5)


def test_padding_never_leaks_into_a_sequence():
    """Sequence 0's table entries past its context point at sequence 1's pages; poisoning
    those pages and the unused slots of sequence 0's last page changes nothing for it."""
    q, k_cache, v_cache, tables, lens = make_decode(
        4, 4, 2, 8, 4, 6, [5, 24, 9, 1], num_blocks=24, head_major=True, keys_transposed=True
    )
    tables[:] = torch.arange(24).view(4, 6)  # no page in two sequences
    tables[0, 2:] = tables[1, 2:]
    _, before = run_rows(q, k_cache, v_cache, tables, lens)
    for cache in (k_cache, v_cache):
        cache[tables[1, 2:].long()] = 1e30
        cache[tables[0, 1].long(), 1:] = 1e30  # sequence 0 uses slot 0 of its 2nd page only
    _, after = run_rows(q, k_cache, v_cache, tables, lens)
    torch.testing.assert_close(after[0][0], before[0][0])
    torch.testing.assert_close(after[1][0], before[1][0])
    assert not torch.allclose(after[0][1], before[0][1])  # the poison did reach sequence 1


@pytest.mark.parametrize("q_scale,unshifted", [(1.0, True), (40.0, False)])
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
def test_any_key_in_a_hidden_slot_is_ignored(monkeypatch, poison, q_scale, unshifted):
    """A slot past a context scores garbage (whatever key it holds, nan too) until exp() and
    weighs 0 after, on both softmax paths (40: scores past e^30, the exact path)."""
    q, k_cache, v_cache, tables, lens = make_decode(
        4, 4, 2, 8, 4, 6, [5, 24, 9, 1], num_blocks=24, head_major=True, keys_transposed=True
    )
    q = q * q_scale
    tables[:] = torch.arange(24).view(4, 6)  # no page in two sequences
    _, before = run_rows(q, k_cache, v_cache, tables, lens)
    for seq, n in enumerate(lens.tolist()):
        k_cache[tables[seq, (n - 1) // 4].long(), (n - 1) % 4 + 1 :] = poison  # its last page
    taken = _spy_unshifted(monkeypatch)
    _, after = run_rows(q, k_cache, v_cache, tables, lens)
    assert taken == [unshifted]
    assert_decode_close(after, before, atol=0, rtol=0)


def test_kv_cache_layout_and_writes():
    """allocate_kv_caches: logical (L, blocks, bs, Hk, D) views; on CPU fp32 the keys are
    page-transposed and index_put_ writes land in that memory."""
    keys, values = allocate_kv_caches(2, 3, 5, 4, 8, torch.float32, torch.device("cpu"))
    assert keys.shape == values.shape == (2, 5, 4, 3, 8)
    assert key_pages(keys[1]) is not None and value_pages(values[1]).is_contiguous()
    x = torch.randn(2, 3, 8)  # two tokens
    blocks, offsets = torch.tensor([4, 0]), torch.tensor([3, 1])
    keys[1].index_put_((blocks, offsets), x)
    assert torch.equal(key_pages(keys[1])[:, 4, :, 3], x[0])  # (Hk, D) of block 4, slot 3
    assert torch.equal(keys[1, 0, 1], x[1])
    assert keys[0].abs().sum() == 0
    bf16_keys, _ = allocate_kv_caches(1, 3, 5, 4, 8, torch.bfloat16, torch.device("cpu"))
    assert key_pages(bf16_keys[0]) is None  # other dtypes keep the plain head-major keys


def test_every_context_empty():
    q, k_cache, v_cache, tables, lens = make_decode(
        3, 4, 2, 8, 4, 2, [0, 0, 0], head_major=True, keys_transposed=True
    )
    _, (out, lse) = run_rows(q, k_cache, v_cache, tables, lens)
    assert torch.equal(out, torch.zeros_like(q)) and torch.isneginf(lse).all()


@pytest.mark.parametrize("in_place", [True, False])
def test_scores_spread_past_exps_range(in_place):
    """Keys e^100+ times less likely than the best (exp underflows; the kernels floor it at
    e^-87 for speed) still give the exact attention."""
    args = make_decode(3, 4, 2, 16, 4, 6, [21, 9, 1], head_major=True, keys_transposed=True)
    q = args[0] * 40  # scores spread over hundreds
    want = decode_loop(q, *args[1:])
    got = run_rows(q, *args[1:])[1] if in_place else paged_decode_attn_torch(q, *args[1:])
    assert_decode_close(got, want, atol=1e-5, rtol=1e-5)


def test_out_is_written_in_place_through_its_strides():
    """`out=` a slice of a step's (T, Hq, D) output: the decode rows land there, the rest
    stays as it was, and no lse is made without being asked for."""
    q, k_cache, v_cache, tables, lens = make_decode(
        3, 4, 2, 8, 4, 3, [10, 7, 5], head_major=True, keys_transposed=True
    )
    want, _ = paged_decode_attn_torch(q, k_cache, v_cache, tables, lens)
    step_out = torch.full((5, 4, 8), 7.0)  # 3 decode rows, then 2 prefill rows
    rows = decode_rows(tables, lens, 2, 2, k_cache.shape[0], 4, 8)
    got, lse = paged_decode_attn_rows(q, key_pages(k_cache), value_pages(v_cache), rows,
                                      8**-0.5, with_lse=False, out=step_out[:3])  # fmt: skip
    assert lse is None and got.data_ptr() == step_out.data_ptr()
    torch.testing.assert_close(step_out[:3], want, atol=1e-5, rtol=1e-5)
    assert torch.equal(step_out[3:], torch.full((2, 4, 8), 7.0))


def _spy_unshifted(monkeypatch) -> list:
    """Record whether each call took the softmax without per-sequence maxima."""
    from titanserve.kernels import paged_decode_rows

    taken, real = [], paged_decode_rows._probs_unshifted

    def spy(*args):
        result = real(*args)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(paged_decode_rows, "_probs_unshifted", spy)
    return taken


@pytest.mark.parametrize("scale_q,unshifted", [(1.0, True), (40.0, False)])
def test_softmax_path_by_score_range(monkeypatch, scale_q, unshifted):
    """Ordinary scores skip the per-sequence maxima; a sum past UNSHIFTED_MAX_DENOM (a score
    past e^30) takes the exact path. Both give the reference attention and lse."""
    taken = _spy_unshifted(monkeypatch)
    args = make_decode(5, 8, 2, 16, 4, 6, [21, 9, 1, 16, 3], head_major=True,
                       keys_transposed=True)
    q = args[0] * scale_q
    got = run_rows(q, *args[1:])[1]
    assert taken == [unshifted]
    assert_decode_close(got, decode_loop(q, *args[1:]), atol=1e-5, rtol=1e-5)


def test_a_sequence_with_only_very_negative_scores_is_not_flattened(monkeypatch):
    """Sequence 0's scores all lie near -200 (below exp's range) while the batch max is small:
    flooring them at e^-87 without its own max would make its attention uniform. The
    denominator check sends the step down the exact path."""
    taken = _spy_unshifted(monkeypatch)
    q, k_cache, v_cache, tables, lens = make_decode(
        3, 4, 2, 8, 4, 3, [10, 7, 5], head_major=True, keys_transposed=True
    )
    pages = tables[0, :3].long()
    direction = torch.randn(2, 8)  # (Hk, D)
    k_cache[pages] = direction + 0.05 * torch.randn(3, 4, 2, 8)  # sequence 0's keys alike
    q[0] = -60 * direction.repeat_interleave(2, dim=0)  # (Hq, D): scores ~ -60 |d|^2 / sqrt(8)
    rows, got = run_rows(q, k_cache, v_cache, tables, lens)
    assert taken == [False]
    want = decode_loop(q, k_cache, v_cache, tables, lens)
    assert want[1][0].max() < -60  # the premise: its lse is far below exp's range
    # scores near -127 carry fp32 rounding of ~1e-5 each; flattened, the output is 0.6 off
    assert_decode_close(got, want, atol=1e-4, rtol=1e-4)
    assert got[0][0].std(dim=-1).min() > 0  # not zeros


def test_an_index_past_the_budget_falls_back_to_gathering(tmp_path, monkeypatch):
    """Past MAX_INDEX_ENTRIES decode_rows declines and the model gathers pages instead (the same
    keys, page-transposed): greedy tokens and step logits do not change."""
    from titanserve import LLM, SamplingParams
    from titanserve.kernels import paged_decode_rows
    from titanserve.launcher.tiny_models import make_tiny

    args = make_decode(2, 4, 2, 8, 4, 3, [5, 9], head_major=True, keys_transposed=True)
    assert decode_rows(args[3], args[4], 2, 2, args[1].shape[0], 4, 8) is not None
    path = make_tiny("llama", tmp_path, num_hidden_layers=2)
    prompts = [[5, 9, 33, 70, 101, 7, 250], [17, 18, 19]]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, return_logits=True)
    with LLM(path, progress=False, block_size=4) as llm:
        in_place = llm.generate(prompts, params)
        monkeypatch.setattr(paged_decode_rows, "MAX_INDEX_ENTRIES", 0)
        assert decode_rows(args[3], args[4], 2, 2, args[1].shape[0], 4, 8) is None
        gathered = llm.generate(prompts, params)
    for a, b in zip(in_place, gathered):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)


def test_keys_far_below_the_rest_weigh_nothing_on_the_unshifted_path(monkeypatch):
    """A few keys scoring ~-1e4 (2^s underflows to 0, not floored first) among ordinary
    ones: still the unshifted softmax, and the reference attention and lse."""
    q, k_cache, v_cache, tables, lens = make_decode(
        3, 4, 2, 8, 4, 5, [17, 6, 11], head_major=True, keys_transposed=True
    )
    q = q.abs() + 0.1  # every query positive: a key of -100s scores about -1e3 against it
    for seq in range(3):  # the first slot of each sequence's first page
        k_cache[tables[seq, 0].long(), 0] = -300.0
    taken = _spy_unshifted(monkeypatch)
    _, got = run_rows(q, k_cache, v_cache, tables, lens)
    assert taken == [True]
    assert_decode_close(got, decode_loop(q, k_cache, v_cache, tables, lens), atol=1e-5, rtol=1e-5)
