"""Figures of an edit: the held-out trajectory of a self-stopping iterative edit.

matplotlib is imported when a figure is drawn, never at import time: nothing that edits a model
needs it.
"""

from __future__ import annotations


def plot_trajectory(trajectory: list, path, *, goal: float | None = None, knowledge_budget: float | None = None,
                    kept: int | None = None, reason: str | None = None, title: str = "Iterative edit",
                    goal_name: str = "GS"):
    """A PNG of the held-out goal and knowledge cost per round (`trajectory`: `stopping.Step`s), with the
    goal, the budget and the round kept.

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
