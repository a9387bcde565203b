"""What every method shares: the `Method` interface the editor calls, the registry, and one calibration run.

A method is one module: a `Method` subclass that declares what it is (name, title, help line, card
text, the model families it edits, its own settings dataclass, which settings re-select without a
forward pass) and implements `calibrate`, then `register_method(TheMethod())`. The config, the
command line, model cards, sweeps and demos read everything from the registry.

A method turns calibration pairs into per-weight scores of the target layers (`calibrate`), and
scores into the delta, sorted flat indices per layer (`select`). Most methods score every weight
once and select per layer or over one shared budget; an iterative method instead returns what
`select` needs to rebuild its delta (the round in which each weight was flipped).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from ..settings import MethodSettings, is_number, setting, setting_info, setting_names
from ..data import PreprocessedPairs, data_fingerprint
from ..delta import save_file_atomic
from ..families import PROJECTOR
from ..selection import select_adaptive, select_fixed, select_shared


KEEP_BYTES = 2**30   # preprocessed inputs a calibration may keep in memory between passes
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

    def calibrate(self, editor: Edit, run: "Calibration") -> dict[str, torch.Tensor]:
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


class Calibration:
    """One calibration run: the pairs, this process's shard of them, batching, progress, checkpoints."""

    def __init__(self, dataset, state, family, batch_size: int, *, progress: bool = True, num_workers: int = 0,
                 checkpoint_dir=None, checkpoint_every: int = 50, autocast=None):
        if autocast not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast!r}.")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}.")
        if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be a positive number of batches, got {checkpoint_every!r}.")
        self.dataset, self.state, self.family, self.batch_size = dataset, state, family, batch_size
        self.progress, self.num_workers = progress, num_workers
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every, self.autocast_dtype = checkpoint_every, autocast
        self._kept: list | None = None
        self.trajectory: list | None = None   # filled by iterative methods: one `stopping.Step` per round
        self.image_embeddings: list | None = None   # kept by methods whose images do not change
        self.curvature: dict | None = None   # kept by iterative attribution between its refreshes

    def subset(self, rows: list[int]) -> "Calibration":
        """The same run on the pairs at `rows` only (padded to the same text length as the whole run)."""
        subset = Calibration(self.dataset.select(rows), self.state, self.family, self.batch_size,
                             progress=self.progress, num_workers=self.num_workers, checkpoint_dir=self.checkpoint_dir,
                             checkpoint_every=self.checkpoint_every, autocast=self.autocast_dtype)
        if not isinstance(self.dataset, PreprocessedPairs) and "safe_text" in self.dataset.column_names:
            subset.text_length = self.text_length
        return subset

    def autocast(self):
        return torch.autocast(self.family.device.type, dtype=self.autocast_dtype,
                              enabled=self.autocast_dtype is not None)

    def batch_bounds(self) -> list[tuple[int, int]]:
        """This process's batches: the batches one process would make, dealt out in contiguous runs whose
        counts differ by at most one (no padding, no repeats). Whole batches, so that a statistic of a
        batch (G-Safe-CLIP's contrastive loss) is the same under any number of processes."""
        n = len(self.dataset)
        batches = [(s, min(s + self.batch_size, n)) for s in range(0, n, self.batch_size)]
        per, extra = divmod(len(batches), self.state.num_processes)
        rank = self.state.process_index
        start = rank * per + min(rank, extra)
        return batches[start:start + per + (rank < extra)]

    def batches(self, preprocess, desc: str, first: int = 0, leave: bool = True, keep: bool = False):
        """(batch index, rows, CPU inputs) for this process's shard, preprocessed in DataLoader workers.

        With `keep`, a full pass whose inputs take at most `KEEP_BYTES` is kept in memory and
        replayed by the next `keep` pass instead of preprocessing again (methods that pass over the
        same pairs many times; the preprocessing must be the same each time).
        """
        from torch.utils.data import DataLoader

        bounds = self.batch_bounds()
        disable = not (self.progress and self.state.is_main_process)
        if keep and self._kept is not None:
            for i, inputs in enumerate(tqdm(self._kept, desc=desc, leave=leave, disable=disable)):
                yield i, list(range(*bounds[i])), inputs
            return
        loader = DataLoader(_PreprocessedBatches(self.dataset, bounds[first:], preprocess), batch_size=None,
                            num_workers=self.num_workers)
        kept, size = ([] if keep and first == 0 else None), 0
        for i, inputs in enumerate(tqdm(loader, desc=desc, total=len(bounds), initial=first, leave=leave,
                                        disable=disable), start=first):
            if kept is not None:
                size += sum(t.numel() * t.element_size() for t in _tensors(inputs))
                kept = kept if size <= KEEP_BYTES else None
                if kept is not None:
                    kept.append(inputs)
            yield i, list(range(*bounds[i])), inputs
        if keep:
            self._kept = kept

    def preprocess(self, tower: str):
        """rows (a dict of columns) -> CPU inputs of [safe items; unsafe items] of one tower;
        rows of `PreprocessedPairs` -> their inputs of that tower."""
        if isinstance(self.dataset, PreprocessedPairs):
            return partial(PreprocessedPairs.inputs, tower=tower)
        family = self.family
        if tower == "text":
            return _Columns(partial(family.preprocess_text, length=self.text_length), "safe_text", "unsafe_text")
        return _Columns(family.preprocess_images, "safe_image", "unsafe_image")

    @cached_property
    def text_length(self) -> int:
        """The length every text of the run is padded to, from all the pairs (every process's shard
        alike), computed once: a text's padding never depends on its batch or shard."""
        return self.family.text_length(list(self.dataset["safe_text"]) + list(self.dataset["unsafe_text"]))

    # --- checkpoints ---------------------------------------------------------------------------
    def checkpoint(self, name: str, weights_fingerprint: str, settings: dict):
        """(path, key) of this process's checkpoint `name`, or (None, None) without checkpoint_dir.

        The key hashes everything that determines the saved state: a checkpoint written for other
        data, weights, settings or process layout is refused by `read_checkpoint`.
        """
        if self.checkpoint_dir is None:
            return None, None
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        rank = self.state.process_index
        parts = dict(name=name, weights=weights_fingerprint, data=data_fingerprint(self.dataset), rows=len(self.dataset),
                     settings=settings, processes=self.state.num_processes, rank=rank)
        key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
        return self.checkpoint_dir / f"{name}-rank{rank}.safetensors", key


def broadcast_from_main(value):
    """The main process's `value` on every process (a dict of tensors comes back on each one's device)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    devices = _devices(value)
    shared = [_to_cpu(value)]
    dist.broadcast_object_list(shared, src=0)
    return _to_devices(shared[0], devices)


def _devices(value):
    return {k: v.device for k, v in value.items()} if isinstance(value, dict) and all(
        isinstance(v, torch.Tensor) for v in value.values()) else None


def _to_cpu(value):
    return {k: v.cpu() for k, v in value.items()} if _devices(value) is not None else value


def _to_devices(value, devices):
    return {k: v.to(devices[k]) for k, v in value.items()} if devices is not None else value


def scale_(weight: torch.Tensor, idx: torch.Tensor, alpha: float) -> torch.Tensor:
    """W.flat[idx] *= α in place, without autograd; returns the values before the change."""
    with torch.no_grad():
        flat = weight.view(-1)
        idx = idx.to(flat.device)
        before = flat[idx].clone()
        flat[idx] = before * alpha
    return before


def all_reduce_(tensors):
    """Sum each tensor over the processes, in place (nothing to do in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)


def save_checkpoint(path: Path, key: str, tensors: dict[str, torch.Tensor], **meta):
    """Atomically: a kill at any point leaves the previous checkpoint intact."""
    save_file_atomic(tensors, path, {"key": key, **{k: str(v) for k, v in meta.items()}})


def read_checkpoint(path: Path, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, metadata) saved by `save_checkpoint` with the same key; None if there is none."""
    if path is None or not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                raise ValueError(
                    f"The checkpoint {path} was written for other data, model weights or settings; delete it "
                    "or pass another checkpoint_dir to start afresh.")
            return {name: f.get_tensor(name) for name in f.keys()}, meta
    except SafetensorError as err:
        raise ValueError(f"The checkpoint {path} is corrupted ({err}); delete it to start afresh.") from None


def _tensors(inputs):
    """The tensors of a batch's inputs: a dict of tensors, or a tuple of such dicts (None: an input
    the method does not need, as the safe images of caption_iterative without its knowledge terms)."""
    if inputs is None:
        return []
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    values = inputs.values() if isinstance(inputs, dict) else inputs
    return [t for value in values for t in _tensors(value)]


class _Columns:
    """rows -> preprocess(safe column + unsafe column) (picklable for DataLoader workers)."""

    def __init__(self, preprocess, safe: str, unsafe: str):
        self.preprocess, self.safe, self.unsafe = preprocess, safe, unsafe

    def __call__(self, rows):
        return self.preprocess(rows[self.safe] + rows[self.unsafe])


class _PreprocessedBatches(torch.utils.data.Dataset):
    """Batch i = the preprocessed [safe; unsafe] items of rows bounds[i] (picklable for workers)."""

    def __init__(self, dataset, bounds, preprocess):
        self.dataset, self.bounds, self.preprocess = dataset, bounds, preprocess

    def __len__(self):
        return len(self.bounds)

    def __getitem__(self, i):
        return self.preprocess(self.dataset[slice(*self.bounds[i])])
