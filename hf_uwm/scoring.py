"""The UWM statistics (per-item saliencies and their safe/unsafe ratios) as pure tensor functions.

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
    valid = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if mask is None else mask.to(x.dtype)
    valid = valid.unsqueeze(1)                                 # (B, 1, T)
    tokens = valid.sum(-1)                                     # (B, 1)
    # Token sums as batched matmuls: on CPU, torch.var_mean over dim 1 took 2-25x as long.
    # Two passes, not E[x²]-E[x]², because |mean| >> std is common.
    mean = torch.bmm(valid, x).squeeze(1) / tokens             # (B, in)
    centred = (x - mean.unsqueeze(1)).square_()                # (B, T, in)
    squares = torch.bmm(valid, centred).squeeze(1)             # Σ (x - mean)²: (B, in)
    var = squares / (tokens - 1).clamp(min=1)
    # Σx² = Σ(x - mean)² + T·mean²: non-negative terms, so no cancellation.
    norm = (squares + tokens * mean.square()).sqrt()
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


def finalize_scores_(sums: torch.Tensor, n_pairs: int, score: str, weight: torch.Tensor, prior: bool):
    """S = sums / N, clamped at 0 for 'difference', times |W| when the magnitude prior is on.

    In place: the running sums become the scores, so no second (out, in) float64 tensor is made.
    """
    scores = sums.div_(n_pairs)
    if score == "difference":
        scores.clamp_(min=0)
    if prior:
        scores.mul_(weight.detach()).abs_()                    # = S·|W|, as S ≥ 0
    return scores
