"""The sweep's choice rule on hand-made reports: budget in points, beats its random control, then GS."""

import pytest

from hf_uwm import sweep as sw
from hf_uwm.evaluation import EvaluationReport


def report(gs, zero_shot, interval=2.0):
    return EvaluationReport({"GS": gs, "PU": gs, "P_u^t": gs, "P_u^v": gs}, {"GS": (gs - interval, gs + interval)},
                            {"R@1 Ts->Is": 50.0}, zero_shot, 300)


def row(name, gs, zero_shot, control_gs=0.0, weights=100, interval=2.0):
    return sw.SweepRow("m", {"name": name}, weights, report(gs, zero_shot, interval), report(control_gs, 90.0))


BASE = report(0.0, 90.0)


def test_picks_the_highest_gs_within_the_budget_not_the_worst_setting():
    rows = [row("worst", 5.0, 89.0), row("best", 60.0, 88.0), row("middle", 30.0, 89.5)]
    assert sw.choose(rows, BASE, 2.5).setting["name"] == "best"
    assert sw.choose(list(reversed(rows)), BASE, 2.5).setting["name"] == "best"


def test_budget_is_a_drop_in_points_from_the_base_model():
    rows = [row("costly", 90.0, 87.0), row("cheap", 40.0, 88.0)]
    assert sw.choose(rows, BASE, 2.5).setting["name"] == "cheap"     # 87.0 is 3 points below 90.0
    assert sw.choose(rows, BASE, 3.0).setting["name"] == "costly"    # exactly at the budget is allowed
    assert sw.choose(rows, BASE, 0.5) is None
    assert "no setting stays within 0.5 points" in sw.verdict(rows, BASE, 0.5)


def test_a_setting_whose_interval_overlaps_its_control_is_never_chosen():
    rows = [row("at chance", 3.0, 89.9, control_gs=1.0, interval=2.5),   # [0.5, 5.5] overlaps [-1, 3]
            row("clear", 2.5, 89.0, control_gs=0.0, interval=0.4)]       # [2.1, 2.9] above [-2, 2]
    assert sw.choose(rows, BASE, 5.0).setting["name"] == "clear"
    assert sw.choose(rows[:1], BASE, 5.0) is None
    assert sw.choose(rows[:1], BASE, 5.0, require_beats_control=False).setting["name"] == "at chance"
    assert "beats its random control" in sw.verdict(rows[:1], BASE, 5.0)
    assert "nothing chosen" in sw.verdict(rows[:1], BASE, 5.0)


def test_all_at_chance_like_uwm_on_the_organism_chooses_nothing():
    rows = [row(f"tau {t}", 0.0, 90.0 - t, control_gs=0.0) for t in (0.5, 1.0, 2.0)]
    assert sw.choose(rows, BASE, 5.0) is None
    assert sw.choose(rows, BASE, 5.0, require_beats_control=False).setting["name"] == "tau 0.5"


def test_ties_go_to_higher_zero_shot_then_fewer_weights():
    rows = [row("lower zs", 80.0, 88.0, weights=10), row("higher zs", 80.0, 89.0, weights=500),
            row("higher zs, fewer", 80.0, 89.0, weights=400)]
    assert sw.choose(rows, BASE, 5.0).setting["name"] == "higher zs, fewer"
    assert sw.choose(rows[:2], BASE, 5.0).setting["name"] == "higher zs"


def test_without_bootstrap_intervals_the_rule_refuses():
    bare = sw.SweepRow("m", {}, 1, EvaluationReport({"GS": 1.0}, {}, {}, 90.0), report(0.0, 90.0))
    with pytest.raises(ValueError, match="bootstrap"):
        sw.choose([bare], BASE, 5.0)
    with pytest.raises(ValueError, match="points"):
        sw.choose([], BASE, -1.0)


def test_table_rows_line_up_with_the_header():
    rows = [row("a", 60.0, 88.0), row("a much longer setting name", 5.0, 89.0)]
    lines = sw.table(rows, BASE, max_drop=2.5).splitlines()
    bars = {line.index("|") for line in lines[:-1]}
    assert len(bars) == 1, lines
    assert max(len(line) for line in lines[:-1]) <= 120
    assert lines[2].rstrip().endswith("yes     ok")
