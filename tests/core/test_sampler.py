"""Sampler: greedy, temperature, top-k/top-p/min-p sets, penalties, seeds, logprobs."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from titanserve.core.penalties import apply_penalties
from titanserve.core.sampler import Sampler, SamplingState
from titanserve.core.sampling_params import SamplingParams

# A hand-made distribution over 6 tokens, in shuffled order.
# By probability: 1 (.40), 3 (.25), 5 (.15), 0 (.10), 4 (.06), 2 (.04).
PROBS = [0.10, 0.40, 0.04, 0.25, 0.06, 0.15]
LOGITS = torch.tensor(PROBS).log()  # (V,)


def make_state(history: list[int] = (), num_prompt_tokens: int = 0, **params) -> SamplingState:
    return SamplingState(SamplingParams(**params), num_prompt_tokens, list(history))


def sample_seeds(num_seeds: int, logits: torch.Tensor = LOGITS, **params) -> Counter:
    """Tokens drawn for one logits row under seeds 0..num_seeds-1 (one batch of rows)."""
    states = [make_state(seed=seed, **params) for seed in range(num_seeds)]
    out = Sampler()(logits.expand(num_seeds, -1).clone(), states, [0] * num_seeds)
    return Counter(out.token_ids)


def test_greedy_takes_the_argmax_of_every_row():
    logits = torch.tensor([[0.1, 0.7, 0.2], [3.0, -1.0, 2.9], [-5.0, -4.0, -4.5]])
    states = [make_state(temperature=0.0, seed=s) for s in range(3)]
    assert Sampler()(logits, states, [0, 0, 0]).token_ids == [1, 0, 1]


def test_plain_greedy_rows_take_the_argmax_where_the_logits_are():
    """All rows greedy without penalties or logprobs: the argmax on the logits' own device,
    with nothing else computed; the same tokens as the full path (which logprobs take)."""
    logits = torch.randn(9, 50, generator=torch.Generator().manual_seed(1))
    logits[4, 7] = logits[4, 30] = logits[4].max() + 1  # a tie goes to the first
    plain = Sampler()(logits, [make_state(temperature=0.0) for _ in range(9)], [0] * 9)
    full = Sampler()(logits, [make_state(temperature=0.0, logprobs=0) for _ in range(9)], [0] * 9)
    assert plain.token_ids == full.token_ids == logits.argmax(dim=-1).tolist()
    assert plain.token_ids[4] == 7
    assert plain.logprobs == [None] * 9 and None not in full.logprobs


def test_temperature_samples_follow_the_scaled_softmax():
    temperature, num_seeds = 0.7, 4000
    counts = sample_seeds(num_seeds, temperature=temperature)
    expected = (LOGITS / temperature).softmax(dim=-1)
    for token in range(len(PROBS)):
        assert abs(counts[token] / num_seeds - expected[token].item()) < 0.03, token


@pytest.mark.parametrize(
    ("params", "kept"),
    [
        (dict(top_k=1), {1}),
        (dict(top_k=2), {1, 3}),
        (dict(top_k=3), {1, 3, 5}),
        (dict(top_k=-1), {0, 1, 2, 3, 4, 5}),
        (dict(top_k=6), {0, 1, 2, 3, 4, 5}),
        (dict(top_p=0.3), {1}),
        (dict(top_p=0.5), {1, 3}),
        (dict(top_p=0.75), {1, 3, 5}),
        (dict(top_p=0.85), {0, 1, 3, 5}),
        (dict(top_p=0.92), {0, 1, 3, 4, 5}),
        (dict(min_p=0.5), {1, 3}),  # keeps p >= 0.20
        (dict(min_p=0.3), {1, 3, 5}),  # keeps p >= 0.12
        (dict(min_p=0.2), {0, 1, 3, 5}),  # keeps p >= 0.08
        # temperature comes first: at T=0.5 the top two hold 0.855 of the mass
        (dict(top_p=0.75, temperature=0.5), {1, 3}),
        # top-p measures the mass left by top-k (1: .615, 3: .385), as vLLM and HF do
        (dict(top_k=2, top_p=0.55), {1}),
        (dict(top_k=4, min_p=0.3), {1, 3, 5}),
    ],
)
def test_filters_keep_exactly_the_expected_tokens(params, kept):
    """Every kept token has probability >= 0.04 here: 400 draws miss one with p < 1e-7."""
    assert set(sample_seeds(400, **params)) == kept


# Row [2, -1, 0.5, 3, 1, 0]; prompt [0, 1]; output so far [3, 3, 2].
PENALTY_LOGITS = [2.0, -1.0, 0.5, 3.0, 1.0, 0.0]
HISTORY = [0, 1, 3, 3, 2]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        # divides positive / multiplies negative logits of prompt and output tokens
        (dict(repetition_penalty=2.0), [1.0, -2.0, 0.25, 1.5, 1.0, 0.0]),
        # output tokens only
        (dict(presence_penalty=0.5), [2.0, -1.0, 0.0, 2.5, 1.0, 0.0]),
        (dict(frequency_penalty=0.25), [2.0, -1.0, 0.25, 2.5, 1.0, 0.0]),
        (dict(presence_penalty=-1.0), [2.0, -1.0, 1.5, 4.0, 1.0, 0.0]),
        (
            dict(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
            [1.0, -2.0, -0.5, 0.5, 1.0, 0.0],
        ),
    ],
)
def test_penalties_exact_values(params, expected):
    logits = torch.tensor([PENALTY_LOGITS, PENALTY_LOGITS])
    states = [make_state(HISTORY, num_prompt_tokens=2, **params), make_state(HISTORY, 2)]
    undo = apply_penalties(logits, [0], [states[0].params], [states[0].tally])
    assert logits[0].tolist() == expected
    assert logits[1].tolist() == PENALTY_LOGITS  # a row without penalties is untouched
    undo()
    assert logits.tolist() == [PENALTY_LOGITS, PENALTY_LOGITS]  # the raw values are back


def test_sampling_leaves_the_raw_logits_and_takes_logprobs_from_them():
    logits = torch.tensor([[2.0, 1.5, 0.0], [0.0, 1.0, 2.0]])
    states = [
        make_state([0], num_prompt_tokens=1, temperature=0.0, repetition_penalty=4.0, logprobs=0),
        make_state([2, 2], num_prompt_tokens=1, temperature=1.0, top_k=1, presence_penalty=2.0),
    ]
    out = Sampler()(logits, states, [0, 1])
    assert out.token_ids[0] == 1  # 2.0 / 4 < 1.5
    assert out.token_ids[1] == 1  # 2.0 - 2.0 < 1.0
    assert logits.tolist() == [[2.0, 1.5, 0.0], [0.0, 1.0, 2.0]]
    assert out.logprobs[0] == pytest.approx(logits[0].log_softmax(-1)[1].item())


def test_penalty_changes_the_greedy_choice():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    no_penalty = make_state([2, 0], num_prompt_tokens=1, temperature=0.0)
    penalised = make_state([2, 0], num_prompt_tokens=1, temperature=0.0, presence_penalty=0.2)
    assert Sampler()(logits, [no_penalty], [1]).token_ids == [0]
    assert Sampler()(logits, [penalised], [1]).token_ids == [1]


def test_seeded_samples_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 50, generator=g)  # (1, V)
    target = make_state(temperature=0.8, top_p=0.95, seed=42)
    alone = [Sampler(seed=0)(logits, [target], [i]).token_ids[0] for i in range(20)]

    others = torch.randn(5, 50, generator=g)
    batch_logits = torch.cat([others[:3], logits, others[3:]])  # (6, V)
    states = [
        make_state(temperature=1.0),  # unseeded: consumes the sampler's own generator
        make_state(temperature=0.0),
        make_state(temperature=0.5, seed=7, top_k=5),
        target,
        make_state([1, 2, 3], num_prompt_tokens=1, repetition_penalty=1.5),
        make_state(temperature=1.2, min_p=0.1),
    ]
    sampler = Sampler(seed=123)
    in_batch = [
        sampler(batch_logits, states, [5, 0, 3, i, 1, 2]).token_ids[3] for i in range(20)
    ]
    assert in_batch == alone
    assert len(set(alone)) > 3  # draws vary with the output index
    other_seed = make_state(temperature=0.8, top_p=0.95, seed=43)
    assert [Sampler()(logits, [other_seed], [i]).token_ids[0] for i in range(20)] != alone


def test_logprobs_are_the_raw_log_softmax_with_exact_top_n():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 40, generator=g)  # (N, V)
    states = [
        make_state(temperature=0.0, logprobs=3),
        make_state([5, 5], num_prompt_tokens=1, seed=3, logprobs=0, repetition_penalty=1.5),
        make_state(temperature=0.0),
    ]
    out = Sampler()(logits, states, [0, 1, 0])
    expected = torch.log_softmax(logits, dim=-1)  # (N, V)
    values, ids = expected[0].topk(3)
    assert out.token_ids[0] == ids[0].item()
    assert [token for token, _ in out.top_logprobs[0]] == ids.tolist()
    assert [v for _, v in out.top_logprobs[0]] == pytest.approx(values.tolist(), abs=1e-6)
    assert out.logprobs[0] == pytest.approx(values[0].item(), abs=1e-6)
    # penalties shape the choice, not the reported logprob (vLLM's raw logprobs)
    assert out.logprobs[1] == pytest.approx(expected[1, out.token_ids[1]].item(), abs=1e-6)
    assert out.top_logprobs[1] == []
    assert (out.logprobs[2], out.top_logprobs[2]) == (None, [])


def _penalties_from_history(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Penalties straight from each history: the definition the tallies must reproduce."""
    logits = logits.clone()
    for row, state in zip(logits, states):
        p, history = state.params, state.history
        if p.repetition_penalty != 1.0 and history:
            seen = torch.tensor(sorted(set(history)))
            vals = row[seen]
            row[seen] = torch.where(
                vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
            )
        outputs = history[state.num_prompt_tokens :]
        if outputs:
            counts = torch.bincount(torch.tensor(outputs), minlength=row.shape[0]).float()
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits


def test_penalties_from_tallies_equal_penalties_from_histories():
    """Random prompts and outputs (tokens repeated, shared between prompt and outputs, tallies
    grown past their first capacity), outputs dropped by redone steps and sampled again:
    the tallies kept up to date give exactly the penalties the histories define."""
    import random

    rng = random.Random(0)
    vocab = 300
    states = []
    for i in range(12):
        params = dict(
            repetition_penalty=rng.choice([1.0, 1.3, 0.8]),
            presence_penalty=rng.choice([0.0, 0.5, -0.25]),
            frequency_penalty=rng.choice([0.0, 0.2]),
        )
        if i == 0:
            params = dict(repetition_penalty=1.5)  # surely penalised
        prompt = [rng.randrange(vocab // (1 + i % 3)) for _ in range(rng.randint(1, 40))]
        outputs = [rng.randrange(vocab) for _ in range(rng.randint(0, 20))]
        states.append(make_state(prompt + outputs, num_prompt_tokens=len(prompt), **params))
    states.append(make_state([1, 2], num_prompt_tokens=2))  # no penalties: untouched
    logits = torch.randn(len(states), vocab, generator=torch.Generator().manual_seed(0)) * 3
    for _ in range(60):
        for state in states:
            if rng.random() < 0.2 and len(state.history) > state.num_prompt_tokens:
                state.truncate(rng.randint(state.num_prompt_tokens, len(state.history)))
            for _ in range(rng.randint(0, 3)):
                state.record(rng.randrange(vocab) if rng.random() < 0.7 else state.history[-1])
        rows = [i for i, s in enumerate(states) if s.tally is not None]
        got = logits.clone()
        params, tallies = [states[i].params for i in rows], [states[i].tally for i in rows]
        apply_penalties(got, rows, params, tallies)
        assert torch.equal(got, _penalties_from_history(logits, states))
    assert max(len(s.history) - s.num_prompt_tokens for s in states) > 32  # tallies grew
    assert not torch.equal(got, logits)
    assert states[-1].tally is None and states[-1].history == [1, 2]  # nothing kept for it
