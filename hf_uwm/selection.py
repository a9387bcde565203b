"""Which weights of a layer to manipulate (SPEC §3). Every function returns sorted flat indices."""

from __future__ import annotations

import math

import torch


def _checked(scores: torch.Tensor, name: str) -> torch.Tensor:
    flat = scores.detach().flatten().to(torch.float64)
    if not torch.isfinite(flat).all() or (flat < 0).any():
        raise ValueError(f"Scores of layer {name!r} must be finite and non-negative to select weights.")
    return flat


def _ranked_top(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the top entries (at least k, all ties at the cut included), ranked by
    descending score with ties broken by the lower flat index. A full sort of a 768×3072 layer
    costs far more than this partial one when only a few percent are selected."""
    if k >= flat.numel():
        return torch.sort(flat, descending=True, stable=True).indices
    cut = torch.topk(flat, k, sorted=False).values.min()
    candidates = (flat >= cut).nonzero().squeeze(1)           # in flat-index order
    return candidates[torch.sort(flat[candidates], descending=True, stable=True).indices]


def select_adaptive(scores: torch.Tensor, tau: float, name: str = "layer") -> torch.Tensor:
    """The smallest top set whose share of the layer's total score reaches τ (at least one weight)."""
    flat = _checked(scores, name)
    total = flat.sum()
    if total <= 0:
        raise ValueError(f"All scores of layer {name!r} are zero: there is nothing to select. "
                         "Use another score variant or drop this layer from the targets.")
    # The top ⌈τ·n⌉ entries hold at least τ of the mass (their average is at least the mean), so
    # the selected set lies inside them; one more covers rounding at the boundary.
    order = _ranked_top(flat, math.ceil(tau * flat.numel()) + 1)
    share = flat[order] / total
    before = torch.cumsum(share, 0) - share                    # exclusive running sum c_k
    count = int((before < tau).sum())
    return order[:count].sort().values


def select_fixed(scores: torch.Tensor, density: float, name: str = "layer") -> torch.Tensor:
    """The top ⌈density · out · in⌉ weights."""
    count = math.ceil(density * scores.numel())
    return _ranked_top(_checked(scores, name), count)[:count].sort().values


def layer_generator(seed: int, layer_index: int) -> torch.Generator:
    """A generator per layer, so adding a layer changes no other layer's random draw."""
    return torch.Generator().manual_seed(seed * 100_003 + layer_index)


def select_random(numel: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` distinct flat indices drawn uniformly: the random control of a selection."""
    return torch.randperm(numel, generator=generator)[:count].sort().values
