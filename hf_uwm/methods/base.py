"""What every method shares: the `Method` interface the editor calls, and the registry.

A method is one module: a `Method` subclass that declares what it is (name, title, help line, card
text, the model families it edits, its own settings dataclass, which settings re-select without a
forward pass) and implements `calibrate`, then `register_method(TheMethod())`. The config, the
command line, model cards, sweeps and demos read everything from the registry.

A method turns calibration pairs into per-weight scores of the target layers (`calibrate`, given a
`calibration.Calibration` run), and scores into the delta, sorted flat indices per layer (`select`).
Most methods score every weight once and select per layer or over one shared budget; an iterative
method instead returns what `select` needs to rebuild its delta (the round in which each weight was
flipped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from ..settings import MethodSettings, is_number, setting, setting_info, setting_names
from ..families import PROJECTOR
from ..hints import hint
from ..selection import select_adaptive, select_fixed, select_shared

if TYPE_CHECKING:
    from .calibration import Calibration


SELECTIONS = ("adaptive", "fixed")


@dataclass
class SelectionSettings(MethodSettings):
    """Settings of a method that scores every weight once: keep per layer (or over the shared budget)
    the top weights up to the share `tau` of the score mass (`selection="adaptive"`; `None`: the
    family's τ, 0.02 for CLIP/SigLIP, 0.085 for LLaVA), or the top `density` of them ("fixed")."""

    tau: float | None = setting(None, "share of each layer's score mass to select", symbol="τ", grid=True,
                                family_default="tau")
    selection: str = setting("adaptive", "adaptive: by the share tau of the score mass; fixed: the top density",
                             choices=SELECTIONS)
    density: float = setting(0.02, "with selection fixed: the fraction of weights per layer to select", grid=True)

    def __post_init__(self):
        self.check("tau", self.tau is None or (is_number(self.tau) and 0 < self.tau < 1),
                   "tau must be a number in the open interval (0, 1), e.g. 0.02, or None for the family default")
        self.check("selection", self.selection in SELECTIONS, f"selection must be one of {SELECTIONS}")
        self.check("density", is_number(self.density) and 0 < self.density <= 1,
                   "density must be a number in (0, 1] (the fraction of weights per layer for selection='fixed')")


class Edit(Protocol):
    """All a method reads of the edit it calibrates (`UWMEditor` passes itself; tests/test_layers.py
    checks that the methods read nothing else of it)."""

    model: torch.nn.Module
    processor: object
    family: object          # ModelFamily
    config: object          # UWMConfig
    layers: dict            # tower -> {layer name: nn.Linear}
    fingerprint: str | None

    @property
    def towers(self) -> tuple[str, ...]: ...

    @property
    def target_layers(self) -> dict: ...


class Method:
    """One editing method. Subclasses set the class attributes and implement `calibrate`."""

    #: the name `UWMConfig(method=...)`, `--method` and uwm_config.json use
    name: str = ""
    #: a few words for model-card titles, tables and commit messages
    title: str = ""
    #: one line for `hf-uwm edit --help`
    help: str = ""
    #: the model card's description of how weights were chosen (completes "The weights to change were chosen by ...")
    card_text: str = ""
    #: the model families it edits (`ModelFamily.spec.name`)
    families: tuple[str, ...] = ("clip", "siglip", "llava")
    #: per family it does not edit, the method to use instead
    instead: dict[str, str] = {}
    #: its own settings, with their defaults
    settings_class: type[MethodSettings] = SelectionSettings
    #: calibration pairs need the columns of both towers (else: of the towers edited)
    needs_both_towers = False
    #: calibrate accepts checkpoint_dir
    resumable = False
    #: the value of shared_budget=None
    shared_budget_default = False
    #: config fields the scores depend on: a score cache is refused for other values
    score_settings: tuple[str, ...] = ("method", "text_targets", "vision_targets")
    #: config fields `select` reads: `with_settings` re-selects from cached scores with new values
    selection_settings: tuple[str, ...] = ("tau", "alpha", "selection", "density", "shared_budget")
    #: `with_settings` may shrink the targets to layers already scored
    targets_can_shrink = True
    #: `calibrate` only reads the target weights, so their fingerprint may be hashed meanwhile
    leaves_weights_untouched = False
    #: it runs the whole captioner, so LLaVA's multimodal projector may be a target ("projector.linear_1")
    edits_projector = False
    #: text-only pairs (texts and no images) calibrate its text tower
    text_only_pairs = False

    def check(self, family, config):
        """Refuse a model this method cannot edit (called when the editor is made)."""
        if family.spec.name not in self.families:
            other = self.instead.get(family.spec.name)
            raise ValueError(f"method={self.name!r} edits {'/'.join(self.families)} models, not "
                             f"{type(family.model).__name__}" + (f": use method={other!r}." if other else "."))
        projector = [t for t in config.vision_targets or () if t.startswith(PROJECTOR)]
        if projector and family.spec.name == "llava" and not self.edits_projector:
            able = sorted(m.name for m in _METHODS.values() if m.edits_projector)
            raise ValueError(f"method={self.name!r} runs the vision tower alone, so it cannot score the projector "
                             f"targets {projector}: use method={able[0]!r} (or one of {able}), or drop them.")

    def check_text_only(self, editor: "Edit", count: int, total: int):
        """Refuse `count` of `total` calibration pairs being text-only, unless this method learns from them."""
        if not self.text_only_pairs:
            able = sorted(m.name for m in _METHODS.values() if m.text_only_pairs)
            which = hint(f"method={self.name!r}", f"--method {self.name}")
            raise ValueError(f"{count} of the {total} calibration pairs are text-only (no images), and {which} "
                             f"needs the images of every pair: give them images, drop those pairs, or use a method "
                             f"that calibrates the text tower from text alone ({', '.join(able)}).")

    def reselectable(self) -> set[str]:
        """The config fields `with_settings` (and so a sweep) changes without a forward pass."""
        return set(self.selection_settings) | ({"text_targets", "vision_targets"} if self.targets_can_shrink else set())

    def default_targets(self, family, tower: str) -> tuple[str, ...]:
        return family.default_targets(tower)

    def resolved_settings(self, family, config) -> dict:
        """Settings whose `None` means "the family's default" (their `family_default`), written out for a saved
        delta."""
        resolved = {}
        for name in setting_names(config.settings):
            attribute = setting_info(config.settings, name).family_default
            if attribute is not None and getattr(config, name) is None:
                resolved[name] = getattr(family.spec, attribute)
        return resolved

    def data_towers(self, editor: Edit) -> tuple[str, ...]:
        """The towers whose columns the calibration pairs need."""
        return ("text", "vision") if self.needs_both_towers else editor.towers

    def calibrate(self, editor: Edit, run: Calibration) -> dict[str, torch.Tensor]:
        """Per target layer what `select` reads: a score per weight (for an iterative method, the
        round in which each weight was flipped)."""
        raise NotImplementedError

    def select(self, scores: dict[str, torch.Tensor], config, trajectory=None) -> dict[str, torch.Tensor]:
        """Adaptive (τ) or fixed (density) selection, per layer or over the shared budget.

        `trajectory`: what an iterative method recorded per round (`stopping.Step`s), else None.
        """
        def one(s, name):
            if config.selection == "fixed":
                return select_fixed(s, config.density, name)
            return select_adaptive(s, config.tau, name)

        if config.shared_budget:
            return select_shared(scores, one)
        return {name: one(s, name) for name, s in scores.items()}

    def selection_text(self, config: dict, stop: dict | None) -> str:
        """How the weights were selected, for the model card (from uwm_config.json's config and stop)."""
        rule = (f"adaptive, τ = {config['tau']}" if config["selection"] == "adaptive"
                else f"fixed, density = {config['density']}")
        return rule + (", one budget over all layers" if config.get("shared_budget") else "")


# `UWMConfig()` edits with UWM as published (the paper's method, so a bare config reproduces it);
# `hf-uwm edit` recommends iterative attribution, which sets its own strength (README: "Which method for my model?").
DEFAULT_METHOD = "ratio"
RECOMMENDED_METHOD = "iterative_attribution"
#: installed packages add methods here: an entry point naming a module that registers its method when
#: imported, or a `Method` subclass or instance (pyproject: [project.entry-points."hf_uwm.methods"])
ENTRY_POINT_GROUP = "hf_uwm.methods"

_METHODS: dict[str, Method] = {}
_entry_points_loaded = False


def register_method(method: Method) -> Method:
    """Make `method` (an instance) known by its `name` to the config, the CLI, cards and sweeps."""
    if not isinstance(method, Method):
        raise TypeError(f"register_method expects a Method instance, got {type(method).__name__}.")
    if not method.name or not method.title or not method.help or not method.card_text:
        raise ValueError(f"{type(method).__name__} must declare name, title, help and card_text to be registered.")
    if method.name in _METHODS and type(_METHODS[method.name]) is not type(method):
        raise ValueError(f"A method named {method.name!r} is registered already ({type(_METHODS[method.name]).__name__}).")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    _load_entry_points()
    if name not in _METHODS:
        raise ValueError(f"Unknown method {name!r}; registered methods are {method_names()}.")
    return _METHODS[name]


def method_names() -> tuple[str, ...]:
    _load_entry_points()
    return tuple(_METHODS)


def _load_entry_points():
    """Register the methods of installed packages, once; a broken one is skipped with a warning naming it."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True   # first: a plugin that asks the registry while loading must not recurse
    from importlib.metadata import entry_points

    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = point.load()
            if isinstance(loaded, type) and issubclass(loaded, Method):
                loaded = loaded()
            if isinstance(loaded, Method):
                register_method(loaded)
        except Exception as err:  # a broken plugin must not take the built-in methods down with it
            import warnings

            package = point.dist.name if point.dist is not None else "an installed package"
            warnings.warn(f"the method {point.name!r} of {package} (entry point {point.value!r} in group "
                          f"{ENTRY_POINT_GROUP!r}) failed to load and is skipped: {type(err).__name__}: {err}",
                          stacklevel=3)

