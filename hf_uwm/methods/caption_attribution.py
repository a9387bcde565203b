"""Caption attribution (beyond the paper; LLaVA): the attribution score with a captioning margin.

On the calibration pairs the captioner's preference, on unsafe images, for the safe caption,

    m = (1/N) Σ_b [ log p(Ts_b | Iu_b) − log p(Tu_b | Iu_b) ],

is differentiated once with gradients on the vision-tower target weights only (projector and
language model frozen). Multiplying W_ij by α changes m by about (α − 1)·W_ij·∂m/∂W_ij, so for α < 1
the weights whose edit raises the safe margin have W ⊙ ∂m/∂W < 0: the score is max(−W ⊙ ∂m/∂W, 0),
selected like any other. The prompt is `config.extra["prompt"]` (default "Describe the image.").
"""

from __future__ import annotations

import torch

from .base import Method, register_method
from .calibration import Calibration
from .gradients import gradient_sums
from .margins import MarginInputs, caption_margin


class CaptionAttribution(Method):
    name = "caption_attribution"
    title = "caption attribution"
    help = ("LLaVA only: attribution of the captioner's safe-over-unsafe caption preference on unsafe images, "
            "vision tower")
    card_text = ("**caption attribution**: each weight of the captioner's vision tower is scored by its first-order "
                 "share of the preference, on unsafe images, for the safe over the unsafe caption (teacher-forced "
                 "log-likelihoods)")
    families = ("llava",)
    edits_projector = True
    instead = {"clip": "attribution", "siglip": "attribution"}

    def data_towers(self, editor) -> tuple[str, ...]:
        return ("text", "vision")  # safe and unsafe captions, unsafe images

    def calibrate(self, editor, run: Calibration) -> dict[str, torch.Tensor]:
        from ..captioning import DEFAULT_PROMPT

        def batch_loss(inputs, b: int) -> torch.Tensor:
            with run.autocast():
                return caption_margin(editor.model, inputs, b)

        preprocess = MarginInputs(editor.processor, editor.config.extra.get("prompt", DEFAULT_PROMPT))
        grads = gradient_sums(editor, run, preprocess, batch_loss, "UWM caption attribution")
        return {name: (-layer.weight.detach() * grads[name]).clamp(min=0).double()
                for name, layer in editor.target_layers.items()}


register_method(CaptionAttribution())
