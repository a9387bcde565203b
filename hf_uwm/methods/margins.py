"""The margins the attribution methods differentiate, one per kind of model.

`preference_margin`: a dual encoder's (CLIP, SigLIP) preference for matching unsafe with unsafe
over the safe alternative, from normalised embeddings. `caption_margin`: a captioner's (LLaVA)
preference, on unsafe images, for the safe over the unsafe caption, from teacher-forced
log-likelihoods of the inputs `MarginInputs` builds.
"""

from __future__ import annotations

import torch

from .gradients import cosine


def preference_margin(text_safe, text_unsafe, image_safe, image_unsafe) -> torch.Tensor:
    """Σ_b (s(Tu,Iu) − s(Tu,Is)) + (s(Tu,Iu) − s(Ts,Iu)) over a batch of normalised (B, D) embeddings."""
    s_uu = cosine(text_unsafe, image_unsafe)
    return (2 * s_uu - cosine(text_unsafe, image_safe) - cosine(text_safe, image_unsafe)).sum()


def caption_margin(model, inputs: dict, b: int) -> torch.Tensor:
    """Σ_b [log p(safe caption | unsafe image) − log p(unsafe caption | unsafe image)] of one batch,
    from `MarginInputs` (rows [unsafe image + safe caption; unsafe image + unsafe caption])."""
    from ..captioning import log_likelihood

    ll = log_likelihood(model, inputs)                                             # (2B,)
    return (ll[:b] - ll[b:]).sum()


class MarginInputs:
    """rows -> caption inputs of [unsafe images with safe captions; unsafe images with unsafe captions]
    (picklable for DataLoader workers)."""

    def __init__(self, processor, prompt: str):
        self.processor, self.prompt = processor, prompt

    def __call__(self, rows):
        from ..captioning import caption_inputs

        images = list(rows["unsafe_image"]) * 2
        return caption_inputs(self.processor, images, list(rows["safe_text"]) + list(rows["unsafe_text"]), self.prompt)
