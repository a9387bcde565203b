"""Which weights of a layer to manipulate. Every function returns sorted flat indices."""

from __future__ import annotations

import hashlib
import math

import torch


def _checked(scores: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat float64 scores and their total, refusing negative, NaN and infinite scores."""
    flat = scores.detach().flatten().to(torch.float64)
    total = flat.sum()
    if not torch.isfinite(total) or not (flat >= 0).all():     # NaN >= 0 is False; an inf makes the total inf
        raise ValueError(f"Scores of layer {name!r} must be finite and non-negative to select weights.")
    return flat, total


def _ranked_from(flat: torch.Tensor, cut) -> torch.Tensor:
    """Flat indices of all entries ≥ cut, ranked by descending score, ties by the lower flat index."""
    candidates = (flat >= cut).nonzero().squeeze(1)           # in flat-index order
    return candidates[torch.sort(flat[candidates], descending=True, stable=True).indices]


def _ranked_top(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The ranked top entries: at least k, all ties at the cut included. A full sort of a
    768×3072 layer costs far more than this partial one when only a few percent are selected."""
    if k >= flat.numel():
        return torch.sort(flat, descending=True, stable=True).indices
    return _ranked_from(flat, torch.kthvalue(flat, flat.numel() - k + 1).values)


def _sample_indices(numel: int, size: int = 32768) -> torch.Tensor:
    if numel <= size:
        return torch.arange(numel)
    return torch.randint(numel, (size,), generator=torch.Generator().manual_seed(0))


def _mass_share(flat: torch.Tensor, order: torch.Tensor, total, tau: float) -> int:
    """How many of the ranked entries `order` the adaptive rule takes: those whose exclusive
    running share c_k of the total is still below τ."""
    share = flat[order] / total
    before = torch.cumsum(share, 0) - share                    # c_k
    return int((before < tau).sum())


def select_adaptive(scores: torch.Tensor, tau: float, name: str = "layer") -> torch.Tensor:
    """The smallest top set whose share of the layer's total score reaches τ (at least one weight)."""
    flat, total = _checked(scores, name)
    if total <= 0:
        raise ValueError(f"All scores of layer {name!r} are zero: there is nothing to select. "
                         "Use another score variant or drop this layer from the targets.")
    # A sample suggests where the mass reaches τ (with a few standard errors to spare); the ranked
    # entries above that cut hold the whole selection as soon as one of them is left out, because
    # c_k only grows down the ranking. Otherwise the cut goes twice as deep. (A strided sample
    # would be biased: scores are outer products, so strides that divide the row length repeat
    # the same columns.)
    sample = flat[_sample_indices(flat.numel()).to(flat.device)].sort(descending=True).values
    depth = int(torch.searchsorted(torch.cumsum(sample, 0), tau * sample.sum())) + 1
    depth += 4 * math.isqrt(depth) + 4
    while depth < len(sample):
        order = _ranked_from(flat, sample[depth])
        count = _mass_share(flat, order, total, tau)
        if count < len(order):
            return order[:count].sort().values
        depth *= 2
    # The top ⌈τ·n⌉ entries hold at least τ of the mass (their average is at least the mean), so
    # the selected set lies inside them; one more covers rounding at the boundary.
    order = _ranked_top(flat, math.ceil(tau * flat.numel()) + 1)
    return order[:_mass_share(flat, order, total, tau)].sort().values


def select_fixed(scores: torch.Tensor, density: float, name: str = "layer") -> torch.Tensor:
    """The top ⌈density · out · in⌉ weights."""
    count = math.ceil(density * scores.numel())
    return _ranked_top(_checked(scores, name)[0], count)[:count].sort().values


def select_top(scores: torch.Tensor, count: int, name: str = "layer") -> torch.Tensor:
    """The `count` highest entries of signed scores (−inf marks an entry never to take), ties by the
    lower flat index."""
    flat = scores.detach().flatten()
    if torch.isnan(flat).any() or torch.isposinf(flat).any():
        raise ValueError(f"Scores of {name!r} must not be NaN or +inf to select weights.")
    if count > int((flat > -math.inf).sum()):
        raise ValueError(f"{name!r} has fewer than {count} weights left to select.")
    return _ranked_top(flat, count)[:count].sort().values


def select_shared(scores: dict[str, torch.Tensor], select) -> dict[str, torch.Tensor]:
    """One selection over all layers together: `select(flat scores, name)` ranks the layers' scores
    concatenated in dict order, and its indices are split back into flat indices per layer."""
    joint = select(torch.cat([s.detach().flatten() for s in scores.values()]), "all target layers")
    delta, start = {}, 0
    for name, s in scores.items():
        stop = start + s.numel()
        delta[name] = joint[(joint >= start) & (joint < stop)] - start
        start = stop
    return delta


def keyed_generator(key: str) -> torch.Generator:
    """A generator seeded by a hash of `key`: the same draws for the same key on every process and run."""
    digest = hashlib.sha256(key.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def layer_generator(seed: int, layer_index: int) -> torch.Generator:
    """A generator per layer, so adding a layer changes no other layer's random draw."""
    return torch.Generator().manual_seed(seed * 100_003 + layer_index)


def select_random(numel: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` distinct flat indices drawn uniformly: the random control of a selection."""
    return torch.randperm(numel, generator=generator)[:count].sort().values
