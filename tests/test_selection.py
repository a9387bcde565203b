"""Selection against naive sort-based implementations (SPEC §3), ties included."""

import math

import pytest
import torch

from hf_uwm.selection import _sample_indices, select_adaptive, select_fixed, select_random, select_shared, select_top


def naive_adaptive(scores, tau):
    flat = scores.flatten().tolist()
    order = sorted(range(len(flat)), key=lambda k: (-flat[k], k))
    total, running, chosen = sum(flat), 0.0, []
    for k in order:
        if running < tau:          # c_k is the mass of the entries ranked before k
            chosen.append(k)
        running += flat[k] / total
    return sorted(chosen)


def naive_fixed(scores, density):
    flat = scores.flatten().tolist()
    order = sorted(range(len(flat)), key=lambda k: (-flat[k], k))
    return sorted(order[: math.ceil(density * len(flat))])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("tau", [0.001, 0.02, 0.3, 0.9])
def test_adaptive_matches_naive(seed, tau):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(7, 9, generator=g, dtype=torch.float64) ** 4
    assert select_adaptive(scores, tau).tolist() == naive_adaptive(scores, tau)


@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_adaptive_matches_naive_beyond_the_first_candidate_set(tau):
    # 40,000 entries with many ties: the partial ranking has to widen its candidate set.
    scores = torch.randint(0, 50, (200, 200), generator=torch.Generator().manual_seed(2)).double()
    assert select_adaptive(scores, tau).tolist() == naive_adaptive(scores, tau)
    assert select_fixed(scores, tau).tolist() == naive_fixed(scores, tau)


@pytest.mark.parametrize("hidden_from_sample", [True, False])
@pytest.mark.parametrize("tau", [0.02, 0.8])
def test_adaptive_matches_naive_when_the_sample_misleads(hidden_from_sample, tau):
    # 120,000 entries: the cut is guessed from a sample. Spikes the sample misses make the guess
    # too low; spikes only the sample sees make it too high, and the candidate set must widen.
    scores = torch.rand(300, 400, generator=torch.Generator().manual_seed(3), dtype=torch.float64) ** 3
    in_sample = torch.zeros(scores.numel(), dtype=torch.bool)
    in_sample[_sample_indices(scores.numel())] = True
    spikes = (~in_sample if hidden_from_sample else in_sample).nonzero().squeeze(1)[::500][:60]
    scores.view(-1)[spikes] = 1e3
    assert select_adaptive(scores, tau).tolist() == naive_adaptive(scores, tau)


@pytest.mark.parametrize("density", [0.01, 0.1, 0.5, 1.0])
def test_fixed_matches_naive(density):
    scores = torch.rand(6, 11, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert select_fixed(scores, density).tolist() == naive_fixed(scores, density)


def test_ties_take_the_lower_flat_index_first():
    scores = torch.tensor([[1.0, 3.0, 3.0], [3.0, 0.5, 3.0]], dtype=torch.float64)
    # Each 3 is 3/13.5 = 0.222 of the mass: with τ = 0.3 the first two 3s (indices 1, 2) are taken.
    assert select_adaptive(scores, 0.3).tolist() == [1, 2] == naive_adaptive(scores, 0.3)
    assert select_fixed(scores, 0.5).tolist() == [1, 2, 3] == naive_fixed(scores, 0.5)
    flat = torch.ones(4, 4, dtype=torch.float64)
    assert select_adaptive(flat, 0.2).tolist() == [0, 1, 2, 3] == naive_adaptive(flat, 0.2)


@pytest.mark.parametrize("tau", [0.0123, 0.0251, 0.3007])
def test_uniform_scores_select_the_first_ceil_tau_n(tau):
    # τ·n is not an integer here: at an exact c_k == τ the answer is decided by float rounding.
    scores = torch.full((30, 70), 0.37, dtype=torch.float64)
    selected = select_adaptive(scores, tau).tolist()
    assert selected == naive_adaptive(scores, tau) == list(range(math.ceil(tau * 2100)))


@pytest.mark.parametrize("shape,tau,count", [((2, 2), 0.25, 1), ((4, 4), 0.5, 8)])
def test_an_entry_whose_c_k_equals_tau_is_not_selected(shape, tau, count):
    # Equal scores: c_k = k / n exactly in floating point, so entry k = τ·n has c_k == τ and stays out.
    scores = torch.ones(shape, dtype=torch.float64)
    assert select_adaptive(scores, tau).tolist() == naive_adaptive(scores, tau) == list(range(count))


def test_at_least_one_weight_is_selected():
    scores = torch.tensor([[0.9, 0.1]], dtype=torch.float64)
    assert select_adaptive(scores, 0.001).tolist() == [0]


def test_bad_scores_are_refused():
    with pytest.raises(ValueError, match="zero"):
        select_adaptive(torch.zeros(3, 3), 0.1, "layer.x")
    with pytest.raises(ValueError, match="finite"):
        select_adaptive(torch.tensor([[1.0, float("nan")]]), 0.1)
    with pytest.raises(ValueError, match="non-negative"):
        select_fixed(torch.tensor([[1.0, -1.0]]), 0.5)


def test_random_selection_is_seeded_sorted_and_distinct():
    a = select_random(100, 10, torch.Generator().manual_seed(0))
    b = select_random(100, 10, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.numel() == 10 and torch.all(a[1:] > a[:-1])
    # Half of a layer: drawn with replacement, some index would surely repeat.
    half = select_random(1000, 500, torch.Generator().manual_seed(1))
    assert half.numel() == 500 and torch.all(half[1:] > half[:-1]) and 0 <= half[0] and half[-1] < 1000
    assert torch.equal(select_random(50, 50, torch.Generator().manual_seed(2)), torch.arange(50))


def test_shared_selection_ranks_all_layers_together():
    torch.manual_seed(0)
    scores = {"a": torch.rand(3, 4), "b": 10 * torch.rand(2, 5), "c": torch.rand(1, 3)}
    joint = torch.cat([s.flatten() for s in scores.values()])
    for select in (lambda s, name: select_fixed(s, 0.2, name), lambda s, name: select_adaptive(s, 0.3, name)):
        shared = select_shared(scores, select)
        expected, start = select(joint, "all"), 0
        for name, s in scores.items():
            mine = expected[(expected >= start) & (expected < start + s.numel())] - start
            assert torch.equal(shared[name], mine)
            start += s.numel()
        assert sum(map(len, shared.values())) == len(expected)
    assert len(select_shared(scores, lambda s, name: select_fixed(s, 0.2, name))["b"]) == 5   # the large layer wins


def test_top_selection_takes_signed_scores_and_skips_minus_infinity():
    scores = torch.tensor([-1.0, -float("inf"), 0.5, -0.2, 0.5])
    assert select_top(scores, 3).tolist() == [2, 3, 4]
    assert select_top(scores, 4).tolist() == [0, 2, 3, 4]
    with pytest.raises(ValueError, match="fewer than 5"):
        select_top(scores, 5)
    with pytest.raises(ValueError, match="NaN"):
        select_top(torch.tensor([0.0, float("nan")]), 1)
