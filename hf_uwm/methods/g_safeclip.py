"""G-Safe-CLIP, the paper's other gradient baseline: |∂L/∂W| of the reversed Safe-CLIP redirection
loss, pruned at a fixed sparsity (`UWMConfig.baseline("g_safeclip")`)."""

from __future__ import annotations

from functools import partial

import torch
from torch.nn import functional as F

from .base import register_method
from .gradients import GradientScore, cosine


class GSafeCLIP(GradientScore):
    name = "g_safeclip"
    title = "G-Safe-CLIP"
    help = "paper baseline: |dL/dW| of a contrastive loss over the pairs"
    card_text = ("**G-Safe-CLIP**, a gradient baseline: each weight is scored by |∂L/∂W| of a contrastive loss at "
                 "the model's own temperature over the calibration pairs")
    # InfoNCE's negatives are the other pairs of the batch: the scores depend on the batch size.
    score_settings = GradientScore.score_settings + ("batch_size",)

    def loss(self, editor):
        # InfoNCE at the model's own temperature (CLIP and SigLIP both keep it as log of the scale).
        return partial(g_safeclip_loss, logit_scale=editor.model.logit_scale.detach().exp())


register_method(GSafeCLIP())


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
    alignment = (1 - cosine(text_safe, text_unsafe)).sum() + (1 - cosine(image_safe, image_unsafe)).sum()
    return contrastive + alignment
