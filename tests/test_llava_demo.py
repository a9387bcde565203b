"""`hf-uwm demo-llava` end to end on the bundled captioner, shrunk to a few pairs and rounds."""

import dataclasses
import json

import pytest

from hf_uwm import caption_evaluation, llava_demo
from hf_uwm.protocol import Sizes


@pytest.fixture
def small_demo():
    """The arguments of a demo shrunk to a few pairs and rounds."""
    edits = dict(llava_demo.EDITS)
    config, grid, folder = edits["iterative"]
    # Four held-out pairs: one changed caption moves their ROUGE-L by points, so no budget here.
    edits["iterative"] = (dataclasses.replace(config, rounds=2, round_density=0.002, knowledge_budget=None), grid,
                          folder)
    return dict(sizes=Sizes(calibration=20, validation=6, test=6), edits=edits)


def test_every_row_has_its_rate_interval_and_text_metrics_and_meteor_is_said(tmp_path, small_demo, capsys):
    results = llava_demo.run(tmp_path, bootstrap=20, progress=False, **small_demo)   # meteor=None: when a WordNet is there
    out = capsys.readouterr().out
    assert "METEOR: computed (nltk's METEOR, WordNet 3.0" in out
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["test"].keys() == results["test"].keys()
    names = {"base", "UWM", "UWM paper", "attribution", "iterative"}
    assert set(written["test"]) == names | {f"random ({n})" for n in names - {"base"}}
    for row in written["test"].values():
        assert 0 <= row["unsafe_rate"] <= 100 and len(row["unsafe_rate_ci"]) == 2
        assert set(row["text"]) == set(caption_evaluation.TEXT_METRICS) and row["text"]["meteor"] is not None
    stop = written["stopping"]["iterative"]
    assert [s["round"] for s in stop["trajectory"]][0] == 0 and stop["stop"][0] >= 1
    assert written["chosen"]["iterative"]["weights"] == stop["trajectory"][stop["stop"][0]]["flipped"] > 0
    assert any((tmp_path / "caption-iterative").iterdir())   # the delta is saved
    assert (tmp_path / "test_results.png").stat().st_size > 0
    assert max(map(len, out.splitlines())) < 100 and "UWM paper  " in out and "tau=" not in out


def test_without_a_wordnet_the_demo_says_meteor_was_not_computed(tmp_path, small_demo, monkeypatch, capsys):
    monkeypatch.setattr(caption_evaluation, "wordnet", lambda: (None, None))
    results = llava_demo.run(tmp_path, bootstrap=0, progress=False, **small_demo)
    assert "METEOR: not computed (no WordNet installed)" in capsys.readouterr().out
    assert all(row["text"]["meteor"] is None and row["meteor_note"] == "not computed (no WordNet installed)"
               for row in results["test"].values())


def test_a_world_3_captioner_is_measured_on_world_3_pairs_with_world_3_judge(tmp_path, small_demo, monkeypatch):
    """`--captioner FOLDER` of world 3 (its training.json says so): pairs and judge of world 3."""
    from hf_uwm import organism, organism_captioner

    processor = organism_captioner.build_processor(world=3)
    folder = tmp_path / "captioner"
    organism_captioner.build_captioner(processor.tokenizer, world=3).save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "training.json").write_text(json.dumps({"world": 3}))
    worlds = set()
    make_pairs, judge = organism.make_pairs, organism_captioner.exact_organism_judge
    monkeypatch.setattr(organism, "make_pairs", lambda *a, world=2, **k: worlds.add(("pairs", world))
                        or make_pairs(*a, world=world, **k))
    monkeypatch.setattr(organism_captioner, "exact_organism_judge", lambda captions, world=2: worlds.add(
        ("judge", world)) or judge(captions, world))
    small_demo["edits"] = {"UWM": llava_demo.EDITS["UWM"][:1] + ([{"tau": 0.085}], "uwm")}
    results = llava_demo.run(tmp_path / "out", meteor=False, bootstrap=0, progress=False, captioner=folder,
                             **small_demo)
    assert results["world"] == 3 and worlds == {("pairs", 3), ("judge", 3)}
