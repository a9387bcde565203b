"""The paper's training-free gradient baselines, G-Unsafe and G-Safe-CLIP, as pure losses.

Each loss takes one batch of B calibration pairs as L2-normalised (B, D) embeddings — safe and
unsafe text T(ts), T(tu), safe and unsafe image I(is), I(iu) — and returns the **sum** over the
batch of the per-pair loss. The editor divides by the number of pairs N and sums over batches, so
the gradients are those of the 1/N mean over the calibration set; the scores are |∂L/∂W|, selected
per layer like any other score (`UWMConfig.baseline`: fixed sparsity, α = 0, i.e. pruning).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def gradient_magnitude(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The baselines' score of each weight: |∂L/∂W| (the weight itself plays no part)."""
    return grad.abs()


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, D), (B, D) -> (B,): the rows are normalised, so the dot product is the cosine."""
    return (a * b).sum(-1)


def g_unsafe_loss(text_safe, text_unsafe, image_safe, image_unsafe) -> torch.Tensor:
    """Σ_b of L_text + L_vision (G-Unsafe), sg = detach:

        L_text   = −cos(T(ts), sg T(tu)) + cos(T(ts), sg I(is))
        L_vision = −cos(I(is), sg I(iu)) + cos(I(is), sg T(ts))

    Each pulls a safe item towards the frozen unsafe embedding of its own modality and away from
    the frozen safe embedding of the other. Every term that crosses towers is detached, so on a
    text weight the gradient of the sum is ∂L_text/∂W and on a vision weight ∂L_vision/∂W: one
    backward gives each tower the gradient of its own loss only.
    """
    text = -_cos(text_safe, text_unsafe.detach()) + _cos(text_safe, image_safe.detach())        # (B,)
    vision = -_cos(image_safe, image_unsafe.detach()) + _cos(image_safe, text_safe.detach())    # (B,)
    return (text + vision).sum()


def info_nce(queries: torch.Tensor, keys: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Σ_b cross-entropy of query b against the batch's keys, its own pair's key the target.

    queries, keys: (B, D) normalised; logit_scale: the model's temperature, exp(logit_scale).
    """
    logits = logit_scale * queries @ keys.T                                 # (B, B)
    targets = torch.arange(len(queries), device=queries.device)             # (B,) the diagonal
    return F.cross_entropy(logits, targets, reduction="sum")


def g_safeclip_loss(text_safe, text_unsafe, image_safe, image_unsafe, *, logit_scale) -> torch.Tensor:
    """Σ_b of the reversed Safe-CLIP redirection loss (G-Safe-CLIP), sg = detach:

        L = InfoNCE(T(ts), sg I(iu)) + InfoNCE(I(is), sg T(tu))
            + mean(1 − cos(T(ts), sg T(tu))) + mean(1 − cos(I(is), sg I(iu)))

    Safe-CLIP redirects unsafe inputs to safe embeddings; reversed, this pulls the safe
    representations towards the unsafe ones. InfoNCE's negatives are the other pairs of the same
    batch, so unlike G-Unsafe the scores depend on `batch_size`: the 1/N mean across batches is
    Σ_k (B_k / N) · L_k, with L_k the loss of batch k as stated.
    """
    text_unsafe, image_unsafe = text_unsafe.detach(), image_unsafe.detach()
    contrastive = info_nce(text_safe, image_unsafe, logit_scale) + info_nce(image_safe, text_unsafe, logit_scale)
    alignment = (1 - _cos(text_safe, text_unsafe)).sum() + (1 - _cos(image_safe, image_unsafe)).sum()
    return contrastive + alignment
