"""Which weights of a layer to manipulate (SPEC §3). Every function returns sorted flat indices."""

from __future__ import annotations

import math

import torch


def _ranked(scores: torch.Tensor, name: str) -> torch.Tensor:
    """Flat indices by descending score, ties broken by the lower flat index."""
    flat = scores.detach().flatten().to(torch.float64)
    if not torch.isfinite(flat).all() or (flat < 0).any():
        raise ValueError(f"Scores of layer {name!r} must be finite and non-negative to select weights.")
    return torch.sort(flat, descending=True, stable=True).indices


def select_adaptive(scores: torch.Tensor, tau: float, name: str = "layer") -> torch.Tensor:
    """The smallest top set whose share of the layer's total score reaches τ (at least one weight)."""
    flat = scores.detach().flatten().to(torch.float64)
    order = _ranked(scores, name)
    total = flat.sum()
    if total <= 0:
        raise ValueError(f"All scores of layer {name!r} are zero: there is nothing to select. "
                         "Use another score variant or drop this layer from the targets.")
    share = flat[order] / total
    before = torch.cumsum(share, 0) - share                  # exclusive running sum c_k
    count = int((before < tau).sum())
    return order[:count].sort().values


def select_fixed(scores: torch.Tensor, density: float, name: str = "layer") -> torch.Tensor:
    """The top ⌈density · out · in⌉ weights."""
    count = math.ceil(density * scores.numel())
    return _ranked(scores, name)[:count].sort().values


def select_random(numel: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` distinct flat indices drawn uniformly: the random control of a selection."""
    return torch.randperm(numel, generator=generator)[:count].sort().values
