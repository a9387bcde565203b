"""Methods scored from gradients of an objective on the pairs' normalised embeddings (both towers).

The objective of one batch of B pairs is a function of the L2-normalised (B, D) embeddings Ts, Tu
(safe/unsafe text) and Is, Iu (safe/unsafe image) that returns the **sum** over the batch; divided
by the number of pairs N and summed over batches (and processes), its gradient is that of the 1/N
mean over the calibration set.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..distributed import all_reduce_
from .base import Method
from .calibration import Calibration


class GradientScore(Method):
    """score = transform(W, ∂L/∂W) per weight, from one backward per batch over both towers."""

    needs_both_towers = True
    families = ("clip", "siglip")   # it compares text and image embeddings
    instead = {"llava": "caption_attribution"}

    def loss(self, editor):
        """(Ts, Tu, Is, Iu) -> the batch's summed objective."""
        raise NotImplementedError

    def transform(self, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return grad.abs()

    def calibrate(self, editor, run: Calibration) -> dict[str, torch.Tensor]:
        family, loss_fn = editor.family, self.loss(editor)

        def batch_loss(inputs, b: int) -> torch.Tensor:
            text_inputs, image_inputs = inputs
            with run.autocast():
                texts = family.embed_text(family.to_device(text_inputs))        # (2B, D)
                images = family.embed_images(family.to_device(image_inputs))    # (2B, D)
            return loss_fn(texts[:b], texts[b:], images[:b], images[b:])

        grads = gradient_sums(editor, run, pair_preprocess(run), batch_loss, f"UWM {editor.config.method}")
        return {name: self.transform(layer.weight.detach(), grads[name]).double()
                for name, layer in editor.target_layers.items()}


def gradient_sums(editor, run: Calibration, preprocess, batch_loss, desc: str,
                  leave: bool = True) -> dict[str, torch.Tensor]:
    """∂L/∂W per target layer, L = (1/N) Σ_batches batch_loss(inputs, B), summed over processes.

    `batch_loss` gets a batch's preprocessed inputs and its number of pairs B and returns the
    batch's summed objective (running its forward under `run.autocast()` itself). Gradients are
    taken on the target weights only; the sums are float32 or better (the weights' dtype when
    finer), whatever the forward's autocast.
    """
    layers = editor.target_layers
    weights = [layer.weight for layer in layers.values()]
    sums = [torch.zeros_like(w, dtype=accumulation_dtype(w)) for w in weights]
    with gradients_on(editor.model, weights):
        for _, rows, inputs in run.batches(preprocess, desc, leave=leave):
            loss = batch_loss(inputs, len(rows)) / len(run.dataset)
            for total, grad in zip(sums, torch.autograd.grad(loss, weights)):
                total += grad
    all_reduce_(sums)
    return dict(zip(layers, sums))


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, D), (B, D) -> (B,): the rows are normalised, so the dot product is the cosine."""
    return (a * b).sum(-1)


def pair_preprocess(run: Calibration):
    """rows -> (text inputs, image inputs) of [safe; unsafe] items."""
    return _Both(run.preprocess("text"), run.preprocess("vision"))


class _Both:
    def __init__(self, text, vision):
        self.text, self.vision = text, vision

    def __call__(self, rows):
        return self.text(rows), self.vision(rows)


def accumulation_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.promote_types(weight.dtype, torch.float32)


@contextmanager
def gradients_on(model: nn.Module, params):
    """Autograd tracks `params` only; the model's requires_grad flags are restored afterwards.

    Gradients are taken with torch.autograd.grad, so no .grad of the model is ever touched.
    """
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
