"""The self-setting strength of iterative attribution: held-out slice, trajectory, stopping rule."""

import json
import math

import pytest
import torch

from conftest import make_clip, make_pairs, make_siglip
from hf_uwm import UWMConfig, UWMEditor
from hf_uwm.methods.held_out import slice_measures
from hf_uwm.methods.iterative import IterativeAttribution
from hf_uwm.methods.stopping import BUDGET_REACHED, GOAL_REACHED, MAX_ROUNDS, Step, holdout_rows, stopping_round


def steps(*rows):
    """Step(round, goal, cost) from (goal, cost) per round, round 0 first."""
    return [Step(r, goal, cost, 10 * r) for r, (goal, cost) in enumerate(rows)]


# --- the rule, on hand-built trajectories --------------------------------------------------------
def test_the_rule_keeps_the_round_before_the_first_that_spends_more_than_the_budget():
    trajectory = steps((0, 0), (10, 0.5), (20, 1.0), (30, 2.5), (40, 1.0), (99, 9.0))
    assert stopping_round(trajectory, goal=None, knowledge_budget=2.0, max_rounds=40) == (2, BUDGET_REACHED)
    # exactly the budget is within it; the first round above it stops
    assert stopping_round(trajectory, goal=None, knowledge_budget=2.5, max_rounds=40) == (4, BUDGET_REACHED)


def test_the_rule_keeps_the_first_round_that_reaches_the_goal_unless_the_budget_stops_first():
    trajectory = steps((0, 0), (50, 0.5), (95, 1.0), (99, 3.0))
    assert stopping_round(trajectory, goal=95, knowledge_budget=2.0, max_rounds=40) == (2, GOAL_REACHED)
    assert stopping_round(trajectory, goal=99, knowledge_budget=2.0, max_rounds=40) == (2, BUDGET_REACHED)
    assert stopping_round(trajectory, goal=95, knowledge_budget=0.7, max_rounds=40) == (1, BUDGET_REACHED)
    # the first round over budget stops, even if it reaches the goal too
    assert stopping_round(steps((0, 0), (100, 5.0)), goal=95, knowledge_budget=2.0, max_rounds=40) == \
        (0, BUDGET_REACHED)


def test_the_rule_runs_to_the_maximum_or_says_it_has_not_stopped():
    trajectory = steps((0, 0), (10, 0.1), (20, 0.2))
    assert stopping_round(trajectory, goal=95, knowledge_budget=2.0, max_rounds=2) == (2, MAX_ROUNDS)
    assert stopping_round(trajectory, goal=95, knowledge_budget=2.0, max_rounds=1) == (1, MAX_ROUNDS)
    assert stopping_round(trajectory, goal=95, knowledge_budget=2.0, max_rounds=5) == (2, None)
    assert stopping_round(trajectory, goal=None, knowledge_budget=None, max_rounds=5) == (2, None)


def test_held_out_rows_are_seeded_sorted_disjoint_and_cover_every_pair():
    kept, held = holdout_rows(50, 0.2, seed=3)
    assert len(held) == 10 and sorted(kept + held) == list(range(50))
    assert (kept, held) == holdout_rows(50, 0.2, seed=3) and held != holdout_rows(50, 0.2, seed=4)[1]
    assert holdout_rows(5, 0.0, seed=0) == ([0, 1, 2, 3, 4], [])
    with pytest.raises(ValueError, match="leaves none for the gradients"):
        holdout_rows(1, 0.5, seed=0)


# --- the slice's measures against their definitions ----------------------------------------------
def test_slice_measures_equal_their_definitions():
    torch.manual_seed(0)
    h, d = 7, 5
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    texts, images, base = unit(torch.randn(2 * h, d)), unit(torch.randn(2 * h, d)), unit(torch.randn(2 * h, d))
    m = slice_measures(texts, images, base)
    ts, tu, is_, iu, bs = texts[:h], texts[h:], images[:h], images[h:], base[:h]
    gs = [float(ts[b] @ is_[b] > ts[b] @ iu[b]) * float(tu[b] @ is_[b] > tu[b] @ iu[b])
          * float(ts[b] @ is_[b] > tu[b] @ is_[b]) * float(ts[b] @ iu[b] > tu[b] @ iu[b]) for b in range(h)]
    assert m["GS"] == pytest.approx(100 * sum(gs) / h)
    assert m["drift"] == pytest.approx(100 * (1 - sum(float(ts[b] @ bs[b]) for b in range(h)) / h))
    same = [max(range(h), key=lambda c: float(is_[i] @ ts[c])) == max(range(h), key=lambda c: float(is_[i] @ bs[c]))
            for i in range(h)]
    assert m["agreement"] == pytest.approx(100 * sum(same) / h)
    same = [max(range(h), key=lambda i: float(is_[i] @ ts[c])) == max(range(h), key=lambda i: float(is_[i] @ bs[c]))
            for c in range(h)]
    assert m["agreement_text"] == pytest.approx(100 * sum(same) / h)


# --- calibration with the rule -----------------------------------------------------------------------
def unique_pairs(n, seed=0):
    """Pairs whose captions are all distinct, so a caption tells its row."""
    names = ("apple banana cherry grape lemon mango olive peach pear plum melon kiwi lime fig date guava berry "
             "onion carrot potato tomato pepper radish turnip").split()
    data = make_pairs(n, seed=seed)
    safe = [f"a photo of a {names[i]}" for i in range(n)]
    return data.map(lambda row, i: {"safe_text": safe[i], "unsafe_text": safe[i] + " with a bloody knife"},
                    with_indices=True)


def self_setting(**settings):
    return UWMConfig(method="iterative_attribution", **{"round_density": 0.01, "rounds": 6, "curvature_probes": 2,
                                                      "batch_size": 4, **settings})


@pytest.fixture
def counted_cost(monkeypatch):
    """The knowledge cost replaced by the percent of target weights changed so far (1 point per round
    at round_density 0.01), so a budget names the round it stops at; the goal stays the slice's GS."""
    start, measure = IterativeAttribution.start_measuring, IterativeAttribution.measure

    def start_measuring(self, editor, holdout, run=None):
        return start(self, editor, holdout, run), {n: l.weight.detach().clone() for n, l in editor.target_layers.items()}

    def counted(self, editor, holdout, state):
        goal, _, measures = measure(self, editor, holdout, state[0])
        changed = sum(int((l.weight != state[1][n]).sum()) for n, l in editor.target_layers.items())
        return goal, 100 * changed / sum(w.numel() for w in state[1].values()), {**measures, "cost_resolution": 0.0}

    monkeypatch.setattr(IterativeAttribution, "start_measuring", start_measuring)
    monkeypatch.setattr(IterativeAttribution, "measure", counted)


@pytest.fixture(scope="module")
def clip():
    return make_clip(dtype=torch.float64)


@pytest.fixture(scope="module")
def data():
    return unique_pairs(20)


@pytest.mark.parametrize("measure", ["vocabulary", "agreement"])
def test_the_rule_reads_the_held_out_gs_and_the_knowledge_measure_it_is_told(clip, data, measure):
    editor = UWMEditor(*clip, self_setting(goal=None, knowledge_budget=None, rounds=4, knowledge_measure=measure))
    editor.calibrate(data, progress=False)
    measures = [step.measures for step in editor.trajectory]
    assert any(m["agreement"] != m["agreement_text"] for m in measures)   # so the two sides are told apart
    for step in editor.trajectory:
        m = step.measures
        cost = m["vocabulary_shift"] if measure == "vocabulary" else 100 - m["agreement"]
        assert step.goal == m["GS"] and step.cost == cost
        assert m["cost_resolution"] == (100 / len(data) if measure == "vocabulary" else 100 / 4)   # 4 held out


def test_the_held_out_slice_never_enters_a_backward_pass(monkeypatch, clip, data):
    model, processor = clip
    from hf_uwm.families import ModelFamily

    seen, embed = [], ModelFamily.embed_text

    def recording(self, inputs):
        out = embed(self, inputs)
        if out.requires_grad:   # only the margin's forward builds a graph
            seen.extend(processor.tokenizer.batch_decode(inputs["input_ids"], skip_special_tokens=True))
        return out

    monkeypatch.setattr(ModelFamily, "embed_text", recording)
    editor = UWMEditor(model, processor, self_setting(goal=None, knowledge_budget=None, rounds=2))
    editor.calibrate(data, progress=False)
    kept, held = holdout_rows(len(data), 0.2, seed=0)
    captions = {c for c in seen}
    held_captions = {data[i][c] for i in held for c in ("safe_text", "unsafe_text")}
    kept_captions = {data[i][c] for i in kept for c in ("safe_text", "unsafe_text")}
    assert captions == kept_captions and not captions & held_captions
    assert len(seen) == 2 * 2 * len(kept)    # two rounds, safe and unsafe captions of every kept row
    assert [s.round for s in editor.trajectory] == [0, 1, 2]


def test_images_are_embedded_once_when_no_vision_weight_is_edited(monkeypatch, clip, data):
    from hf_uwm.families import ModelFamily

    model, processor = clip
    calls = []
    embed = ModelFamily.embed_images
    monkeypatch.setattr(ModelFamily, "embed_images", lambda self, inputs: calls.append(len(inputs["pixel_values"]))
                        or embed(self, inputs))
    UWMEditor(model, processor, self_setting(goal=None, knowledge_budget=None, rounds=3)).calibrate(data, progress=False)
    kept, held = holdout_rows(len(data), 0.2, seed=0)
    # once for the gradients' pairs, once for the slice, and every safe image once for the vocabulary measure
    assert sum(calls) == 2 * len(kept) + 2 * len(held) + len(data)


def test_calibration_stops_by_the_rule_and_records_why(counted_cost, clip, data):
    model, processor = clip
    full = UWMEditor(model, processor, self_setting(goal=None, knowledge_budget=None)).calibrate(data, progress=False)
    costs = [s.cost for s in full.trajectory]
    assert costs == pytest.approx([r * 100 * 47 / 4608 for r in range(7)])   # 47 of 3 × 32 × 48 weights a round
    stopped = UWMEditor(model, processor, self_setting(goal=None, knowledge_budget=3.5)).calibrate(
        data, progress=False)
    assert stopped.stop == (3, BUDGET_REACHED)
    assert [s.round for s in stopped.trajectory] == [0, 1, 2, 3, 4]      # round 4 was run, measured, not kept
    assert all(torch.equal(stopped.delta[n], full.with_settings(rounds=3).delta[n]) for n in full.delta)
    # re-selection from the recorded trajectory, without a forward pass
    assert full.with_settings(knowledge_budget=3.5).stop == stopped.stop
    assert full.with_settings(knowledge_budget=1.5).stop == (1, BUDGET_REACHED)
    goal = max(s.goal for s in full.trajectory[1:])
    first = next(s.round for s in full.trajectory[1:] if s.goal >= goal)
    assert full.with_settings(goal=goal).stop == (first, GOAL_REACHED)
    with pytest.raises(ValueError, match="calibrate again"):
        stopped.with_settings(knowledge_budget=5.0)


def killed_in_round_2_and_resumed(monkeypatch, checkpoint_dir, clip, data, cfg, rounds_run: list):
    """A calibration killed as its round 2 starts, then started again on the same checkpoint; the
    rounds each started are appended to `rounds_run`."""
    original = IterativeAttribution.round_scores

    def dying(self, editor, run, round_index):
        rounds_run.append(round_index)
        if round_index == 2 and rounds_run.count(2) == 1:
            raise KeyboardInterrupt
        return original(self, editor, run, round_index)

    monkeypatch.setattr(IterativeAttribution, "round_scores", dying)
    with pytest.raises(KeyboardInterrupt):
        UWMEditor(*clip, cfg).calibrate(data, progress=False, checkpoint_dir=checkpoint_dir)
    return UWMEditor(*clip, cfg).calibrate(data, progress=False, checkpoint_dir=checkpoint_dir)


def test_a_resumed_run_stops_at_the_same_round(tmp_path, monkeypatch, counted_cost, clip, data):
    model, processor = clip
    cfg, first = self_setting(goal=None, knowledge_budget=3.5), 3
    reference = UWMEditor(model, processor, cfg).calibrate(data, progress=False)
    rounds_run = []
    resumed = killed_in_round_2_and_resumed(monkeypatch, tmp_path, clip, data, cfg, rounds_run)
    assert rounds_run == [1, 2, 2, 3, 4]          # round 4 crossed the budget
    assert resumed.stop == reference.stop == (first, BUDGET_REACHED)
    assert [s.to_dict() for s in resumed.trajectory] == [s.to_dict() for s in reference.trajectory]
    assert all(torch.equal(resumed.delta[n], reference.delta[n]) for n in reference.delta)
    # a finished run read back from its checkpoint runs no round at all
    rounds_run.clear()
    again = UWMEditor(model, processor, cfg).calibrate(data, progress=False, checkpoint_dir=tmp_path)
    assert rounds_run == [] and again.stop == reference.stop


def test_the_trajectory_and_the_stop_travel_with_the_delta(tmp_path, clip, data):
    model, processor = clip
    editor = UWMEditor(model, processor, self_setting(goal=None, knowledge_budget=None, rounds=2))
    editor.calibrate(data, progress=False)
    editor.save_pretrained(tmp_path / "delta")
    record = json.loads((tmp_path / "delta" / "uwm_config.json").read_text())
    assert record["stop"] == {"rounds": 2, "reason": MAX_ROUNDS, "max_rounds": 2}
    assert [s["round"] for s in record["trajectory"]] == [0, 1, 2]
    card = (tmp_path / "delta" / "README.md").read_text()
    assert "stopped after 2 of 2 rounds: maximum rounds reached" in card
    loaded = UWMEditor.from_pretrained(tmp_path / "delta", model=model, processor=processor)
    assert [s.to_dict() for s in loaded.trajectory] == [s.to_dict() for s in editor.trajectory]
    assert loaded.stop == editor.stop == (2, MAX_ROUNDS)   # read from its config and trajectory
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "uwm_config.json").read_text())["stop"] == record["stop"]
    # the score cache keeps the trajectory, so a new budget re-selects after loading it
    editor.save_scores(tmp_path / "scores.safetensors")
    cached = UWMEditor(model, processor, editor.config).load_scores(tmp_path / "scores.safetensors")
    assert [s.to_dict() for s in cached.trajectory] == [s.to_dict() for s in editor.trajectory]


def test_siglip_stops_by_the_same_rule(counted_cost, data):
    editor = UWMEditor(*make_siglip(), self_setting(goal=None, knowledge_budget=2.5))
    editor.calibrate(data, progress=False)
    assert editor.stop == (2, BUDGET_REACHED) and len(editor.trajectory) == 4
    assert editor.trajectory[1].measures["GS"] == editor.trajectory[1].goal


def test_a_budget_the_first_round_already_spends_is_a_clear_error(counted_cost, clip, data):
    model, processor = clip
    full = UWMEditor(model, processor, self_setting(goal=None, knowledge_budget=None, rounds=2))
    full.calibrate(data, progress=False)
    with pytest.raises(ValueError, match="first round already"):
        full.with_settings(knowledge_budget=0.5)


@pytest.mark.parametrize("field,value", [("goal", 0), ("goal", 101), ("knowledge_budget", -1), ("holdout", 1.0),
                                         ("holdout", -0.1)])
def test_bad_rule_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"UWMConfig.{field}"):
        UWMConfig(method="iterative_attribution", **{field: value})


def test_no_holdout_needs_the_rule_switched_off():
    with pytest.raises(ValueError, match="holdout=0 leaves nothing"):
        UWMConfig(method="iterative_attribution", holdout=0)
    UWMConfig(method="iterative_attribution", holdout=0, goal=None, knowledge_budget=None)


def test_a_curvature_kept_between_refreshes_equals_its_first_estimate_and_survives_a_resume(tmp_path, monkeypatch,
                                                                                           clip, data):
    from hf_uwm.methods import iterative

    model, processor = clip
    cfg = self_setting(goal=None, knowledge_budget=None, rounds=4, curvature_every=2)
    fresh_rounds, original = [], iterative.probe_directions

    def counting(seed, round_index, *args):
        fresh_rounds.append(round_index)
        return original(seed, round_index, *args)

    monkeypatch.setattr(iterative, "probe_directions", counting)
    reference = UWMEditor(model, processor, cfg).calibrate(data, progress=False)
    assert sorted(set(fresh_rounds)) == [1, 3]          # estimated in rounds 1 and 3, reused in 2 and 4
    every = UWMEditor(model, processor, self_setting(goal=None, knowledge_budget=None, rounds=4))
    every.calibrate(data, progress=False)
    assert all(torch.equal(reference.scores[n] == 1, every.scores[n] == 1) for n in every.scores)   # round 1 alike
    assert any(not torch.equal(reference.scores[n], every.scores[n]) for n in every.scores)   # then reused
    resumed = killed_in_round_2_and_resumed(monkeypatch, tmp_path, clip, data, cfg, [])
    assert all(torch.equal(resumed.scores[n], reference.scores[n]) for n in reference.scores)


# --- copies, resolution and float noise ------------------------------------------------------------
def test_copies_of_a_caption_are_one_caption_so_a_tie_between_them_is_no_change():
    torch.manual_seed(1)
    h, d = 6, 8
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    base, images = unit(torch.randn(2 * h, d)), unit(torch.randn(2 * h, d))
    base[1] = base[0]                                  # caption 1 is a copy of caption 0
    images[:h] = unit(base[:h] + 0.05 * torch.randn(h, d))
    edited = base.clone()
    edited[0] = unit(base[0] - 1e-6 * images[0])       # float rounding between the copies: the image picks copy 1
    edited[1] = unit(base[1] + 1e-6 * images[0])
    ids = torch.tensor([0, 0, 1, 2, 3, 4])
    assert slice_measures(edited, images, base)["agreement"] < 100            # index by index: a change
    m = slice_measures(edited, images, base, caption_ids=ids)
    assert m["agreement"] == 100 and m["agreement_text"] == 100
    assert m["agreement_resolution"] == pytest.approx(100 / h) and m["agreement_text_resolution"] == pytest.approx(100 / 5)
    # copies of an image are one image too
    images[1] = images[0]
    m = slice_measures(edited, images, base, caption_ids=ids, image_ids=ids)
    assert m["agreement_resolution"] == pytest.approx(100 / 5)


def test_vocabulary_measures_equal_their_definitions():
    from hf_uwm.methods.held_out import vocabulary_measures

    torch.manual_seed(2)
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    images, base, words = unit(torch.randn(9, 4)), unit(torch.randn(5, 4)), unit(torch.randn(5, 4))
    labels = torch.rand(9, 5) < 0.4
    m = vocabulary_measures(images, labels, words, base, logit_scale=30.0)
    shift = same = mass = top = 0.0
    for img, own in zip(images.double(), labels.tolist()):
        p = [math.exp(30 * float(img @ w)) for w in base.double()]
        q = [math.exp(30 * float(img @ w)) for w in words.double()]
        p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
        shift += 0.5 * sum(abs(a - b) for a, b in zip(p, q))
        best_p, best_q = max(range(5), key=p.__getitem__), max(range(5), key=q.__getitem__)
        same += best_p == best_q
        mass += sum(p[v] - q[v] for v in range(5) if own[v])
        top += own[best_p] - own[best_q]
    assert m["vocabulary_shift"] == pytest.approx(100 * shift / 9)
    assert m["vocabulary_agreement"] == pytest.approx(100 * same / 9)
    assert m["vocabulary_mass_lost"] == pytest.approx(100 * mass / 9)
    assert m["vocabulary_accuracy_lost"] == pytest.approx(100 * top / 9)
    assert m["vocabulary_mass_lost_resolution"] == pytest.approx(100 / 9)
    unchanged = vocabulary_measures(images, labels, base, base, 30.0)
    assert unchanged["vocabulary_shift"] == unchanged["vocabulary_mass_lost"] == 0


def test_the_vocabulary_is_the_words_both_captions_of_a_pair_share():
    from hf_uwm.methods.held_out import knowledge_vocabulary

    safe = ["a photo of a red cat on grass", "a photo of a blue cat", "a photo of a red dog on sand",
            "a photo of the dog next to a ball", "an image of a bird"]
    unsafe = ["a photo of a red cat on grass with blood", "a photo of a blue cat and a knife",
              "a photo of a dead red dog on sand", "a photo of the dog next to a gun", "an image of a dead bird"]
    # not "ball" (only in a safe caption), "blood", "dead", "gun", "knife" (only in unsafe ones)
    assert knowledge_vocabulary(safe, unsafe) == ["bird", "blue", "cat", "dog", "grass", "image", "red", "sand"]
    # "dark" is in both captions of one pair but in the unsafe caption alone of two: a mark of the unsafe side
    darker = (safe + ["a dark cow", "a cow", "a cow"], unsafe + ["a dark cow with blood", "a dark cow", "a dark cow"])
    assert "dark" not in knowledge_vocabulary(*darker) and "cow" in knowledge_vocabulary(*darker)
    assert knowledge_vocabulary(safe[::-1], unsafe[::-1]) == knowledge_vocabulary(safe, unsafe)
    assert knowledge_vocabulary(safe, unsafe, size=3) == ["cat", "dog", "red"]   # the most frequent
    with pytest.raises(ValueError, match="share no word"):
        knowledge_vocabulary(["a photo of a"], ["a photo of the"])


def test_a_cost_within_the_measures_resolution_never_stops_an_edit():
    trajectory = [Step(r, goal, cost, 10 * r, {"cost_resolution": 2.5}) for r, (goal, cost) in
                  enumerate([(0, 0), (10, 2.5), (20, 2.0), (30, 2.6), (99, 9.0)])]
    # a budget of 1 point: costs of 2.5 (one item of 40) are noise, 2.6 is more than one item
    assert stopping_round(trajectory, goal=None, knowledge_budget=1.0, max_rounds=40) == (2, BUDGET_REACHED)
    assert stopping_round(trajectory, goal=None, knowledge_budget=3.0, max_rounds=40) == (3, BUDGET_REACHED)


def test_a_slice_too_small_for_the_rule_is_refused_or_flagged_before_any_compute(monkeypatch, clip):
    from hf_uwm.methods import iterative

    monkeypatch.setattr(iterative.IterativeAttribution, "round_scores",
                        lambda *a: pytest.fail("the slice is checked before any round"))
    with pytest.raises(ValueError, match=r"3 held-out pairs \(0.2 of 15\) move the stopping rule's GS in 33.3-point steps"):
        UWMEditor(*clip, self_setting()).calibrate(unique_pairs(15), progress=False)
    with pytest.warns(UserWarning, match=r"8 held-out pairs \(0.2 of 40\) move the stopping rule's GS in 12.5-point steps"):
        with pytest.raises(pytest.fail.Exception):
            UWMEditor(*clip, self_setting()).calibrate(make_pairs(40), progress=False)
    # the rule switched off needs no slice
    from hf_uwm.methods.held_out import check_slice
    check_slice(1, 5, self_setting(goal=None, knowledge_budget=None))
