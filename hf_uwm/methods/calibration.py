"""One calibration run: the pairs, this process's shard of them, batching in `DataLoader` workers,
the preprocessed batches kept between passes, and checkpoints.

Every method's `calibrate(editor, run)` gets a `Calibration`; a method that passes over the pairs
many times (the iterative ones) replays the kept batches instead of preprocessing again, and a
resumable one saves and reads its checkpoints here.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property, partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from ..data import PreprocessedPairs, data_fingerprint, text_only_rows
from ..files import save_file_atomic


KEEP_BYTES = 2**30   # preprocessed inputs a calibration may keep in memory between passes


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
        if "text_only" in self.__dict__:   # known already: not read from the images again
            subset.text_only = [self.text_only[row] for row in rows]
        return subset

    @cached_property
    def text_only(self) -> list[bool]:
        """One flag per pair of the run: True where it has texts and no images."""
        return text_only_rows(self.dataset)

    def with_images(self) -> "Calibration":
        """The run on its pairs that have images (itself when every pair has them)."""
        if not any(self.text_only):
            return self
        return self.subset([row for row, alone in enumerate(self.text_only) if not alone])

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
