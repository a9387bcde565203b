"""`UWMEditor`: calibrate, select, apply, revert and save a UWM edit."""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from . import __version__, loading
from .config import UWMConfig
from .data import IMAGE_COLUMNS, TEXT_COLUMNS, columns_for, validate_pairs
from .delta import (CONFIG_NAME, FORMAT_VERSION, fingerprint, fingerprint_in_background, read_delta, resolve_delta_folder,
                    scale_, write_delta)
from .distributed import broadcast_from_main
from .families import FAMILIES, ModelFamily
from .files import save_file_atomic
from .hints import hint
from .hub import push_edit, render_card
from .methods import Calibration, Method, get_method
from .methods.stopping import Step, from_records, to_records
from .paths import local_base_folder, portable_base_name
from .selection import layer_generator, select_random


class UWMEditor:
    """A UWM edit of one CLIP, SigLIP or LLaVA model.

    >>> editor = UWMEditor(model, processor, UWMConfig(tau=0.02))   # doctest: +SKIP
    >>> editor.calibrate(pairs); model = editor.apply()               # doctest: +SKIP
    """

    def __init__(self, model, processor=None, config: UWMConfig | None = None, *,
                 base_model: str | None = None, base_revision: str | None = None):
        config = UWMConfig() if config is None else config
        if not isinstance(config, UWMConfig):
            raise TypeError(f"config must be a UWMConfig, got {type(config).__name__}.")
        self.model, self.processor = model, processor
        self.family = ModelFamily(model, processor)
        get_method(config.method).check(self.family, config)
        self.config = self._resolved(config)
        self.layers = {tower: self.family.target_layers(tower, self._targets(tower)) for tower in self.towers}
        if not any(self.layers.values()):
            raise ValueError("The config targets no layer: give text_targets or vision_targets a module name.")
        self.base_model = base_model or getattr(model.config, "_name_or_path", "") or None
        self.base_revision = base_revision or getattr(model.config, "_commit_hash", None)
        # Per target layer what the method's `calibrate` returned: a score per weight, or for a
        # method that edits in rounds the round in which each weight was flipped (0: never).
        self.scores: dict[str, torch.Tensor] = {}
        self.trajectory: list[Step] | None = None   # per round, for methods that edit in rounds
        # the `concept`s of the text-only calibration pairs: what the edit knows of in words alone
        self.concepts_in_words: list[str] = []
        self.delta: dict[str, torch.Tensor] = {}
        self.fingerprint: str | None = None
        self._originals: dict[str, torch.Tensor] | None = None

    # --- configuration ---------------------------------------------------------------------
    def _resolved(self, config: UWMConfig) -> UWMConfig:
        """The config with family and method defaults written out, so a saved delta is explicit."""
        method = get_method(config.method)
        targets = {f"{t}_targets": list(method.default_targets(self.family, t))
                   if getattr(config, f"{t}_targets") is None else getattr(config, f"{t}_targets")
                   for t in ("text", "vision")}
        if "text" not in self.family.towers and targets["text_targets"]:
            raise ValueError(f"{type(self.model).__name__} has no text tower to edit: set text_targets=[].")
        shared = method.shared_budget_default if config.shared_budget is None else config.shared_budget
        return dataclasses.replace(config, shared_budget=shared, **targets,
                                   **method.resolved_settings(self.family, config))

    def _targets(self, tower: str) -> list[str]:
        return getattr(self.config, f"{tower}_targets")

    @property
    def towers(self) -> tuple[str, ...]:
        return tuple(t for t in self.family.towers if self._targets(t))

    @property
    def target_layers(self) -> dict:
        return {name: layer for layers in self.layers.values() for name, layer in layers.items()}

    # --- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, config: UWMConfig | None = None, *, model=None,
                        processor=None, revision: str | None = None, subfolder: str | None = None,
                        token: str | bool | None = None, cache_dir: str | Path | None = None,
                        local_files_only: bool = False, force_download: bool = False,
                        trust_remote_code: bool = False, **model_kwargs) -> "UWMEditor":
        """An editor for a base model (Hub id, local folder or `organism`), or a saved delta and its base model.

        `revision` and `subfolder` locate `name_or_path` (the delta, when it is one; its base model is
        then loaded at the revision the delta recorded). `token`, `cache_dir`, `local_files_only` and
        `force_download` go to every download: the delta, the config, the weights and the processor.
        `model_kwargs` go to the model's `from_pretrained`: `device_map="auto"` and
        `dtype=torch.bfloat16` let a 13B LLaVA calibrate on one GPU. A `processor` you pass is used
        instead of the one saved with the model.
        """
        download = dict(token=token, cache_dir=cache_dir, local_files_only=local_files_only,
                        force_download=force_download)
        folder = resolve_delta_folder(name_or_path, revision, subfolder=subfolder, **download)
        if folder is None:
            if model is None:
                model, loaded = loading.load_model(name_or_path, revision, trust_remote_code, subfolder=subfolder,
                                                   **download, **model_kwargs)
                processor = processor or loaded
            return cls(model, processor, config, base_model=str(name_or_path), base_revision=revision)
        if config is not None:
            raise ValueError(f"{name_or_path} is a saved delta and carries its own config: drop config=, or "
                             "load the base model and calibrate again to use other settings.")
        record, indices = read_delta(folder)
        given = model is not None
        if not given:
            if not record.get("base_model"):
                raise ValueError(f"The delta {name_or_path} was made on a local model folder "
                                 f"({record.get('base_model_folder') or 'name not recorded'!r}), whose path it does "
                                 "not record: " + hint(
                                     "load that model and pass it, e.g. UWMEditor.from_pretrained("
                                     f"{str(name_or_path)!r}, model=model, processor=processor).",
                                     "give its folder with --base PATH."))
            model, loaded = loading.load_model(record["base_model"], record.get("base_revision"), trust_remote_code,
                                               **download, **model_kwargs)
            processor = processor or loaded
        editor = cls(model, processor, _saved_config(record, folder),
                     base_model=record["base_model"], base_revision=record.get("base_revision"))
        editor._adopt_delta(record, indices, given)
        return editor

    def _adopt_delta(self, record: dict, indices: dict[str, torch.Tensor], given: bool = True):
        """Take the delta of `record` for this model, refusing a model it was not made on (before any work).

        `given`: the model came from the caller (model=, or `--base`), not from the delta's record, so an
        error names it rather than the download.
        """
        base = record.get("base_model")
        base = repr(base) if base else "a local model folder" + (
            f" {record['base_model_folder']!r}" if record.get("base_model_folder") else "")
        this = hint("the model passed as model=", "the model of --base") if given else f"the model loaded for {base}"
        if not given:
            fix = "load that exact checkpoint (float32 or bfloat16)."
        elif record.get("base_model"):
            fix = hint(f"drop model= (the delta loads {base} itself) or pass that model.",
                       f"drop --base: the delta loads {base} itself.")
        else:
            fix = hint(f"pass the model it was made on ({base}) as model=.",
                       f"give the model it was made on ({base}) with --base.")
        made_on = FAMILIES.get(record.get("model_class"))  # None: an older record, or a class hf_uwm can't tell
        if made_on is not None and made_on != self.family.spec:
            raise ValueError(f"The delta was made on a {record['model_class']} ({made_on.name}) and {this} is a "
                             f"{type(self.model).__name__} ({self.family.spec.name}): {fix}")
        layers = self.target_layers
        shapes = {name: list(layer.weight.shape) for name, layer in layers.items()}
        expected = {name: info["shape"] for name, info in record["layers"].items()}
        if shapes != expected:
            raise ValueError(f"The delta was made for {len(expected)} layers ({min(expected)}, ...) that {this} "
                             f"(a {type(self.model).__name__}) lacks or has in other shapes: {fix}")
        self.delta, self.fingerprint = indices, record["fingerprint"]
        self.trajectory = from_records(record.get("trajectory"))
        self.concepts_in_words = record.get("concepts_in_words", [])
        # Before anyone spends time evaluating or calibrating the wrong model; nothing is applied yet.
        if fingerprint(self.target_layers) != self.fingerprint:
            again = hint(" (Or revert an edit already applied to it.)", "") if given else ""
            raise ValueError(f"The target weights of {this} differ from the base model this delta was made on "
                             f"({base}): {fix}{again}")

    # --- calibration ---------------------------------------------------------------------------
    @property
    def method(self) -> Method:
        return get_method(self.config.method)

    def calibrate(self, dataset=None, *, progress: bool = True, checkpoint_dir: str | Path | None = None,
                  checkpoint_every: int = 50, num_workers: int = 0,
                  autocast: torch.dtype | None = None) -> "UWMEditor":
        """Compute the scores of every target layer from safe/unsafe pairs, then select the delta.

        `dataset`: a pair set (see `hf_uwm.data`), or `hf_uwm.data.PreprocessedPairs` of ready model
        inputs, which needs neither `datasets` nor a processor.

        Under `accelerate launch` each process takes a disjoint shard of the pairs and the sums are
        all-reduced. With `checkpoint_dir` a run started again with the same arguments resumes where
        it stopped: UWM statistics save their running sums every `checkpoint_every` batches, the
        iterative attribution every finished round. `num_workers` decode and preprocess batches in
        DataLoader worker processes. `autocast` (e.g. `torch.bfloat16`) runs the forward in mixed
        precision; statistics and gradients are summed in float32 or float64. Loading the model
        itself in bfloat16 (`torch_dtype=torch.bfloat16`) works too. The model is left unedited.
        """
        from accelerate import PartialState

        if self._originals is not None:
            raise RuntimeError("The edit is applied: call revert() before calibrating again.")
        method = self.method
        if checkpoint_dir is not None and not method.resumable:
            raise ValueError(f"checkpoint_dir applies to UWM statistics and the iterative methods, not to "
                             f"method={self.config.method!r} (one pass over the pairs).")
        # Hashed while the forward passes run, where the method only reads the weights and no
        # checkpoint key needs it first.
        pending_fingerprint = fingerprint_in_background(self.target_layers)
        overlap = method.leaves_weights_untouched and checkpoint_dir is None
        self.fingerprint = None if overlap else pending_fingerprint.result()
        # On CPU, accelerate only joins the processes of a launcher when told the model is on the CPU.
        state = PartialState(cpu=self.family.device.type == "cpu")
        columns = columns_for(method.data_towers(self))
        # Where the columns need images, a pair may still have none (text-only), if the method takes it.
        text_only = set(TEXT_COLUMNS + IMAGE_COLUMNS) <= set(columns)
        if columns:
            if dataset is None:
                raise ValueError(f"calibrate needs a dataset with columns {list(columns)}.")
            dataset = validate_pairs(dataset, columns, text_only=text_only)
        run = Calibration(dataset, state, self.family, self.config.batch_size, progress=progress,
                          num_workers=num_workers, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                          autocast=autocast)
        self.concepts_in_words = self._text_only_concepts(run) if text_only else []
        self.scores = method.calibrate(self, run)
        self.trajectory = run.trajectory
        self.fingerprint = pending_fingerprint.result()
        # Selection runs where the scores were summed (a GPU model selects on the GPU); the editor
        # then keeps scores and delta on the CPU.
        self.delta = broadcast_from_main({name: idx.cpu() for name, idx in self.select().items()}
                                         if state.is_main_process else None)
        self.scores = {name: s.cpu() for name, s in self.scores.items()}
        return self

    def _text_only_concepts(self, run: Calibration) -> list[str]:
        """The `concept`s of the run's text-only pairs, once the method has accepted them."""
        alone = run.text_only
        if not any(alone):
            return []
        self.method.check_text_only(self, sum(alone), len(alone))
        concepts = run.dataset["concept"] if "concept" in run.dataset.column_names else [None] * len(alone)
        return sorted({c for c, a in zip(concepts, alone) if a and c})

    # --- selection ------------------------------------------------------------------------------
    def select(self) -> dict[str, torch.Tensor]:
        """The delta (sorted flat indices per layer) that the current config selects from `scores`."""
        if not self.scores:
            raise ValueError("No scores yet: call calibrate(dataset) first.")
        return self.method.select(self.scores, self.config, self.trajectory)

    @property
    def stop(self) -> tuple[int, str | None] | None:
        """(rounds kept, why the edit stopped) for a method that edits in rounds, else None; from the
        scores and trajectory of a calibration, or the config and trajectory of a loaded delta."""
        kept_rounds = getattr(self.method, "kept_rounds", None)
        if kept_rounds is None or not (self.scores or self.delta):
            return None
        return kept_rounds(self.scores, self.config, self.trajectory)

    def with_settings(self, **changes) -> "UWMEditor":
        """An editor of the same model re-selected from the cached scores: no forward pass.

        `changes` may set what the method's selection reads (tau, alpha, selection, density,
        shared_budget; for iterative attribution: fewer rounds), and text_targets / vision_targets
        to a subset of the layers already scored (not for iterative attribution).
        """
        allowed = self.method.reselectable()
        if set(changes) - allowed:
            raise ValueError(f"with_settings can change {sorted(allowed)} only for method={self.config.method!r}; "
                             f"{sorted(set(changes) - allowed)} change the scores themselves: calibrate again.")
        if not self.scores:
            raise ValueError("No scores to re-select from: calibrate(dataset) or load_scores(path) first.")
        edited = UWMEditor(self.model, self.processor, dataclasses.replace(self.config, **changes),
                           base_model=self.base_model, base_revision=self.base_revision)
        missing = sorted(set(edited.target_layers) - set(self.scores))
        if missing:
            raise ValueError(f"No cached scores for {missing[:3]}: targets can only shrink to layers already "
                             "scored; calibrate with those targets to score them.")
        edited.scores = {name: self.scores[name] for name in edited.target_layers}
        edited.trajectory = self.trajectory
        if set(edited.target_layers) == set(self.target_layers):
            edited.fingerprint = self.fingerprint
        elif self.is_applied or fingerprint(self.target_layers) != self.fingerprint:
            raise RuntimeError("Re-select a subset of layers from the unedited model: revert() the edit first.")
        else:
            edited.fingerprint = fingerprint(edited.target_layers)
        edited.delta = edited.select()
        return edited

    def save_scores(self, path: str | Path) -> Path:
        """Cache the scores (safetensors) so new settings can be selected later without a forward pass."""
        if not self.scores:
            raise ValueError("No scores to save: call calibrate(dataset) first.")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": "hf_uwm.scores", "config": self.config.to_json_string(), "fingerprint": self.fingerprint,
                "model_class": type(self.model).__name__,
                **({"trajectory": json.dumps(to_records(self.trajectory))} if self.trajectory else {})}
        save_file_atomic(self.scores, path, meta)
        return path

    def load_scores(self, path: str | Path) -> "UWMEditor":
        """Load scores saved by `save_scores` for this same model, then select with this editor's config."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(Path(path), framework="pt") as f:
                meta = f.metadata() or {}
                scores = {n: f.get_tensor(n) for n in f.keys()}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"Cannot read scores from {path} ({err}); save them again with save_scores.") from None
        if meta.get("format") != "hf_uwm.scores":
            raise ValueError(f"{path} is not a score cache written by UWMEditor.save_scores.")
        saved = UWMConfig.from_json_string(meta["config"])
        differing = [f for f in get_method(saved.method).score_settings
                     if getattr(saved, f, None) != getattr(self.config, f, None)]
        if differing:
            raise ValueError(f"The cached scores were computed with other {differing}; use an editor with the "
                             f"same score settings (only {list(self.method.selection_settings)} may differ).")
        if meta.get("fingerprint") != fingerprint(self.target_layers):
            raise ValueError(f"The cached scores in {path} belong to other model weights.")
        self.scores, self.fingerprint = scores, meta["fingerprint"]
        self.trajectory = from_records(json.loads(meta.get("trajectory", "[]")))
        self.delta = self.select()
        return self

    def random_control(self, seed: int | None = None) -> "UWMEditor":
        """An editor of the same model whose delta flips as many weights per layer, chosen at random."""
        if not self.delta:
            raise ValueError("The random control copies a delta's sizes: calibrate or load a delta first.")
        seed = self.config.seed if seed is None else seed
        control = UWMEditor(self.model, self.processor, dataclasses.replace(self.config, method="random", seed=seed),
                            base_model=self.base_model, base_revision=self.base_revision)
        control.fingerprint = self.fingerprint
        for i, (name, idx) in enumerate(self.delta.items()):
            control.delta[name] = select_random(self.target_layers[name].weight.numel(), idx.numel(),
                                                layer_generator(seed, i))
        return control

    # --- manipulation ---------------------------------------------------------------------------
    def apply(self):
        """Multiply the selected weights by α in place; returns the edited model."""
        if not self.delta:
            raise ValueError("Nothing to apply: call calibrate(dataset) first, or load a saved delta.")
        if self._originals is not None:
            raise RuntimeError("The edit is already applied; applying it twice would compound it "
                               "(with alpha=-1 it would undo it). Call revert() first.")
        self.check_base()
        layers = self.target_layers
        self._originals = {name: scale_(layers[name].weight, idx, self.config.alpha)
                           for name, idx in self.delta.items()}
        return self.model

    @contextmanager
    def applied(self):
        """`with editor.applied() as model:` the edit applied inside the block, and the model as it
        was before it afterwards, also on error (an edit the caller applied stays applied)."""
        if self.is_applied:
            yield self.model
            return
        self.apply()
        try:
            yield self.model
        finally:
            self.revert()

    def revert(self):
        """Restore the original weights bit for bit; returns the model."""
        if self._originals is None:
            raise RuntimeError("Nothing to revert: the edit is not applied.")
        layers = self.target_layers
        with torch.no_grad():
            for name, values in self._originals.items():
                layers[name].weight.view(-1)[self.delta[name].to(values.device)] = values
        self._originals = None
        return self.model

    def check_base(self):
        """Raise ValueError unless the model's target weights are those the delta was computed on."""
        if fingerprint(self.target_layers) != self.fingerprint:
            raise ValueError("The target weights differ from the base model this delta was computed on "
                             f"({self.base_model or 'a local model folder'!r}; sha256 of its target weights rounded "
                             "to bfloat16): load that exact checkpoint (float32 or bfloat16), or revert an edit "
                             "already applied to it.")

    @property
    def is_applied(self) -> bool:
        return self._originals is not None

    # --- saving ----------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Number of selected weights per tower."""
        return {tower: sum(int(self.delta[n].numel()) for n in self.layers[tower] if n in self.delta)
                for tower in self.towers}

    def record(self) -> dict:
        """The content of `uwm_config.json`.

        The base model is recorded as a Hub id or `organism`; a local folder only by its name
        (`base_model_folder`), since its path means nothing on another machine.
        """
        layers = self.target_layers
        base = portable_base_name(self.base_model)
        local_folder = None if base or not self.base_model else Path(str(self.base_model)).expanduser().name
        return {
            "format_version": FORMAT_VERSION,
            "hf_uwm_version": __version__,
            "model_class": type(self.model).__name__,
            "base_model": base,
            **({"base_model_folder": local_folder} if local_folder else {}),
            "base_revision": self.base_revision,
            "config": self.config.to_dict(),
            "fingerprint": self.fingerprint,
            "fingerprint_dtype": "bfloat16",
            "layers": {name: {"shape": list(layers[name].weight.shape), "selected": int(idx.numel()),
                              "tower": next(t for t in self.towers if name in self.layers[t])}
                       for name, idx in self.delta.items()},
            "counts": self.counts(),
            **({"concepts_in_words": self.concepts_in_words} if self.concepts_in_words else {}),
            **self._stop_record(),
        }

    def _stop_record(self) -> dict:
        """`trajectory` (the held-out measures per round) and `stop` of a method that edits in rounds."""
        stop = self.stop
        if stop is None:
            return {}
        record = {"stop": {"rounds": stop[0], "reason": stop[1], "max_rounds": self.config.rounds}}
        if self.trajectory:
            record["trajectory"] = to_records(self.trajectory)
        return record

    def save_pretrained(self, save_directory: str | Path, report=None, *, is_main_process: bool = True,
                        dataset_name: str | None = None, zero_shot_dataset: str | None = None,
                        overwrite: bool = False, peft: bool = False) -> Path:
        """Save the delta (not the base model) to a folder: config, indices and a model card.

        With `peft=True` the folder also holds the same edit as a peft SHiRA adapter
        (`adapter_config.json`, `adapter_model.safetensors`; see `hf_uwm.peft_adapter`), which
        `PeftModel.from_pretrained(base_model, folder)` loads without hf_uwm.

        The folder must be new or empty; one that holds a delta is replaced only with `overwrite=True`,
        and one that holds anything else never is.

        Under several processes, pass `is_main_process=state.is_main_process` (as with peft): only
        that one writes. `report`, `dataset_name` and `zero_shot_dataset` fill the card's evaluation.
        """
        if not self.delta:
            raise ValueError("Nothing to save: call calibrate(dataset) first.")
        if self.config.alpha == 1:
            warnings.warn("alpha=1 multiplies the selected weights by 1: this delta changes nothing.", stacklevel=2)
        if not is_main_process:
            return Path(save_directory)
        record = self.record()
        card = render_card(record, report, dataset_name=dataset_name, zero_shot_dataset=zero_shot_dataset,
                           base_folder=local_base_folder(self.base_model), peft=peft)
        return write_delta(save_directory, record, self.delta, card, overwrite=overwrite,
                           extra=self._adapter_writer(record) if peft else None)

    def _adapter_writer(self, record: dict):
        """A function that writes the peft adapter into a folder; the base weights at the selected positions
        are read now (from before the edit, when it is applied), so no later change can enter the adapter."""
        from .peft_adapter import require_peft, write_adapter

        require_peft()
        if self.is_applied:
            selected = self._originals
        else:
            self.check_base()  # the adapter's values are (α − 1)·W of the weights the fingerprint names
            layers = self.target_layers
            selected = {name: layers[name].weight.detach().view(-1)[idx.to(layers[name].weight.device)]
                        for name, idx in self.delta.items()}
        return functools.partial(write_adapter, record=record, delta=self.delta, selected_weights=selected,
                                 model=self.model)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, revision: str | None = None,
                    commit_message: str | None = None, commit_description: str | None = None,
                    create_pr: bool = False, merged: bool = False, token: str | None = None, report=None,
                    license: str | None = None, dataset_name: str | None = None,
                    zero_shot_dataset: str | None = None, overwrite: bool = False, peft: bool = False):
        """Upload the delta and its model card (with `merged`, also the edited checkpoint; with `peft`, also
        the same edit as a peft SHiRA adapter, see `save_pretrained`) in one commit.

        `report`: an EvaluationReport, or {"base": r0, "UWM": r1, ...} for a before/after table, on
        `dataset_name` (and `zero_shot_dataset`), Hub dataset ids or display names. `create_pr=True`
        opens a pull request instead of committing to the branch. A repo holding anything but an
        hf_uwm delta of the same base model is refused unless `overwrite=True`. Returns the
        `CommitInfo` (its `pr_url` with `create_pr`); see `hf_uwm.hub.push_edit`.
        """
        return push_edit(self, repo_id, private=private, revision=revision, commit_message=commit_message,
                         commit_description=commit_description, create_pr=create_pr, merged=merged, token=token,
                         report=report, license=license, dataset_name=dataset_name,
                         zero_shot_dataset=zero_shot_dataset, overwrite=overwrite, peft=peft)


def _saved_config(record: dict, folder: Path) -> UWMConfig:
    """The delta's config, or an error that names its file (a method or field this hf_uwm does not know)."""
    try:
        return UWMConfig.from_dict(record["config"])
    except (ValueError, TypeError) as err:
        wrote = record.get("hf_uwm_version")
        who = f" (written by hf_uwm {wrote}; this is {__version__})" if wrote != __version__ else ""
        raise type(err)(f"{folder / CONFIG_NAME}: {err}{who} Fix the file, or install the hf_uwm that wrote "
                        "it.") from None
