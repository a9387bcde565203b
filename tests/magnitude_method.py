"""A toy method in one file: magnitude pruning, |W|^power per weight, with a setting of its own.

Importing this module is its whole registration; nothing in hf_uwm names it.
"""

from dataclasses import dataclass

from hf_uwm.methods import Method, SelectionSettings, register_method
from hf_uwm.settings import setting


@dataclass
class MagnitudeSettings(SelectionSettings):
    power: float = setting(1.0, "the exponent of |W|", grid=True)

    def __post_init__(self):
        super().__post_init__()
        self.check("power", isinstance(self.power, (int, float)) and self.power > 0, "power must be a number > 0")


class MagnitudePruning(Method):
    name = "magnitude"
    title = "magnitude pruning"
    help = "toy method: the largest weights by |W|^power, no data needed"
    card_text = "**magnitude pruning**: each weight of the targeted layers is scored by |W| to the power `power`"
    settings_class = MagnitudeSettings
    score_settings = Method.score_settings + ("power",)

    def data_towers(self, editor):
        return ()

    def calibrate(self, editor, run):
        return {name: layer.weight.detach().abs().double() ** editor.config.power
                for name, layer in editor.target_layers.items()}


register_method(MagnitudePruning())
