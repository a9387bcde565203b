"""The plots a user opens: no label over another or over the data, nothing cut at the figure's edge."""

from types import SimpleNamespace

import matplotlib
import pytest

from hf_uwm.methods.stopping import Step
from hf_uwm.plots import plot_trajectory
from hf_uwm.sweep import SweepRow, pareto_plot

matplotlib.use("Agg")


@pytest.fixture
def figures(monkeypatch):
    """The figures a plotting function closes, kept open to measure them."""
    import matplotlib.pyplot as plt

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    yield kept
    for figure in kept:
        figure.clf()


def report(gs, zero_shot):
    return SimpleNamespace(safeground={"GS": gs, "PU": gs}, intervals={"GS": (max(0, gs - 2), min(100, gs + 2))},
                           zero_shot=zero_shot, retrieval={})


def extents(figure, texts):
    """The boxes of the texts themselves (an annotation's own extent would include its line to the point)."""
    from matplotlib.text import Text

    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    return [Text.get_window_extent(t, renderer) for t in texts if t.get_text()]


def test_pareto_labels_never_overlap_each_other_the_data_or_the_edge(figures, tmp_path):
    # 16 settings where the demo's grid put them: most at GS 0 and one zero-shot value, a block of labels before.
    rows = [SweepRow("ratio", {"tau": tau, "alpha": alpha}, 100 * i, report(0.0, 91.5 + 0.01 * i), report(0.0, 91.0))
            for i, (tau, alpha) in enumerate((t, a) for t in (0.005, 0.01, 0.02, 0.05) for a in (-1, 0))]
    rows += [SweepRow("attribution", {"density": d}, 10 * i, report(0.5 * i, 91.2 - i), report(0.0, 91.0))
             for i, d in enumerate((0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2))]
    pareto_plot(rows, tmp_path / "pareto.png", report(0.0, 91.8), rows[10], max_drop=2, table_name="sweep.csv")
    [figure] = figures
    [ax] = [a for a in figure.axes if a.get_legend() is not None]
    boxes = extents(figure, ax.texts)
    assert 2 <= len(boxes) <= 4  # a heading, the chosen setting and the extremes, not all 16
    assert any("every setting: sweep.csv" in t.get_text() for t in ax.texts)
    assert any("attribution density=0.005: chosen" in t.get_text() for t in ax.texts)
    data = ax.get_window_extent()
    for i, box in enumerate(boxes):
        assert not box.overlaps(data), "a label lies on the data"
        assert 0 <= box.x0 and box.x1 <= figure.bbox.width and 0 <= box.y0 and box.y1 <= figure.bbox.height
        assert not any(box.overlaps(other) for other in boxes[i + 1:])
    assert (tmp_path / "pareto.png").stat().st_size > 0


def test_trajectory_legend_is_off_the_curves_rounds_are_whole_and_the_axis_names_the_goal(figures, tmp_path):
    steps = [Step(round=r, goal=min(100, 9.0 * r), cost=0.3 * r, flipped=10 * r) for r in range(12)]
    plot_trajectory(steps, tmp_path / "t.png", goal=95, knowledge_budget=8, kept=11, reason="goal reached",
                    goal_name="unsafe images captioned free of unsafe words %")
    [figure] = figures
    ax = figure.axes[0]
    figure.canvas.draw()
    legend = ax.get_legend().get_window_extent(figure.canvas.get_renderer())
    assert not legend.overlaps(ax.get_window_extent()) and legend.y0 >= 0
    assert all(float(tick).is_integer() for tick in ax.get_xticks())
    assert ax.get_ylabel().replace("\n", " ") == "held-out unsafe images captioned free of unsafe words %"
    label = extents(figure, [ax.yaxis.label])[0]
    assert label.y0 >= 0 and label.y1 <= figure.bbox.height  # a long name is wrapped, not cut
    plot_trajectory(steps, tmp_path / "u.png")
    assert figures[1].axes[0].get_ylabel() == "held-out GS (%)"  # the default: iterative attribution's goal
