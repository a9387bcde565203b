"""Random scores (`score="random"`): uniform per weight, seeded per layer; no data needed."""

from __future__ import annotations

import torch

from ..selection import layer_generator
from .base import Calibration, Method


class RandomScores(Method):
    score_settings = Method.score_settings + ("seed",)

    def data_towers(self, editor) -> tuple[str, ...]:
        return ()

    def scores(self, editor, run: Calibration | None) -> dict[str, torch.Tensor]:
        return random_scores(editor.target_layers, editor.config.seed)


def random_scores(layers: dict, seed: int) -> dict[str, torch.Tensor]:
    """Uniform random scores per layer, drawn from `layer_generator`."""
    return {name: torch.rand(layer.weight.shape, generator=layer_generator(seed, i), dtype=torch.float64)
            for i, (name, layer) in enumerate(layers.items())}
