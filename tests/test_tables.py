"""Tables and the sweep plot read without the CSV: columns that never run together, a plot that shows everything."""

import re

import pytest

from hf_uwm import sweep as sw
from hf_uwm.evaluation import EvaluationReport, compare


def report(gs, knowledge, low=None, high=None):
    intervals = {"GS": (gs if low is None else low, gs if high is None else high)}
    return EvaluationReport({"GS": gs, "PU": gs, "P_u^t": gs}, intervals, {"R@10 Tu->[Is;Iu]": 100.0 - gs},
                            knowledge, 300)


def cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def test_compare_keeps_two_spaces_between_columns_at_100_percent():
    table = compare({"base": report(0.0, 100.0), "edited": report(100.0, 0.0), "random control": report(0.0, 100.0)})
    lines = table.splitlines()
    assert cells(lines[0]) == ["metric (%)", "base", "edited", "random control"]
    assert cells(lines[1]) == ["GS", "0.00", "100.00 (+100.00)", "0.00 (+0.00)"]
    assert cells(lines[-2]) == ["R@10 Tu->[Is;Iu]", "100.00", "0.00 (-100.00)", "100.00 (+0.00)"]
    assert len({len(line) for line in lines}) == 1  # fixed widths


def test_sweep_table_keeps_its_columns_apart_at_100_percent():
    rows = [sw.SweepRow("UWM", {"tau": 0.02}, 1_234_567, report(100.0, 100.0, 100.0, 100.0),
                        report(100.0, 100.0, 100.0, 100.0))]
    lines = sw.table(rows, report(0.0, 100.0), max_drop=2.0).splitlines()
    gs = r"100\.0 \[100\.0, 100\.0\]"
    assert re.fullmatch(rf"UWM τ=0\.02 +1234567 +{gs} +100\.0 +100\.0 \| +{gs} +100\.0 +no +ok", lines[2]), lines[2]
    assert len({line.index("|") for line in lines[:-1]}) == 1


@pytest.fixture
def figure(monkeypatch):
    """The figure pareto_plot draws, kept open to look at."""
    import matplotlib.pyplot as plt

    drawn, close = [], plt.close
    monkeypatch.setattr(plt, "close", drawn.append)
    yield drawn
    for fig in drawn:
        close(fig)


def test_pareto_plot_labels_settings_draws_intervals_the_budget_and_hides_no_marker(figure, tmp_path):
    base = report(0.0, 90.0)
    rows = [sw.SweepRow("UWM", {"tau": t}, 100, report(0.0, 90.0), report(0.0, 90.0)) for t in (0.01, 0.02)]
    rows.append(sw.SweepRow("attribution", {"density": 0.01}, 50, report(20.0, 89.0, 15.0, 25.0),
                            report(0.0, 89.5, 0.0, 1.0)))
    path = sw.pareto_plot(rows, tmp_path / "pareto.png", base, rows[2], max_drop=2.0)
    assert path.read_bytes()[:4] == b"\x89PNG"
    ax = figure[0].axes[0]
    # Only the chosen setting and the extremes are named (every setting is in the CSV).
    assert sorted(t.get_text() for t in ax.texts) == ["UWM τ=0.01: most knowledge",
                                                      "attribution density=0.01: chosen, highest GS", "named settings"]
    # Bootstrap intervals: error bars of the settings and of the controls, [15, 25] among them.
    bars = [c for c in ax.containers if c.has_yerr]
    assert len(bars) == 3  # UWM, attribution, the controls
    segments = [seg for c in bars for seg in c.lines[2][0].get_segments()]
    assert any(abs(seg[0][1] - 15.0) < 1e-9 and abs(seg[1][1] - 25.0) < 1e-9 for seg in segments)
    # The budget: a vertical line at 90 - 2 inside the x axis.
    budget = [line for line in ax.lines if line.get_label().startswith("knowledge budget")]
    assert len(budget) == 1 and list(budget[0].get_xdata()) == [88.0, 88.0]
    assert ax.get_xlim()[0] < 88.0
    # The base model is a hollow star above the controls, the controls above the settings.
    star = next(c for c in ax.collections if c.get_label() == "base model")
    assert len(star.get_facecolor()) == 0  # hollow: what lies under it shows
    order = {c.get_label(): c.lines[0].get_zorder() for c in ax.containers}  # the markers of each errorbar
    assert order["UWM"] < order["random control (same size)"] < star.get_zorder()


def test_pareto_plot_axis_when_every_gs_is_zero(figure, tmp_path):
    rows = [sw.SweepRow("UWM", {"tau": 0.02}, 100, report(0.0, 90.0), report(0.0, 90.0))]
    sw.pareto_plot(rows, tmp_path / "pareto.png", report(0.0, 90.0), max_drop=100.0)
    ax = figure[0].axes[0]
    low, high = ax.get_ylim()
    assert -1 < low < 0 and high >= 10  # zero on the floor of a readable axis, not mid-air in -0.04..0.04
    # A budget below 0% excludes nothing: named in the legend, off the axis.
    assert ax.get_xlim()[0] > 80
    assert any("below 0" in t.get_text() for t in ax.get_legend().get_texts())
