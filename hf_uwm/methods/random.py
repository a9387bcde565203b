"""Random scores (`method="random"`): uniform per weight, seeded per layer; no data needed."""

from __future__ import annotations

import torch

from ..selection import layer_generator
from .base import Method, register_method
from .calibration import Calibration


class RandomScores(Method):
    name = "random"
    title = "random control"
    help = "random weights of the same selection: a control, not a safety edit"
    card_text = ("**a random control**: weights drawn uniformly at random, as many per layer as the edit it is "
                 "compared with, to show what an edit of that size does by chance; it is not a safety edit")
    score_settings = Method.score_settings + ("seed",)

    def data_towers(self, editor) -> tuple[str, ...]:
        return ()

    def calibrate(self, editor, run: Calibration | None) -> dict[str, torch.Tensor]:
        return random_scores(editor.target_layers, editor.config.seed)


register_method(RandomScores())


def random_scores(layers: dict, seed: int) -> dict[str, torch.Tensor]:
    """Uniform random scores per layer, drawn from `layer_generator`."""
    return {name: torch.rand(layer.weight.shape, generator=layer_generator(seed, i), dtype=torch.float64)
            for i, (name, layer) in enumerate(layers.items())}
