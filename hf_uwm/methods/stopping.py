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


def plot_trajectory(trajectory: list[Step], path, *, goal: float | None = None, knowledge_budget: float | None = None,
                    kept: int | None = None, reason: str | None = None, title: str = "Iterative edit",
                    goal_name: str = "GS"):
    """A PNG of the held-out goal and knowledge cost per round, with the goal, the budget and the round kept.

    `goal_name` is what the goal measures (the method's `goal_name`); the legend sits below the axes, off
    the curves, and rounds are whole numbers.
    """
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [s.round for s in trajectory]
    fig, ax = plt.subplots(figsize=(7, 4.6))
    goal_label = f"held-out {goal_name}"
    ax.plot(rounds, [s.goal for s in trajectory], marker=".", color="tab:blue", label=f"{goal_label} (goal measure)")
    if goal is not None:
        ax.axhline(goal, color="tab:blue", linestyle=":", linewidth=1, label=f"goal {goal:g}")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis_label = goal_label if goal_label.endswith("%") else f"{goal_label} (%)"
    ax.set_ylabel("\n".join(textwrap.wrap(axis_label, 34)), color="tab:blue")  # a long goal name stays on the figure
    ax.set_ylim(-2, 102)
    cost = ax.twinx()
    cost.plot(rounds, [s.cost for s in trajectory], marker=".", color="tab:red", label="knowledge cost")
    if knowledge_budget is not None:
        cost.axhline(knowledge_budget, color="tab:red", linestyle=":", linewidth=1,
                     label=f"knowledge budget {knowledge_budget:g}")
    cost.set_ylabel("knowledge points lost (held-out)", color="tab:red")
    top = max([1.2 * s.cost for s in trajectory] + [1.5 * (knowledge_budget or 0), 1.0])
    cost.set_ylim(min(0.0, *[s.cost for s in trajectory]), top)   # the budget line below the goal line
    if kept is not None:
        ax.axvline(kept, color="black", linewidth=1, label=f"kept: {kept} rounds" + (f" ({reason})" if reason else ""))
    lines = ax.get_legend_handles_labels()[0] + cost.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + cost.get_legend_handles_labels()[1]
    ax.legend(lines, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
