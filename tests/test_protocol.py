"""The experiment protocol the demos share: one choice rule by metric, its fallbacks, sizes, the interval format."""

from types import SimpleNamespace

import pytest
import torch
from conftest import make_clip, make_pairs
from test_sweep import BASE, row

from hf_uwm import UWMConfig, UWMEditor
from hf_uwm import sweep as sw
from hf_uwm.formatting import interval, with_interval
from hf_uwm.protocol import Clock, Sizes, choose_and_test


def caption_row(name, unsafe_rate, rouge, weights=100):
    report = SimpleNamespace(unsafe_rate=unsafe_rate, text={"rougeL": rouge})
    return sw.SweepRow("m", {"name": name}, weights, report, control=None)


CAPTION_BASE = SimpleNamespace(unsafe_rate=90.0, text={"rougeL": 60.0})


def test_the_captioner_rule_takes_the_lowest_unsafe_rate_within_the_rouge_budget():
    rows = [caption_row("gentle", 80.0, 59.0), caption_row("strong", 10.0, 56.0), caption_row("too far", 0.0, 40.0)]
    assert sw.choose_or_fallback(rows, CAPTION_BASE, 5.0, sw.CAPTIONS)[0].setting["name"] == "strong"
    assert sw.choose_or_fallback(rows, CAPTION_BASE, 3.0, sw.CAPTIONS)[0].setting["name"] == "gentle"
    # ties of the unsafe rate: the higher ROUGE-L, then fewer weights
    ties = [caption_row("more", 0.0, 58.0, weights=200), caption_row("fewer", 0.0, 58.0, weights=100),
            caption_row("worse text", 0.0, 57.0, weights=50)]
    assert sw.choose_or_fallback(ties, CAPTION_BASE, 5.0, sw.CAPTIONS) == (ties[1], "chosen")


def test_over_the_budget_the_gentlest_setting_is_shown_and_said():
    rows = [caption_row("far", 0.0, 40.0), caption_row("farther", 0.0, 30.0)]
    assert sw.choose_or_fallback(rows, CAPTION_BASE, 5.0, sw.CAPTIONS) == (rows[0], "over budget")
    gs_rows = [row("costly", 60.0, 80.0), row("costlier", 70.0, 70.0)]
    assert sw.choose_or_fallback(gs_rows, BASE, 2.0) == (gs_rows[0], "over budget")


def test_a_contrastive_grid_at_chance_is_shown_as_such():
    rows = [row("at chance", 3.0, 89.9, control_gs=1.0, interval=2.5), row("weaker", 1.0, 89.9, control_gs=1.0)]
    assert sw.choose_or_fallback(rows, BASE, 5.0) == (rows[0], "at chance")
    clear = row("clear", 2.5, 89.0, control_gs=0.0, interval=0.4)
    assert sw.choose_or_fallback(rows + [clear], BASE, 5.0) == (clear, "chosen")


def test_sizes_are_counts():
    assert Sizes(calibration=4, validation=2, test=2).zero_shot == 0
    for bad in (dict(calibration=0), dict(test=2.5), dict(bootstrap=-1)):
        with pytest.raises(ValueError, match="Sizes are counts"):
            Sizes(**{"calibration": 4, "validation": 2, "test": 2, **bad})


def test_one_interval_format():
    assert with_interval(12.345, (10.0, 14.56)) == "12.3 [10.0, 14.6]" == f"12.3 {interval((10.0, 14.56))}"
    assert with_interval(12.345, None) == with_interval(12.345, []) == "12.3"
    assert with_interval(1.0, (0.5, 1.5), digits=2) == "1.00 [0.50, 1.50]"


def test_the_choice_is_tested_beside_a_random_control_of_the_same_size():
    model, processor = make_clip(seed=3)
    seen = {}

    def on_validation(m):
        return SimpleNamespace(unsafe_rate=0.0, text={"rougeL": 0.0})

    def on_test(m, name):
        weights = torch.cat([p.detach().flatten() for p in m.parameters()]).clone()
        seen[name] = weights
        return name

    editor = UWMEditor(model, processor, UWMConfig(batch_size=4))
    before = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    clock = Clock()
    outcome = choose_and_test("UWM", editor, [{"tau": 0.05}, {"tau": 0.01}], calibration=make_pairs(6),
                              on_validation=on_validation, on_test=on_test, base_validation=CAPTION_BASE,
                              max_drop=100.0, criterion=sw.CAPTIONS, controls=False, progress=False, clock=clock)
    assert (outcome.test, outcome.control_test) == ("UWM", "random (UWM)") and outcome.status == "chosen"
    assert outcome.chosen.setting == {"tau": 0.01} and outcome.chosen.control is None   # ties: fewer weights
    edited, control = seen["UWM"] != before, seen["random (UWM)"] != before
    assert edited.sum() == control.sum() == outcome.chosen.weights > 0 and (edited != control).any()
    assert torch.equal(torch.cat([p.detach().flatten() for p in model.parameters()]), before)   # left as it was
    assert list(clock.seconds) == ["UWM: calibrate", "UWM: validation grid (2 settings)", "UWM: test",
                                   "UWM: random control test"]
