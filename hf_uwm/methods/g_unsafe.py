"""G-Unsafe, the paper's training-free gradient baseline: |∂L/∂W| of a loss that pulls safe items
towards unsafe ones, pruned at a fixed sparsity (`UWMConfig.baseline("g_unsafe")`)."""

from __future__ import annotations

import torch

from .base import register_method
from .gradients import GradientScore, cosine


class GUnsafe(GradientScore):
    name = "g_unsafe"
    title = "G-Unsafe"
    help = "paper baseline: |dL/dW| of a loss pulling safe embeddings to unsafe ones"
    card_text = ("**G-Unsafe**, a gradient baseline: each weight is scored by |∂L/∂W| of a loss that pulls safe "
                 "embeddings towards their unsafe versions")

    def loss(self, editor):
        return g_unsafe_loss


register_method(GUnsafe())


def g_unsafe_loss(text_safe, text_unsafe, image_safe, image_unsafe) -> torch.Tensor:
    """Σ_b of L_text + L_vision (G-Unsafe), sg = detach:

        L_text   = −cos(T(ts), sg T(tu)) + cos(T(ts), sg I(is))
        L_vision = −cos(I(is), sg I(iu)) + cos(I(is), sg T(ts))

    Each pulls a safe item towards the frozen unsafe embedding of its own modality and away from
    the frozen safe embedding of the other. Every term that crosses towers is detached, so on a
    text weight the gradient of the sum is ∂L_text/∂W and on a vision weight ∂L_vision/∂W: one
    backward gives each tower the gradient of its own loss only.
    """
    text = -cosine(text_safe, text_unsafe.detach()) + cosine(text_safe, image_safe.detach())        # (B,)
    vision = -cosine(image_safe, image_unsafe.detach()) + cosine(image_safe, text_safe.detach())    # (B,)
    return (text + vision).sum()
