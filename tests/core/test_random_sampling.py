"""Random draws: the kept tokens and their probabilities equal a sort-based reference of the
filters, for draws within the first candidates, past them, and over the whole vocabulary."""

from __future__ import annotations

import pytest
import torch

from titanserve.core.random_sampling import CANDIDATES, sample_filtered
from titanserve.core.sampling_params import SamplingParams

GRID = 4000  # uniforms (i + 0.5) / GRID: token i is drawn GRID * p_i times, up to one


def reference_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """(V,) the distribution the filters define: temperature, then top-k, then top-p on the
    mass top-k leaves, then min-p, renormalized (a full sort, as the textbook has it)."""
    probs = (logits / p.temperature).double().softmax(dim=-1)
    order = probs.argsort(descending=True)
    sorted_probs = probs[order]
    if 0 < p.top_k < len(probs):
        sorted_probs[p.top_k :] = 0.0
    mass_before = sorted_probs.cumsum(0) - sorted_probs
    sorted_probs[mass_before >= p.top_p * sorted_probs.sum()] = 0.0
    sorted_probs[sorted_probs < p.min_p * sorted_probs[0]] = 0.0
    kept = torch.zeros_like(probs)
    kept[order] = sorted_probs
    return kept / kept.sum()


def drawn_frequencies(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """(N, V) how often each row drew each token over the uniform grid."""
    N, V = logits.shape
    uniforms = (torch.arange(GRID, dtype=torch.float64) + 0.5) / GRID
    rows = logits.repeat_interleave(GRID, dim=0)  # (N * GRID, V)
    tokens = sample_filtered(rows, [p for p in params for _ in range(GRID)], uniforms.repeat(N))
    return torch.stack(
        [torch.bincount(t, minlength=V).double() / GRID for t in tokens.view(N, GRID)]
    )


def slow_decay(V: int) -> torch.Tensor:
    """Logits of a nearly flat distribution: its top-p mass lies far down the ranking."""
    return -torch.arange(V, dtype=torch.float32) * 2e-4 + torch.rand(V) * 1e-5


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=0.7),
        dict(temperature=1.3, top_k=7),
        dict(temperature=0.9, top_p=0.8),
        dict(temperature=1.0, top_k=40, top_p=0.5),
        dict(temperature=4.0, top_k=5, top_p=0.5),  # top-p on the top-k mass, a small one
        dict(temperature=0.8, min_p=0.05),
        dict(temperature=1.0, top_p=0.9, min_p=0.2),
    ],
)
def test_draws_follow_the_filtered_distribution(params):
    torch.manual_seed(0)
    logits = torch.randn(3, 500) * 3
    sampling = SamplingParams(max_tokens=1, **params)
    freqs = drawn_frequencies(logits, [sampling] * 3)
    for row, freq in zip(logits, freqs):
        want = reference_probs(row, sampling)
        assert set(freq.nonzero().flatten().tolist()) <= set(want.nonzero().flatten().tolist())
        assert (freq - want).abs().max() <= 1.5 / GRID


def test_top_p_past_the_first_candidates_looks_further():
    """A flat distribution whose top-p set holds more tokens than the widest candidate set
    (and one that the first ranks already cover): the same draws as the reference."""
    V = CANDIDATES[-1] + 2000
    torch.manual_seed(1)
    logits = torch.stack([slow_decay(V), torch.randn(V) * 8])  # (2, V)
    sampling = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.95)
    want = [reference_probs(row, sampling) for row in logits]
    assert int((want[0] > 0).sum()) > CANDIDATES[-1]
    freqs = drawn_frequencies(logits, [sampling] * 2)
    for freq, w in zip(freqs, want):
        assert set(freq.nonzero().flatten().tolist()) <= set(w.nonzero().flatten().tolist())
        assert (freq - w).abs().max() <= 1.5 / GRID
    # the flat row's ranking is its id order: the draws' running share follows its own
    assert (freqs[0].cumsum(0) - want[0].cumsum(0)).abs().max() <= 1.5 / GRID
    assert int(freqs[0].nonzero().max()) > CANDIDATES[-1]  # it drew from past them


def test_rows_with_and_without_ranking_filters_mix_in_one_batch():
    torch.manual_seed(2)
    logits = torch.randn(4, 300) * 2
    params = [
        SamplingParams(max_tokens=1, temperature=1.0),
        SamplingParams(max_tokens=1, temperature=0.5, top_k=3),
        SamplingParams(max_tokens=1, temperature=2.0, min_p=0.1),
        SamplingParams(max_tokens=1, temperature=1.0, top_p=0.3),
    ]
    freqs = drawn_frequencies(logits, params)
    for row, freq, p in zip(logits, freqs, params):
        assert (freq - reference_probs(row, p)).abs().max() <= 1.5 / GRID


def test_extreme_uniforms_draw_kept_tokens_only():
    """The ends of the uniform's range take the first and the last kept token in the order the
    draw walks them (by rank under top-k or top-p, else by id), never a dropped one past the
    last (the running sum's rounding)."""
    logits = torch.tensor([[5.0, 4.0, -1.0, 3.0, 2.0, 9.0, -3.0]] * 2)
    params = [SamplingParams(max_tokens=1, temperature=1.0, top_k=3)] * 2
    last_below_one = torch.nextafter(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0))
    uniforms = torch.stack([torch.tensor(0.0, dtype=torch.float64), last_below_one])
    assert sample_filtered(logits.clone(), params, uniforms).tolist() == [5, 1]
    plain = [SamplingParams(max_tokens=1, temperature=1.0)] * 2
    assert sample_filtered(logits.clone(), plain, uniforms).tolist() == [0, 6]
