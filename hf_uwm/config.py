"""`UWMConfig`: every setting of an edit, as a dataclass that round-trips through JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

# Every method's name; each has one module in hf_uwm.methods.
SCORES = ("ratio", "unsafe", "difference", "attribution", "iterative_attribution", "random", "g_unsafe",
          "g_safeclip", "caption_attribution", "caption_iterative")
# The paper's training-free baselines: gradient magnitudes, pruned at a sparsity.
BASELINES = ("g_unsafe", "g_safeclip")
SELECTIONS = ("adaptive", "fixed")
TOKEN_NORMS = ("l2", "rms")
TOWERS = ("text", "vision")


@dataclass
class UWMConfig:
    """Settings of one edit: what is scored, how weights are selected and how they are changed.

    `None` for `tau`, `text_targets` or `vision_targets` means "the default of the model family"
    (CLIP/SigLIP: τ=0.02, text `self_attn.out_proj`, vision `mlp.fc2`; LLaVA: τ=0.085, vision
    `mlp.fc2` only; score="iterative_attribution": text `mlp.fc2` only). An empty target list
    leaves that tower untouched.

    `shared_budget`: select over all target layers jointly (one ranking, n = all their weights)
    instead of per layer; `None` means on for "iterative_attribution", off otherwise.

    score="iterative_attribution" flips weights in at most `rounds` rounds, each taking the top
    ⌈round_density · n⌉ not yet flipped by W⊙∂m/∂W − curvature_weight · (knowledge curvature),
    re-scored on the model as edited so far; `curvature_probes` random probes estimate the
    curvature, anew every `curvature_every` rounds. tau, selection and density do not apply to it. It sets its own strength: a seeded
    `holdout` fraction of the calibration pairs never feeds a gradient, and after each round the
    edit stops once their GS reaches `goal` (percent) or more than `knowledge_budget` percent of
    their safe images match another safe caption best than the unedited model's choice (the round
    that crossed it is not kept). The defaults were chosen on validation splits of three organisms
    (`scripts/stopping_defaults.py`). `goal=None` and
    `knowledge_budget=None` switch either half off; with both off and `holdout=0` every round runs.
    """

    tau: float | None = None
    alpha: float = -1.0
    score: str = "ratio"
    selection: str = "adaptive"
    density: float = 0.02
    token_norm: str = "l2"
    text_targets: list[str] | None = None
    vision_targets: list[str] | None = None
    text_prior: bool = True
    vision_prior: bool = False
    eps: float = 1e-8
    batch_size: int = 32
    seed: int = 0
    shared_budget: bool | None = None
    rounds: int = 40
    round_density: float = 0.001
    goal: float | None = 95.0
    knowledge_budget: float | None = 8.0
    holdout: float = 0.2
    curvature_weight: float = 4.0
    curvature_probes: int = 8
    curvature_every: int = 1
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        def _check(name, ok, allowed):
            if not ok:
                raise ValueError(f"UWMConfig.{name}={getattr(self, name)!r} is invalid: {allowed}.")

        _check("tau", self.tau is None or (_is_number(self.tau) and 0 < self.tau < 1),
               "tau must be a number in the open interval (0, 1), e.g. 0.02, or None for the family default")
        _check("alpha", _is_number(self.alpha) and math.isfinite(self.alpha),
               "alpha must be a finite number (-1 negates the selected weights, 0 prunes them)")
        _check("score", self.score in SCORES, f"score must be one of {SCORES}")
        _check("selection", self.selection in SELECTIONS, f"selection must be one of {SELECTIONS}")
        _check("density", _is_number(self.density) and 0 < self.density <= 1,
               "density must be a number in (0, 1] (the fraction of weights per layer for selection='fixed')")
        _check("token_norm", self.token_norm in TOKEN_NORMS, f"token_norm must be one of {TOKEN_NORMS}")
        for name in ("text_targets", "vision_targets"):
            value = getattr(self, name)
            _check(name, value is None or (isinstance(value, (list, tuple))
                                           and all(isinstance(v, str) and v for v in value)),
                   "targets must be None (family default) or a list of module-name suffixes such as "
                   "['self_attn.out_proj']")
            if value is not None:
                setattr(self, name, list(value))
        for name in ("text_prior", "vision_prior"):
            _check(name, isinstance(getattr(self, name), bool), "must be True or False")
        _check("eps", _is_number(self.eps) and 0 < self.eps < 1e-2, "eps must be a small positive number")
        _check("batch_size", _is_int(self.batch_size) and self.batch_size >= 1,
               "batch_size must be a positive integer (pairs per batch)")
        _check("seed", _is_int(self.seed),
               "seed must be an integer")
        _check("shared_budget", self.shared_budget is None or isinstance(self.shared_budget, bool),
               "shared_budget must be True, False or None (the method's default)")
        _check("rounds", _is_int(self.rounds) and self.rounds >= 1, "rounds must be a positive integer")
        _check("round_density", _is_number(self.round_density) and 0 < self.round_density <= 1,
               "round_density must be a number in (0, 1] (the fraction of target weights flipped per round)")
        _check("round_density", not _is_int(self.rounds) or self.rounds * self.round_density <= 1,
               f"rounds × round_density = {self.rounds} × {self.round_density} must be at most 1 "
               "(there are no more weights to flip)")
        _check("curvature_weight", _is_number(self.curvature_weight) and math.isfinite(self.curvature_weight)
               and self.curvature_weight >= 0, "curvature_weight must be a finite number ≥ 0 (0: no penalty)")
        _check("goal", self.goal is None or (_is_number(self.goal) and 0 < self.goal <= 100),
               "goal must be a percentage in (0, 100] (the held-out GS at which the edit stops) or None")
        _check("knowledge_budget", self.knowledge_budget is None or (_is_number(self.knowledge_budget)
                                                                     and self.knowledge_budget >= 0),
               "knowledge_budget must be a number of points ≥ 0 (what the held-out knowledge measure may lose) "
               "or None")
        _check("holdout", _is_number(self.holdout) and 0 <= self.holdout < 1,
               "holdout must be a fraction in [0, 1) of the calibration pairs kept out of the gradients")
        _check("holdout", self.holdout > 0 or (self.goal is None and self.knowledge_budget is None),
               "holdout=0 leaves nothing to measure the stopping rule on: set goal=None and "
               "knowledge_budget=None too, or a holdout such as 0.2")
        _check("curvature_probes", _is_int(self.curvature_probes) and self.curvature_probes >= 1,
               "curvature_probes must be a positive integer (random probes of the knowledge curvature)")
        _check("curvature_every", _is_int(self.curvature_every) and self.curvature_every >= 1,
               "curvature_every must be a positive integer (rounds between two estimates of the curvature)")
        _check("extra", isinstance(self.extra, dict), "extra must be a dict of JSON values")

    @classmethod
    def baseline(cls, score: str, sparsity: float = 0.02, **settings) -> "UWMConfig":
        """A config of the paper's baselines: prune (α = 0) the top `sparsity` fraction of weights per layer.

        >>> UWMConfig.baseline("g_unsafe", sparsity=0.02, vision_targets=[])   # doctest: +SKIP

        `score` is "g_unsafe" or "g_safeclip"; `settings` set any other field (targets, batch_size...).
        """
        if score not in BASELINES:
            raise ValueError(f"UWMConfig.baseline: score must be one of {BASELINES}, got {score!r}.")
        fixed = sorted(set(settings) & {"score", "selection", "density", "alpha"})
        if fixed:
            raise ValueError(f"UWMConfig.baseline sets {fixed} itself (fixed selection at `sparsity`, alpha=0); "
                             "use UWMConfig(...) directly for other settings.")
        return cls(score=score, selection="fixed", density=sparsity, alpha=0.0, **settings)

    def prior(self, tower: str) -> bool:
        return self.text_prior if tower == "text" else self.vision_prior

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "UWMConfig":
        if not isinstance(data, dict):
            raise TypeError(f"UWMConfig.from_dict expects a dict, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown UWMConfig field(s) {unknown}; known fields are {sorted(known)}.")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "UWMConfig":
        return cls.from_json_string(Path(path).read_text())

    @classmethod
    def from_json_string(cls, text: str) -> "UWMConfig":
        return cls.from_dict(json.loads(text))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
