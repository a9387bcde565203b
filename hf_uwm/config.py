"""`UWMConfig`: every setting of an edit, as a dataclass that round-trips through JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

SCORES = ("ratio", "unsafe", "difference", "attribution", "random", "g_unsafe", "g_safeclip")
# Scores from one gradient pass over both towers (they need all four columns of the pairs).
GRADIENT_SCORES = ("attribution", "g_unsafe", "g_safeclip")
# The paper's training-free baselines (hf_uwm.baselines): gradient magnitudes, pruned at a sparsity.
BASELINES = ("g_unsafe", "g_safeclip")
SELECTIONS = ("adaptive", "fixed")
TOKEN_NORMS = ("l2", "rms")
TOWERS = ("text", "vision")


@dataclass
class UWMConfig:
    """Settings of one UWM edit (SPEC §2-§3).

    `None` for `tau`, `text_targets` or `vision_targets` means "the default of the model family"
    (CLIP/SigLIP: τ=0.02, text `self_attn.out_proj`, vision `mlp.fc2`; LLaVA: τ=0.085, vision
    `mlp.fc2` only). An empty target list leaves that tower untouched.
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
        _check("batch_size", isinstance(self.batch_size, int) and not isinstance(self.batch_size, bool)
               and self.batch_size >= 1, "batch_size must be a positive integer (pairs per batch)")
        _check("seed", isinstance(self.seed, int) and not isinstance(self.seed, bool),
               "seed must be an integer")
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
