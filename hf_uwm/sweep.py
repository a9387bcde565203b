"""Sweeps: evaluate settings beside their random controls on validation data, then choose by a fixed rule.

The rule (`choose`), fixed before any number is seen:
1. the knowledge budget: zero-shot accuracy (else safe text-to-image R@1) at most `max_drop`
   points below the base model's;
2. beats chance: the setting's GS bootstrap 95% interval lies wholly above its random control's
   (a control flips as many weights per layer with the same α);
3. among those, the highest GS; ties go to the higher zero-shot accuracy, then to fewer weights.
When no setting passes 1 and 2, nothing is chosen, and callers say so rather than save a "best"
edit. Only a chosen setting is then measured on test data.

The same rule chooses for a captioner (`CAPTIONS`): safety is a lower unsafe-caption rate, knowledge
the ROUGE-L of safe images' captions, and a grid measured without controls skips step 2.
`choose_or_fallback` says what a demo shows when the rule chooses nothing.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from .formatting import with_interval


@dataclass
class SweepRow:
    """One setting: what was changed, how many weights, its report and its random control's (None
    where a rule without controls chooses, as the LLaVA demo's)."""

    method: str
    setting: dict
    weights: int
    report: object
    control: object
    extra: dict = field(default_factory=dict)
    editor: object = field(default=None, repr=False, compare=False)  # the edit itself, to save or re-evaluate

    def label(self) -> str:
        return f"{self.method} {self.setting_label()}".strip()

    def setting_label(self) -> str:
        return " ".join(f"{symbol(k)}={_short(v)}" for k, v in self.setting.items())


def symbol(name: str) -> str:
    """A setting's short name in tables and plots, as its field declares it (the CSV keeps the field names)."""
    return symbols().get(name, name)


def symbols() -> dict[str, str]:
    """Every declared symbol: of the shared fields and of every registered method's settings."""
    from .config import UWMConfig
    from .methods import get_method, method_names
    from .settings import setting_info, setting_names

    found = {"alpha": setting_info(UWMConfig, "alpha").symbol}
    for method in method_names():
        settings_class = get_method(method).settings_class
        found.update({n: s for n in setting_names(settings_class) if (s := setting_info(settings_class, n).symbol)})
    return found


def _short(value) -> str:
    return ",".join(value) if isinstance(value, list) else f"{value:g}" if isinstance(value, float) else str(value)


def knowledge(report) -> float:
    """Zero-shot accuracy where it was measured, else safe text-to-image R@1 as the knowledge proxy."""
    return report.zero_shot if report.zero_shot is not None else report.retrieval["R@1 Ts->Is"]


def knowledge_name(report) -> str:
    return "zero-shot accuracy" if report.zero_shot is not None else "R@1 Ts->Is (no zero-shot set given)"


def evaluate_edit(editor, evaluate):
    """evaluate(model) with the edit applied; the model is left exactly as it was."""
    with editor.applied() as model:
        return evaluate(model)


def sweep(editor, grid: list[dict], evaluate, *, calibration=None, method: str = "UWM", control_seed: int = 0,
          controls: bool = True, progress: bool = True) -> list[SweepRow]:
    """Evaluate every setting of `grid` (dicts of `UWMConfig` changes) and, with `controls`, its random control.

    Changes that `with_settings` can make (the method's selection settings: tau, density, alpha
    for most; the number of rounds of an iterative method) are re-selected from the cached scores
    of `editor`; the others (token_norm, curvature_weight, ...) calibrate a copy of the editor on
    `calibration`, once per distinct combination. `editor` need not be calibrated when every
    setting calibrates anew.
    """
    reselectable = editor.method.reselectable()
    calibrated, rows = {}, []
    for changes in tqdm(grid, desc=f"sweep {method}", disable=not progress):
        reselect = {k: v for k, v in changes.items() if k in reselectable}
        recalibrate = {k: v for k, v in changes.items() if k not in reselect and getattr(editor.config, k) != v}
        key = json.dumps(recalibrate, sort_keys=True)
        if key not in calibrated:
            calibrated[key] = _calibrated(editor, recalibrate, calibration, progress)
        edited = calibrated[key].with_settings(**reselect) if reselect else calibrated[key]
        control = evaluate_edit(edited.random_control(seed=control_seed), evaluate) if controls else None
        rows.append(SweepRow(method, dict(changes), sum(edited.counts().values()), evaluate_edit(edited, evaluate),
                             control, editor=edited))
    return rows


def _calibrated(editor, changes: dict, calibration, progress: bool):
    """`editor` itself when it is calibrated and nothing changes; else a copy calibrated with `changes`."""
    if not changes and editor.delta:
        return editor
    if calibration is None:
        raise ValueError(f"The settings {changes or 'of an uncalibrated editor'} need a calibration of their own: "
                         "pass sweep(..., calibration=pairs).")
    copy = type(editor)(editor.model, editor.processor, dataclasses.replace(editor.config, **changes),
                        base_model=editor.base_model, base_revision=editor.base_revision)
    return copy.calibrate(calibration, progress=progress)


# --- the choice rule -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Criterion:
    """What the rule compares: `safety` (higher is safer) and `knowledge` (points, higher keeps more) of a
    report; with `interval`, the bootstrap 95% interval of safety that a row's must lie above its control's."""

    safety: Callable
    knowledge: Callable
    interval: Callable | None = None


def _gs_interval(report) -> tuple[float, float]:
    if "GS" not in report.intervals:
        raise ValueError("Choosing a setting compares GS bootstrap intervals: evaluate the sweep with "
                         "bootstrap > 0 (e.g. evaluate_model(..., bootstrap=1000)).")
    return report.intervals["GS"]


# SafeGround of a contrastive model: GS, zero-shot accuracy (else R@1), GS intervals against the control's.
GS = Criterion(lambda report: report.safeground["GS"], knowledge, _gs_interval)
# A captioner: fewer unsafe captions of unsafe images, ROUGE-L of safe images' captions.
CAPTIONS = Criterion(lambda report: -report.unsafe_rate, lambda report: report.text["rougeL"])


def within_budget(row: SweepRow, base, max_drop: float, criterion: Criterion = GS) -> bool:
    """The setting's knowledge is at most `max_drop` points below the base model's."""
    return criterion.knowledge(row.report) >= criterion.knowledge(base) - max_drop


def beats_control(row: SweepRow, criterion: Criterion = GS) -> bool:
    """The setting's safety 95% interval lies wholly above its random control's (the two do not overlap)."""
    return criterion.interval(row.report)[0] > criterion.interval(row.control)[1]


def choose(rows: list[SweepRow], base, max_drop: float, *, require_beats_control: bool = True,
           criterion: Criterion = GS) -> SweepRow | None:
    """The rule of this module: the safest row within the knowledge budget whose safety interval lies
    above its random control's (ties: higher knowledge, then fewer weights); None when there is none.

    `require_beats_control=False` drops step 2, to show what a setting at chance level does.
    """
    if max_drop < 0:
        raise ValueError(f"max_drop={max_drop} is a loss in points: pass a number >= 0, e.g. 2.5.")
    eligible = [row for row in rows if within_budget(row, base, max_drop, criterion)
                and (not require_beats_control or beats_control(row, criterion))]
    return max(eligible, key=lambda r: (criterion.safety(r.report), criterion.knowledge(r.report), -r.weights),
               default=None)


STATUSES = ("chosen", "at chance", "over budget")


def choose_or_fallback(rows: list[SweepRow], base, max_drop: float, criterion: Criterion = GS) -> tuple[SweepRow, str]:
    """(row, status) for a demo, which shows every method: the rule's choice ("chosen"); else the rule's
    choice without the control check ("at chance"); else the gentlest setting ("over budget"). Rows
    measured without controls, or a criterion without intervals, skip the control check."""
    controls = criterion.interval is not None and all(row.control is not None for row in rows)
    chosen = choose(rows, base, max_drop, require_beats_control=controls, criterion=criterion)
    if chosen is not None:
        return chosen, "chosen"
    at_chance = choose(rows, base, max_drop, require_beats_control=False, criterion=criterion) if controls else None
    if at_chance is not None:
        return at_chance, "at chance"
    return max(rows, key=lambda r: criterion.knowledge(r.report)), "over budget"


def verdict(rows: list[SweepRow], base, max_drop: float) -> str:
    """One plain sentence: what the rule chose, or why it chose nothing."""
    chosen = choose(rows, base, max_drop)
    budget = f"{max_drop:g} points of the base model's {knowledge_name(base)}"
    if chosen is not None:
        return (f"chosen: {chosen.label()} (GS {chosen.report.safeground['GS']:.1f} vs random control "
                f"{chosen.control.safeground['GS']:.1f}, within {budget})")
    if not any(within_budget(r, base, max_drop) for r in rows):
        return f"no setting stays within {budget}: nothing chosen"
    return (f"no setting within {budget} beats its random control (their GS 95% intervals overlap): "
            "nothing chosen; the edit is at chance level on this model")


# --- reporting -------------------------------------------------------------------------------------
# Column widths that hold the widest value of each column (100% everywhere) and a space before it.
GS_WIDTH = len(" 100.0 [100.0, 100.0]")
RATE_WIDTH = len(" 100.0")


def table(rows: list[SweepRow], base=None, max_drop: float | None = None) -> str:
    """One line per setting: the edit's GS [CI], PU and knowledge; its random control's GS [CI] and
    knowledge; and, given `max_drop`, whether it beats the control and keeps the budget (the CSV has
    every metric)."""
    width = max([len("setting")] + [len(r.label()) for r in rows]) + 2
    counts = max([len("weights")] + [len(str(r.weights)) for r in rows]) + 1
    head = (f"{'setting':<{width}}{'weights':>{counts}}{'GS [95% CI]':>{GS_WIDTH}}{'PU':>{RATE_WIDTH}}"
            f"{'know.':>{RATE_WIDTH}} |{'rnd GS [95% CI]':>{GS_WIDTH}}{'know.':>{RATE_WIDTH}}")
    if max_drop is not None:
        head += f"{'>rnd':>6}{'budget':>7}"
    lines = [head]
    if base is not None:
        lines.append(f"{'base model':<{width}}{0:>{counts}}" + _metrics(base) + " |")
    for row in rows:
        line = (f"{row.label():<{width}}{row.weights:>{counts}}" + _metrics(row.report)
                + f" |{_gs(row.control):>{GS_WIDTH}}{knowledge(row.control):>{RATE_WIDTH}.1f}")
        if max_drop is not None:
            line += (f"{'yes' if beats_control(row) else 'no':>6}"
                     f"{'ok' if within_budget(row, base, max_drop) else 'over':>7}")
        lines.append(line)
    lines.append(f"know. = {knowledge_name(rows[0].report if rows else base)}; rnd = random control of the same "
                 "size; >rnd = GS interval wholly above the control's")
    return "\n".join(lines)


def _gs(report) -> str:
    return with_interval(report.safeground["GS"], report.intervals.get("GS"))


def _metrics(report) -> str:
    return f"{_gs(report):>{GS_WIDTH}}{report.safeground['PU']:>{RATE_WIDTH}.1f}{knowledge(report):>{RATE_WIDTH}.1f}"


def write_csv(rows: list[SweepRow], path: str | Path, base=None) -> Path:
    metrics = list((base or rows[0].report).safeground)

    def interval(report):
        return list(report.intervals.get("GS", ("", "")))

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "setting", "weights"] + metrics + ["GS_low", "GS_high", "knowledge"]
                        + [f"random_{m}" for m in metrics] + ["random_GS_low", "random_GS_high", "random_knowledge"])
        if base is not None:
            writer.writerow(["base", "", 0] + [base.safeground[m] for m in metrics] + interval(base)
                            + [knowledge(base)] + [""] * (len(metrics) + 3))
        for row in rows:
            writer.writerow([row.method, " ".join(f"{k}={_short(v)}" for k, v in row.setting.items()), row.weights]
                            + [row.report.safeground[m] for m in metrics] + interval(row.report)
                            + [knowledge(row.report)] + [row.control.safeground[m] for m in metrics]
                            + interval(row.control) + [knowledge(row.control)])
    return Path(path)


def pareto_plot(rows: list[SweepRow], path: str | Path, base=None, chosen: SweepRow | None = None,
                title: str = "Safety / knowledge trade-off (validation)", max_drop: float | None = None,
                table_name: str | None = None) -> Path:
    """GS against knowledge: every setting beside its random control, with GS bootstrap 95% intervals,
    the base model, the knowledge budget `max_drop` points below it, and the choice marked.

    Markers are drawn so that none hides another: the base model is a hollow star over everything,
    settings and their controls are dodged a few points left and right of their knowledge value (a
    display offset, the data stay exact). Only the chosen setting and the extremes (highest GS, most
    knowledge) are named, in a column right of the axes with a line to their point, so that no label
    can cover another or the data; every other setting is in the table `table_name`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import offset_copy

    fig, ax = plt.subplots(figsize=(11, 5.5))
    left, right = (offset_copy(ax.transData, fig=fig, x=dx, units="points") for dx in (-3, 3))
    colours, markers = plt.get_cmap("tab10").colors, "osD^v<>ph"
    reports = [r.report for r in rows] + [r.control for r in rows] + ([base] if base is not None else [])
    top = max([10.0] + [r.intervals.get("GS", (0, r.safeground["GS"]))[1] for r in reports])
    for i, method in enumerate(dict.fromkeys(r.method for r in rows)):
        _with_intervals(ax, [r.report for r in rows if r.method == method], label=method,
                        color=colours[i % len(colours)], marker=markers[i % len(markers)], alpha=0.85, zorder=3,
                        transform=left)
    _with_intervals(ax, [r.control for r in rows], label="random control (same size)", color="dimgrey", marker="x",
                    zorder=4, transform=right)
    if base is not None:
        ax.scatter([knowledge(base)], [base.safeground["GS"]], marker="*", s=260, facecolors="none",
                   edgecolors="black", linewidths=1.3, label="base model", zorder=5)
    if chosen is not None:
        ax.scatter([knowledge(chosen.report)], [chosen.report.safeground["GS"]], s=220, facecolors="none",
                   edgecolors="red", linewidths=2, label="chosen", zorder=6, transform=left)
    ax.set_ylim(-0.04 * top, 1.1 * top)  # all GS at 0 sit on the floor of a 0-10 axis, not mid-air
    limit = None if base is None or max_drop is None else knowledge(base) - max_drop
    _knowledge_axis(ax, [knowledge(r) for r in reports], limit, max_drop)
    ax.set_xlabel(f"{knowledge_name(rows[0].report)} (%)")
    ax.set_ylabel("SafeGround GS (%), bootstrap 95% intervals")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _name_points(ax, _named_rows(rows, chosen), left, table_name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _named_rows(rows: list[SweepRow], chosen: SweepRow | None) -> list[tuple[SweepRow, list[str]]]:
    """The settings a plot names, each with why: the chosen one, the highest GS, the most knowledge."""
    def gs(r):
        return r.report.safeground["GS"]

    picks = [("chosen", chosen), ("highest GS", max(rows, key=lambda r: (gs(r), knowledge(r.report)))),
             ("most knowledge", max(rows, key=lambda r: (knowledge(r.report), gs(r))))]
    named = {}
    for why, row in picks:
        if row is not None:
            named.setdefault(id(row), (row, []))[1].append(why)
    return list(named.values())


def _name_points(ax, named, transform, table_name: str | None):
    """One line of text per named setting in a column right of the axes (below the legend), each joined
    to its point by a thin line: texts in a column never overlap, and none lies on the data."""
    heading = "named settings" + (f" (every setting: {table_name})" if table_name else "")
    ax.annotate(heading, (1.01, 0.34), xycoords="axes fraction", fontsize=7, fontweight="bold", va="bottom")
    for i, (row, why) in enumerate(named):
        point = (knowledge(row.report), row.report.safeground["GS"])
        ax.annotate(f"{row.label()}: {', '.join(why)}", point, xycoords=transform,
                    xytext=(1.01, 0.30 - 0.07 * i), textcoords="axes fraction", fontsize=7, va="center",
                    arrowprops=dict(arrowstyle="-", color="grey", lw=0.6, shrinkA=0, shrinkB=4), zorder=7)


def _with_intervals(ax, reports, label, **style):
    """Points of GS against knowledge with their GS 95% intervals as vertical error bars."""
    gs = [r.safeground["GS"] for r in reports]
    intervals = [r.intervals.get("GS", (g, g)) for r, g in zip(reports, gs)]
    errors = [[g - low for g, (low, _) in zip(gs, intervals)], [high - g for g, (_, high) in zip(gs, intervals)]]
    ax.errorbar([knowledge(r) for r in reports], gs, yerr=errors, linestyle="none", capsize=2, elinewidth=0.8,
                label=label, **style)


def _knowledge_axis(ax, values: list[float], limit: float | None, max_drop: float | None):
    """An x axis around the points and the budget line (the region beyond it shaded). A budget at or
    below 0% excludes nothing: it is only named in the legend, and the axis stays on the points."""
    pad = max(0.5, 0.08 * (max(values) - min(values)))
    if limit is not None and limit <= 0:
        ax.plot([], [], color="red", ls="--", lw=1, label=f"knowledge budget: base − {max_drop:g} points "
                                                           "(below 0: every setting is within it)")
        limit = None
    low = min(values + ([limit] if limit is not None else []))
    pad = max(pad, 0.08 * (max(values) - low))
    ax.set_xlim(low - pad, max(values) + pad)
    if limit is not None:
        ax.axvspan(low - pad, limit, color="red", alpha=0.06, zorder=0, label="over the budget")
        ax.axvline(limit, color="red", ls="--", lw=1, label=f"knowledge budget: base − {max_drop:g} points", zorder=0)
