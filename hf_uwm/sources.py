"""Any source the command line takes, as calibration pairs or a zero-shot task: an organism world by its
name ('organism', 'organism-hard'), or a Hub dataset, a folder or a data file.

Above `data` and `organism` (it knows both), so the library's lower modules never reach the organism.
"""

from __future__ import annotations

from collections.abc import Mapping

from .data import load_pairs, read_source
from .paths import ORGANISM_WORLDS


def load_data(source: str, split: str = "train", samples: int | None = None, seed: int = 0,
              columns: Mapping[str, str] | None = None, default: int = 512, skip_bad_rows: bool = False,
              token: str | None = None):
    """Pairs from any source the command line takes: 'organism' / 'organism-hard' (`default` pairs of that
    world unless `samples` says), or a Hub id, folder or data file (`load_pairs`)."""
    if source in ORGANISM_WORLDS:
        from .organism import make_pairs

        return make_pairs(default if samples is None else samples, seed=seed, split=split,
                          world=ORGANISM_WORLDS[source])
    return load_pairs(source, split=split, samples=samples, seed=seed, columns=columns,
                      skip_bad_rows=skip_bad_rows, **({"token": token} if token else {}))


def load_zero_shot(source: str | None, n: int = 500, seed: int = 0, split: str = "test"):
    """A `ZeroShotTask`: `n` images of an organism world's `split`, or a dataset with image and ClassLabel
    label columns; None for no source."""
    from .evaluation import ZeroShotTask

    if source is None:
        return None
    if source in ORGANISM_WORLDS:
        from .organism import zero_shot_task

        # the organism's zero-shot images of `split`: a sweep's validation never sees test combinations
        return ZeroShotTask(*zero_shot_task(n, seed=seed, split=split, world=ORGANISM_WORLDS[source]))
    dataset, _ = read_source(source, "test", None, {})   # the reader of load_pairs, without the pair schema
    return ZeroShotTask.from_dataset(dataset)
