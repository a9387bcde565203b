"""The UWM statistics of SPEC §2 as pure tensor functions.

Per item we only ever hold vectors (n, σ over the input features; a over the outputs). The score
of a layer is a sum of outer products, `S = Σ_b left_bᵀ right_b`, accumulated in float64, so no
(out, in) tensor per item is ever built.
"""

from __future__ import annotations

import torch

SCORE_VARIANTS = ("ratio", "unsafe", "difference")


def token_statistics(x: torch.Tensor, mask: torch.Tensor | None, token_norm: str = "l2"):
    """Per-item, per-feature norm and unbiased std over the item's valid tokens.

    x: (B, T, in) layer inputs; mask: (B, T), 1 for valid tokens, or None (all valid).
    Returns n (B, in), sigma (B, in), in float64 when x is float64 and float32 otherwise.
    """
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if mask is None:
        tokens = torch.full((x.shape[0], 1), x.shape[1], dtype=x.dtype, device=x.device)
        var, mean = torch.var_mean(x, dim=1, correction=1)      # one fused pass; (B, in) each
        if x.shape[1] == 1:
            var = torch.zeros_like(var)
        # Σx² = (T-1)·var + T·mean²: a sum of non-negative terms, so no cancellation.
        norm = ((tokens - 1) * var + tokens * mean.square()).sqrt()
    else:
        mask = mask.to(x.dtype).unsqueeze(-1)                  # (B, T, 1)
        tokens = mask.sum(1)                                   # (B, 1)
        masked = x * mask
        norm = masked.square().sum(1).sqrt()                   # (B, in)
        mean = masked.sum(1) / tokens                          # (B, in)
        # Two passes, not E[x²]-E[x]², because activations often have |mean| >> std.
        var = ((x - mean.unsqueeze(1)) * mask).square().sum(1) / (tokens - 1).clamp(min=1)
    if token_norm == "rms":
        norm = norm / tokens.sqrt()
    return norm, var.sqrt()


def output_saliency(norm: torch.Tensor, abs_weight: torch.Tensor) -> torch.Tensor:
    """a_i = mean_j n_j |W_ij|.  norm: (B, in), abs_weight: (out, in) -> (B, out)."""
    return norm @ abs_weight.T / abs_weight.shape[1]


def pair_factors(score: str, safe, unsafe, abs_weight: torch.Tensor, eps: float):
    """The (sign, left (B, out), right (B, in)) terms whose outer products sum to this batch's S.

    safe, unsafe: (n, sigma) pairs from `token_statistics`, row b of each being pair b.
    """
    (n_s, sd_s), (n_u, sd_u) = safe, unsafe
    a_s, a_u = output_saliency(n_s, abs_weight), output_saliency(n_u, abs_weight)
    if score == "ratio":
        # ρ_ij = (aᵘ_i / aˢ_i) · (nᵘ_j/(σᵘ_j+ε)) · ((σˢ_j+ε)/nˢ_j): the m_j of φ cancel.
        r = a_u / a_s.clamp(min=eps)
        q = (n_u / (sd_u + eps)) * ((sd_s + eps) / n_s.clamp(min=eps))
        return [(1.0, r, q)]
    col_mean = abs_weight.mean(0)                              # m_j: (in,)
    unsafe_term = (1.0, a_u, n_u * col_mean / (sd_u + eps))    # φᵘ = aᵘ_i · cᵘ_j/(σᵘ_j+ε)
    if score == "unsafe":
        return [unsafe_term]
    if score == "difference":
        return [unsafe_term, (-1.0, a_s, n_s * col_mean / (sd_s + eps))]
    raise ValueError(f"Unknown score variant {score!r}; expected one of {SCORE_VARIANTS}.")


def finalize_scores(sums: torch.Tensor, n_pairs: int, score: str, weight: torch.Tensor, prior: bool):
    """S = sums / N, clamped at 0 for 'difference', times |W| when the magnitude prior is on."""
    scores = sums / n_pairs
    if score == "difference":
        scores = scores.clamp(min=0)
    if prior:
        scores = scores * weight.detach().abs().to(scores)
    return scores
