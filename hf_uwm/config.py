"""`UWMConfig`: every setting of an edit, as a dataclass that round-trips through JSON.

The settings every method shares are fields of `UWMConfig`; a method's own settings (UWM's τ,
the iterative methods' rounds...) are a small dataclass that the method declares in its own file
(`Method.settings_class`, as peft keeps one config per tuner). `UWMConfig(method="ratio", tau=0.05)`
takes both kinds as keywords, and reads both as attributes (`config.tau`); in JSON they sit side by side.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

# The settings' building blocks live in a leaf module that methods import; re-exported for callers of old.
from .settings import MethodSettings, check_field, is_int, is_number, setting, setting_names  # noqa: F401

@dataclass(init=False)
class UWMConfig:
    """Settings of one edit: which method scores the weights, which layers it may change, and by what factor.

    `method` names a registered method (`hf_uwm.methods.method_names()`); keywords other than the
    fields below are that method's own settings (`hf_uwm.methods.get_method(name).settings_class`),
    defaulting to the method's defaults. `score=` is the former name of `method` and still accepted.

    `None` for `text_targets` or `vision_targets` means "the default of the model family and method"
    (CLIP/SigLIP: text `self_attn.out_proj`, vision `mlp.fc2`; LLaVA: vision `mlp.fc2` only;
    iterative attribution: text `mlp.fc2` only). An empty target list leaves that tower untouched.
    `shared_budget`: select over all target layers jointly (one ranking) instead of per layer;
    `None` means the method's default. `extra` holds JSON values a method reads (a captioner's prompt).
    """

    method: str | None = None   # None: the registry's DEFAULT_METHOD
    alpha: float = setting(-1.0, "factor for selected weights (-1 negates, 0 prunes)", symbol="α", grid=True)
    text_targets: list[str] | None = None
    vision_targets: list[str] | None = None
    batch_size: int = 32
    seed: int = 0
    shared_budget: bool | None = None
    extra: dict = field(default_factory=dict)
    settings: MethodSettings | None = None   # the method's own settings; None: its defaults

    def __init__(self, method: str | None = None, *, score: str | None = None, alpha: float = -1.0,
                 text_targets=None, vision_targets=None, batch_size: int = 32, seed: int = 0,
                 shared_budget: bool | None = None, extra: dict | None = None,
                 settings: MethodSettings | dict | None = None, **method_settings):
        if score is not None and method is not None and score != method:
            raise ValueError(f"UWMConfig got method={method!r} and score={score!r}: `score` is the old name of "
                             "`method`; give one of them.")
        from .methods import DEFAULT_METHOD

        self.method = method if method is not None else score if score is not None else DEFAULT_METHOD
        self.alpha, self.text_targets, self.vision_targets = alpha, text_targets, vision_targets
        self.batch_size, self.seed, self.shared_budget = batch_size, seed, shared_budget
        self.extra = {} if extra is None else extra
        self._check()
        self.settings = _settings_for(self.method, settings, method_settings)

    def _check(self):
        def check(name, ok, allowed):
            check_field(self, name, ok, allowed)

        from .methods import method_names

        check("method", self.method in method_names(), f"method must be one of {method_names()}")
        check("alpha", is_number(self.alpha) and math.isfinite(self.alpha),
              "alpha must be a finite number (-1 negates the selected weights, 0 prunes them)")
        for name in ("text_targets", "vision_targets"):
            value = getattr(self, name)
            check(name, value is None or (isinstance(value, (list, tuple)) and all(isinstance(v, str) and v
                                                                                   for v in value)),
                  "targets must be None (family default) or a list of module-name suffixes such as "
                  "['self_attn.out_proj']")
            if value is not None:
                setattr(self, name, list(value))
        check("batch_size", is_int(self.batch_size) and self.batch_size >= 1,
              "batch_size must be a positive integer (pairs per batch)")
        check("seed", is_int(self.seed), "seed must be an integer")
        check("shared_budget", self.shared_budget is None or isinstance(self.shared_budget, bool),
              "shared_budget must be True, False or None (the method's default)")
        check("extra", isinstance(self.extra, dict), "extra must be a dict of JSON values")

    def __getattr__(self, name: str):
        # Reached only when normal lookup fails: the method's own settings read as config attributes.
        settings = self.__dict__.get("settings")
        if settings is not None and name in setting_names(settings):
            return getattr(settings, name)
        raise AttributeError(f"UWMConfig of method={self.__dict__.get('method')!r} has no setting {name!r}"
                             + (f"; its settings are {sorted(self.field_names())}" if settings is not None else ""))

    def field_names(self) -> tuple[str, ...]:
        """The settings this config holds: the shared fields and the method's own."""
        return SHARED_FIELDS + setting_names(self.settings)

    @classmethod
    def baseline(cls, method: str, sparsity: float = 0.02, **settings) -> "UWMConfig":
        """A config of the paper's baselines: prune (α = 0) the top `sparsity` fraction of weights per layer.

        >>> UWMConfig.baseline("g_unsafe", sparsity=0.02, vision_targets=[])   # doctest: +SKIP

        `method` is "g_unsafe" or "g_safeclip"; `settings` set any other field (targets, batch_size...).
        """
        if method not in BASELINES:
            raise ValueError(f"UWMConfig.baseline: method must be one of {BASELINES}, got {method!r}.")
        fixed = sorted(set(settings) & {"method", "score", "selection", "density", "alpha"})
        if fixed:
            raise ValueError(f"UWMConfig.baseline sets {fixed} itself (fixed selection at `sparsity`, alpha=0); "
                             "use UWMConfig(...) directly for other settings.")
        return cls(method=method, selection="fixed", density=sparsity, alpha=0.0, **settings)

    def prior(self, tower: str) -> bool:
        return self.text_prior if tower == "text" else self.vision_prior

    def to_dict(self) -> dict:
        """The shared fields and the method's own settings, side by side (as in uwm_config.json)."""
        shared = copy.deepcopy({name: getattr(self, name) for name in SHARED_FIELDS})
        return {**shared, **dataclasses.asdict(self.settings)}

    @classmethod
    def from_dict(cls, data: dict) -> "UWMConfig":
        """A config from `to_dict` output; also the format before `method` (field `score`, every
        method's settings in one flat dict), whose settings of other methods are dropped."""
        if not isinstance(data, dict):
            raise TypeError(f"UWMConfig.from_dict expects a dict, got {type(data).__name__}.")
        data = dict(data)
        from .methods import DEFAULT_METHOD, get_method

        method = data.get("method") or data.get("score") or DEFAULT_METHOD
        legacy = "score" in data   # written before `method`: then every config held every method's settings
        data.pop("method", None)
        data.pop("score", None)
        own = setting_names(get_method(method).settings_class)
        if legacy:
            data = {k: v for k, v in data.items() if k in SHARED_FIELDS or k in own}
        saved_defaults = get_method(method).settings_class.saved_defaults
        if all(k in data for k in own if k not in saved_defaults):   # written whole, before those fields existed
            data = {**saved_defaults, **data}
        unknown = sorted(set(data) - set(SHARED_FIELDS) - set(own))
        if unknown:
            raise ValueError(f"Unknown UWMConfig field(s) {unknown} for method={method!r}; its fields are "
                             f"{sorted(SHARED_FIELDS + own + ('method',))}.")
        return cls(method=method, **data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "UWMConfig":
        return cls.from_json_string(Path(path).read_text())

    @classmethod
    def from_json_string(cls, text: str) -> "UWMConfig":
        return cls.from_dict(json.loads(text))


SHARED_FIELDS = tuple(f.name for f in dataclasses.fields(UWMConfig) if f.name != "settings")
# The paper's training-free baselines: gradient magnitudes, pruned at a sparsity.
BASELINES = ("g_unsafe", "g_safeclip")


def _settings_for(method: str, settings, given: dict) -> MethodSettings:
    """`method`'s settings: `settings` (its own, or another method's whose fields of the same name
    carry over, or a dict), updated with `given`; refuses a keyword that is no setting of `method`."""
    from .methods import get_method

    settings_class = get_method(method).settings_class
    own = setting_names(settings_class)
    if isinstance(settings, MethodSettings):
        carried = {name: getattr(settings, name) for name in setting_names(settings) if name in own}
    elif isinstance(settings, dict):
        carried, given = {}, {**settings, **given}
    elif settings is None:
        carried = {}
    else:
        raise TypeError(f"settings must be a dict or the method's settings dataclass, got {type(settings).__name__}.")
    unknown = sorted(set(given) - set(own))
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not {'a setting' if len(unknown) == 1 else 'settings'} of "
                         f"method={method!r}; its own settings are {sorted(own)}, and every method has "
                         f"{sorted(SHARED_FIELDS)}.")
    return settings_class(**{**carried, **given})
