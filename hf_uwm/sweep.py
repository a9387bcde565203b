"""Sweeps: re-select settings from cached scores, evaluate each beside its random control, choose.

A setting is chosen on validation data by a rule fixed in advance (the highest GS whose zero-shot
accuracy is at most `max_zero_shot_drop` points below the base model's), and only then evaluated on
test data.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm


@dataclass
class SweepRow:
    """One setting: what was changed, how many weights, its report and its random control's."""

    method: str
    setting: dict
    weights: int
    report: object
    control: object
    extra: dict = field(default_factory=dict)

    def label(self) -> str:
        return f"{self.method} " + " ".join(f"{k}={v}" for k, v in self.setting.items())


def knowledge(report) -> float:
    """Zero-shot accuracy where it was measured, else safe text-to-image R@1 as the knowledge proxy."""
    return report.zero_shot if report.zero_shot is not None else report.retrieval["R@1 Ts->Is"]


def knowledge_name(report) -> str:
    return "zero-shot accuracy" if report.zero_shot is not None else "R@1 Ts->Is (no zero-shot set given)"


def evaluate_edit(editor, evaluate):
    """Apply, evaluate, revert: the model is left exactly as it was."""
    editor.apply()
    try:
        return evaluate(editor.model)
    finally:
        editor.revert()


def sweep(editor, grid: list[dict], evaluate, *, method: str = "UWM", control_seed: int = 0,
          progress: bool = True) -> list[SweepRow]:
    """Evaluate every setting of `grid` (changes for `editor.with_settings`) and its random control."""
    rows = []
    for changes in tqdm(grid, desc=f"sweep {method}", disable=not progress):
        edited = editor.with_settings(**changes)
        control = edited.random_control(seed=control_seed)
        rows.append(SweepRow(method, dict(changes), sum(edited.counts().values()),
                             evaluate_edit(edited, evaluate), evaluate_edit(control, evaluate)))
    return rows


def choose(rows: list[SweepRow], base, max_drop: float) -> SweepRow | None:
    """The highest-GS row whose knowledge (zero-shot accuracy, else safe R@1) is at most `max_drop`
    points below the base model's (ties: fewer weights); None if no row is within that budget."""
    eligible = [row for row in rows if knowledge(row.report) >= knowledge(base) - max_drop]
    return max(eligible, key=lambda r: (r.report.safeground["GS"], -r.weights), default=None)


def table(rows: list[SweepRow], base=None) -> str:
    """One line per setting: GS, PU, P_u^t, P_u^v and zero-shot of the edit and of its random control."""
    head = f"{'setting':<44}{'weights':>9}{'GS':>7}{'PU':>7}{'P_u^t':>7}{'P_u^v':>7}{'know.':>8}" \
           f"{'| rnd GS':>9}{'rnd know.':>11}"
    lines = [head]
    if base is not None:
        lines.append(f"{'base model':<44}{0:>9}" + _metrics(base) + f"{'|':>9}")
    for row in rows:
        lines.append(f"{row.label():<44}{row.weights:>9}" + _metrics(row.report)
                     + f"{'| ' + format(row.control.safeground['GS'], '.1f'):>9}" + _knowledge(row.control, 11))
    lines.append(f"know. = {knowledge_name(rows[0].report if rows else base)}; rnd = random control of the same size")
    return "\n".join(lines)


def _metrics(report) -> str:
    sg = report.safeground
    return "".join(f"{sg[m]:>7.1f}" for m in ("GS", "PU", "P_u^t", "P_u^v")) + _knowledge(report, 8)


def _knowledge(report, width) -> str:
    return f"{knowledge(report):>{width}.1f}"


def write_csv(rows: list[SweepRow], path: str | Path, base=None) -> Path:
    metrics = list((base or rows[0].report).safeground)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "setting", "weights"] + metrics + ["knowledge"]
                        + [f"random_{m}" for m in metrics] + ["random_knowledge"])
        if base is not None:
            writer.writerow(["base", "", 0] + [base.safeground[m] for m in metrics] + [knowledge(base)]
                            + [""] * (len(metrics) + 1))
        for row in rows:
            writer.writerow([row.method, " ".join(f"{k}={v}" for k, v in row.setting.items()), row.weights]
                            + [row.report.safeground[m] for m in metrics] + [knowledge(row.report)]
                            + [row.control.safeground[m] for m in metrics] + [knowledge(row.control)])
    return Path(path)


def pareto_plot(rows: list[SweepRow], path: str | Path, base=None, chosen: SweepRow | None = None) -> Path:
    """GS against zero-shot accuracy: every setting, its random control, the base model marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    colours, markers = plt.get_cmap("tab20").colors, "osD^v<>ph"
    for i, method in enumerate(dict.fromkeys(r.method for r in rows)):
        mine = [r for r in rows if r.method == method]
        ax.scatter([knowledge(r.report) for r in mine], [r.report.safeground["GS"] for r in mine], label=method,
                   color=colours[i % len(colours)], marker=markers[i % len(markers)])
    ax.scatter([knowledge(r.control) for r in rows], [r.control.safeground["GS"] for r in rows], marker="x",
               color="grey", label="random control (same size)")
    if base is not None:
        ax.scatter([knowledge(base)], [base.safeground["GS"]], marker="*", s=200, color="black", label="base model")
    if chosen is not None:
        ax.scatter([knowledge(chosen.report)], [chosen.report.safeground["GS"]], s=160, facecolors="none",
                   edgecolors="red", linewidths=2, label="chosen")
    ax.set_xlabel(f"{knowledge_name(rows[0].report)} (%)")
    ax.set_ylabel("SafeGround GS (%)")
    ax.set_title("Safety / knowledge trade-off (validation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
