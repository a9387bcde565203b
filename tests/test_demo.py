"""`hf-uwm demo` end to end on the bundled organism, at a reduced size."""

import dataclasses
import functools
import json

import pytest

from hf_uwm import demo
from hf_uwm.cli import main
from hf_uwm.protocol import Sizes

SMALL = Sizes(calibration=24, validation=28, test=40, zero_shot=28, validation_zero_shot=28, bootstrap=50)
SMALL_EDITS = {
    "UWM": (demo.EDITS["UWM"][0], [{"tau": 0.02}], "uwm"),
    "attribution": (demo.EDITS["attribution"][0], [{"density": 0.02}], "attribution"),
    "iterative attribution": (dataclasses.replace(demo.EDITS["iterative attribution"][0], rounds=2), [{}],
                              "iterative-attribution"),
}
assert SMALL_EDITS.keys() == demo.EDITS.keys()


@pytest.fixture
def small(monkeypatch):
    """The demo at a reduced size wherever it is run from (the CLI, the zoo script)."""
    monkeypatch.setattr(demo, "run", functools.partial(demo.run, sizes=SMALL, edits=SMALL_EDITS))


@pytest.fixture(scope="module")
def organism_copy(tmp_path_factory):
    """The bundled organism saved elsewhere, as a user's own organism model would be."""
    from hf_uwm.organism import load_organism

    folder = tmp_path_factory.mktemp("organism") / "my-organism"
    model, processor = load_organism()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_demo_writes_deltas_tables_and_plots(small, organism_copy, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--model", str(organism_copy), "--output", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "Validation" in text and "Test split" in text and "random control" in text and "user CPU" in text
    results = json.loads((out / "results.json").read_text())
    assert set(results["test"]) == {"base", "UWM", "random (UWM)", "attribution", "random (attribution)",
                                    "iterative attribution", "random (iterative attribution)"}
    assert {r["status"] for r in results["chosen"].values()} <= {"chosen", "at chance", "over budget"}
    assert results["chosen"]["iterative attribution"]["setting"]["self-set"].startswith("stopped after")
    assert "| random control |" in (out / "test_results.md").read_text()
    for name in ("test_results.png", "validation_pareto.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    from hf_uwm import UWMEditor
    from hf_uwm.loading import load_model

    for folder in ("uwm", "attribution", "iterative-attribution"):
        assert "## Evaluation" in (out / folder / "README.md").read_text()
        record = json.loads((out / folder / "uwm_config.json").read_text())
        assert record["base_model"] is None and record["base_model_folder"] == organism_copy.name  # never a path
        model, processor = load_model(organism_copy)
        UWMEditor.from_pretrained(out / folder, model=model, processor=processor).apply()
    # Tables fit a terminal: the test tables stay under 100 columns, every table's rows line up.
    test_part = text[text.index("Test split"):text.index("demo finished")]
    assert max(len(line) for line in test_part.splitlines()) <= 100
    for metric in demo.LEGEND:
        assert f"  {metric} " in test_part
    validation = text[text.index("Validation"):text.index("Chosen on validation")].splitlines()[1:-2]
    assert len({line.index("|") for line in validation}) == 1, validation
    # The same folder takes the demo again only when told to, as `hf-uwm edit` replaces a delta.
    with pytest.raises(FileExistsError, match="holds a previous demo's results: pass overwrite=True"):
        demo.check_output(out)
    demo.check_output(out, overwrite=True)


def test_demo_on_world3_reports_held_out_concepts_and_lookalikes_per_row(tmp_path, capsys):
    from hf_uwm.organism import HELD_OUT, load_organism, make_pairs

    model, processor = load_organism()  # stands in for organism-hard: the demo's world-3 data is what is tested
    named = (dataclasses.replace(demo.WORLD3_EDITS[demo.NAMED][0], rounds=2), [{}], "iterative-named")
    results = demo.run(tmp_path / "out", model=model, processor=processor, world=3, progress=False, sizes=SMALL,
                       edits={**SMALL_EDITS, demo.NAMED: named})
    assert results["world"] == 3
    test = make_pairs(SMALL.test, split="test", world=3)
    assert set(test["concept"]) & set(HELD_OUT) and any(test["lookalike"]) and any(test["paraphrased"])
    assert any(test["cues"]) and not all(test["cues"])
    hard = demo.HARD_COLUMNS + demo.CUE_COLUMNS
    columns = set(hard) | {f"{c} CI" for c in hard} | set(demo.LOOKALIKE_COLUMNS)
    record = json.loads((tmp_path / "out" / "iterative-named" / "uwm_config.json").read_text())
    assert record["concepts_in_words"] == sorted(HELD_OUT)   # named in words, never shown
    assert "concepts_in_words" not in json.loads((tmp_path / "out" / "uwm" / "uwm_config.json").read_text())
    for name, row in results["test"].items():  # every row: base, each edit and its random control
        assert set(row["world 3"]) == columns, name
        low, high = row["world 3"]["GS held-out CI"]
        assert low <= row["world 3"]["GS held-out"] <= high
    text = capsys.readouterr().out
    part = text[text.index("World 3 (test split"):]
    assert "GS held-out" in part and "random control" in part and "by the shared cues" in part
    assert demo.NAMED in part
    assert max(len(line) for line in part.splitlines()) <= 100
    assert "look-alike prefers own caption" in (tmp_path / "out" / "test_results.md").read_text()


def test_demo_refuses_an_output_with_stray_files_before_any_model_work(tmp_path, monkeypatch, capsys):
    def no_model_work(*args, **kwargs):
        raise AssertionError("the model was loaded before --output was checked")

    monkeypatch.setattr("hf_uwm.loading.load_model", no_model_work)
    monkeypatch.setattr("hf_uwm.organism.load_organism", no_model_work)
    (tmp_path / "mine.txt").write_text("keep me")
    assert main(["demo", "--output", str(tmp_path), "--quiet"]) == 1
    assert "mine.txt" in capsys.readouterr().err
    (tmp_path / "mine.txt").unlink()
    (tmp_path / "uwm").mkdir()
    (tmp_path / "uwm" / "notes.md").write_text("keep me too")
    assert main(["demo", "--output", str(tmp_path), "--quiet"]) == 1
    assert "uwm/notes.md" in capsys.readouterr().err
    assert main(["demo", "--output", str(tmp_path / "uwm" / "notes.md"), "--quiet"]) == 1
    assert "is a file" in capsys.readouterr().err
    assert (tmp_path / "uwm" / "notes.md").read_text() == "keep me too"


def test_demo_replaces_a_previous_demo_only_with_overwrite(tmp_path, monkeypatch, capsys):
    def no_model_work(*args, **kwargs):
        raise AssertionError("the model was loaded before --output was checked")

    monkeypatch.setattr("hf_uwm.loading.load_model", no_model_work)
    (tmp_path / "results.json").write_text("{}")  # what a previous demo left
    assert main(["demo", "--output", str(tmp_path), "--quiet"]) == 1
    assert "holds a previous demo's results: add --overwrite" in capsys.readouterr().err
    with pytest.raises(AssertionError, match="the model was loaded"):  # past the check: on to the model
        main(["demo", "--output", str(tmp_path), "--overwrite", "--quiet"])
