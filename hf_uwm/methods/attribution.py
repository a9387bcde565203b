"""Attribution (beyond the paper): A = W ⊙ ∂m/∂W, the first-order share of the unsafe-preference
margin m carried by each weight, kept where positive and selected like any other score."""

from __future__ import annotations

import torch

from .base import register_method
from .gradients import GradientScore
from .margins import preference_margin


class Attribution(GradientScore):
    name = "attribution"
    title = "attribution"
    help = "one pass of W * dm/dW, the weights' share of the unsafe-over-safe preference m"
    card_text = ("**attribution**: each weight of the targeted layers is scored by W ⊙ ∂m/∂W, its first-order share "
                 "of the model's preference m for the unsafe over the safe item of each calibration pair (kept where "
                 "positive)")

    def loss(self, editor):
        return preference_margin

    def transform(self, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return (weight * grad).clamp(min=0)


register_method(Attribution())
