"""The experiment protocol that `hf-uwm demo`, `hf-uwm demo-llava` and the research runs share.

Splits of an organism world (calibration, validation, test: disjoint renders) → calibrate → a grid of
settings on validation → one choice rule (`sweep.choose_or_fallback`, by the metric of the model:
`sweep.GS` for a contrastive model, `sweep.CAPTIONS` for a captioner) → the chosen edit on test beside
a random control of the same size. Sample sizes are arguments (`Sizes`), never module globals; the test
split is read only after every choice is made.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

from . import sweep as sw


@dataclass(frozen=True)
class Sizes:
    """How many items each split holds: calibration pairs, validation and test quadruples (or caption
    pairs), zero-shot images of the test and the validation split (0: none), bootstrap resamples."""

    calibration: int = 256
    validation: int = 1000
    test: int = 1000
    zero_shot: int = 0
    validation_zero_shot: int = 0
    bootstrap: int = 1000

    def __post_init__(self):
        bad = {k: v for k, v in dataclasses.asdict(self).items() if not isinstance(v, int) or v < 0}
        if bad or self.calibration < 1 or self.validation < 1 or self.test < 1:
            raise ValueError(f"Sizes are counts: give whole numbers >= 0 (calibration, validation and test >= 1), "
                             f"not {bad or dataclasses.asdict(self)}.")


def organism_splits(sizes: Sizes, *, seed: int = 0, world: int = 2) -> tuple:
    """(calibration, validation, test) pairs of an organism world, of `sizes`' sizes."""
    from .organism import make_pairs

    return tuple(make_pairs(n, seed=seed, split=split, world=world) for n, split in
                 ((sizes.calibration, "train"), (sizes.validation, "validation"), (sizes.test, "test")))


class Clock:
    """Wall seconds per named step, in order: `lap(step)` closes the step that began at the previous lap."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.seconds[step] = round(now - self._start, 1)
        self._start = now


@dataclass
class Outcome:
    """One method through the protocol: its validation rows, the chosen row and why it was shown
    (`sweep.STATUSES`), and the test reports of the chosen edit and of its random control."""

    rows: list
    chosen: sw.SweepRow
    status: str
    test: object
    control_test: object

    @property
    def edit(self):
        return self.chosen.editor


def choose_and_test(name: str, editor, grid: list[dict], *, calibration, on_validation: Callable,
                    on_test: Callable, base_validation, max_drop: float, criterion: sw.Criterion = sw.GS,
                    controls: bool = True, seed: int = 0, progress: bool = True, clock: Clock | None = None) -> Outcome:
    """Calibrate `editor` on `calibration`, measure every setting of `grid` with `on_validation(model)` (beside a
    random control when `controls`), choose by `criterion` within `max_drop` knowledge points of
    `base_validation`, then measure the choice and its random control with `on_test(model, row_name)`
    (row names: `name` and `random (name)`)."""
    lap = clock.lap if clock else lambda step: None
    editor.calibrate(calibration, progress=progress)
    lap(f"{name}: calibrate")
    rows = sw.sweep(editor, grid, on_validation, calibration=calibration, method=name, control_seed=seed,
                    controls=controls, progress=progress)
    lap(f"{name}: validation grid ({len(grid)} settings)")
    chosen, status = sw.choose_or_fallback(rows, base_validation, max_drop, criterion)
    test = sw.evaluate_edit(chosen.editor, lambda m: on_test(m, name))
    lap(f"{name}: test")
    control_test = sw.evaluate_edit(chosen.editor.random_control(seed=seed), lambda m: on_test(m, f"random ({name})"))
    lap(f"{name}: random control test")
    return Outcome(rows, chosen, status, test, control_test)
