"""The stopping rule of the self-setting iterative edits: how far to go, decided from calibration data.

An iterative method edits in rounds. After each round it measures, on a held-out slice of the
calibration pairs that never feeds a gradient, two numbers in percentage points:

- `goal`: how far the edit's aim is reached (100 = fully; e.g. the slice's GS);
- `cost`: what it has cost the model's knowledge so far (0 = nothing; e.g. how many points of a
  knowledge measure the slice lost against the unedited model).

The edit stops at the first round whose goal reaches `goal`, keeping that round, or at the first
round whose cost exceeds `knowledge_budget`, keeping the round before it, whichever comes first;
otherwise after the last round allowed. A cost no larger than what the measure can resolve on the
slice (`measures["cost_resolution"]`: one item's worth) never stops an edit, whatever the budget. A trajectory is the list of `Step`s, `trajectory[0]` the
unedited model (round 0).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..plots import plot_trajectory  # noqa: F401  (where the CLI imports it from, until it imports hf_uwm.plots)

GOAL_REACHED = "goal reached"
BUDGET_REACHED = "knowledge budget reached"
MAX_ROUNDS = "maximum rounds reached"


@dataclass
class Step:
    """The measures after one round (round 0: the unedited model)."""

    round: int
    goal: float            # percent of the aim reached on the held-out slice
    cost: float            # knowledge points lost on the held-out slice
    flipped: int           # weights edited in total after this round
    measures: dict = field(default_factory=dict)   # every other measure of the slice, for plots and cards

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Step":
        return cls(**data)


def to_records(trajectory: list[Step] | None) -> list[dict]:
    """The trajectory as JSON-ready dicts, round 0 first ([] for none)."""
    return [step.to_dict() for step in trajectory or []]


def from_records(records: list[dict] | None) -> list[Step] | None:
    """The `Step`s of `to_records` back (None when there are none)."""
    return [Step.from_dict(record) for record in records] if records else None


def stopping_round(trajectory: list[Step], goal: float | None, knowledge_budget: float | None,
                   max_rounds: int) -> tuple[int, str | None]:
    """(rounds to keep, reason) for a trajectory; reason None means the trajectory has not stopped yet.

    `goal` None: never stop for the goal; `knowledge_budget` None: no budget.
    """
    for step in trajectory[1:]:
        if step.round > max_rounds:
            break
        if knowledge_budget is not None and step.cost > max(knowledge_budget, step.measures.get("cost_resolution", 0)):
            return step.round - 1, BUDGET_REACHED
        if goal is not None and step.goal >= goal:
            return step.round, GOAL_REACHED
    done = min(trajectory[-1].round, max_rounds) if trajectory else 0
    return done, (MAX_ROUNDS if done >= max_rounds else None)


def summary(kept: int, reason: str | None, max_rounds: int) -> str:
    """One line for a model card or the CLI: 'stopped after 11 of 40 rounds: knowledge budget reached'."""
    text = f"stopped after {kept} of {max_rounds} rounds"
    return f"{text}: {reason}" if reason else text


def holdout_rows(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(rows that feed gradients, held-out rows) of n calibration pairs, both sorted.

    ⌈fraction · n⌉ rows are held out (none when fraction is 0), drawn by a permutation keyed by
    `seed` alone, so every process and every resumed run holds out the same rows.
    """
    import math

    import torch

    count = math.ceil(fraction * n) if fraction > 0 else 0
    if count and count >= n:
        raise ValueError(f"Holding out {count} of {n} calibration pairs leaves none for the gradients: give more "
                         "pairs or a smaller holdout.")
    from ..selection import keyed_generator

    order = torch.randperm(n, generator=keyed_generator(f"hf_uwm.holdout/{seed}"))
    held = sorted(order[:count].tolist())
    kept = sorted(order[count:].tolist())
    return kept, held
