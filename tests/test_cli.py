"""The hf-uwm command line on a tiny CLIP saved to disk and a small saved pair set."""

import csv
import json

import pytest

from conftest import make_clip, make_pairs
from hf_uwm.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model, processor = make_clip()
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    make_pairs(12, seed=1).save_to_disk(str(root / "pairs"))
    make_pairs(10, seed=2).save_to_disk(str(root / "validation"))
    return root


def test_help_explains_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "edit", "eval", "sweep", "push-metric"):
        assert command in out
    assert main([]) == 2


def test_edit_then_eval_a_delta(files, tmp_path, capsys):
    delta = tmp_path / "delta"
    assert main(["edit", str(files / "model"), "--data", str(files / "pairs"), "--output", str(delta),
                 "--tau", "0.05", "--quiet"]) == 0
    record = json.loads((delta / "uwm_config.json").read_text())
    assert record["config"]["tau"] == 0.05 and record["base_model"] is None and record["base_model_folder"] == "model"
    assert main(["eval", str(delta), "--data", str(files / "validation"), "--bootstrap", "0", "--quiet"]) == 1
    assert "--base PATH" in capsys.readouterr().err  # a local base is not recorded by path: the CLI says how
    assert main(["eval", str(delta), "--base", str(files / "model"), "--data", str(files / "validation"),
                 "--bootstrap", "0", "--quiet", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "base" in out and "edited" in out and "GS" in out
    assert set(json.loads((tmp_path / "r.json").read_text())) == {"base", "edited"}


def test_text_only_edit(files, tmp_path):
    assert main(["edit", str(files / "model"), "--data", str(files / "pairs"), "--towers", "text",
                 "--output", str(tmp_path / "d"), "--quiet"]) == 0
    assert json.loads((tmp_path / "d" / "uwm_config.json").read_text())["config"]["vision_targets"] == []


def test_sweep_writes_table_csv_and_png(files, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["sweep", str(files / "model"), "--data", str(files / "pairs"), "--eval", str(files / "validation"),
                 "--tau", "0.02", "0.1", "--alpha", "-1", "0", "--layers", "text:self_attn.out_proj",
                 "text:self_attn.out_proj,vision:mlp.fc2", "--output", str(out), "--save-best", str(tmp_path / "best"),
                 "--max-zero-shot-drop", "100", "--quiet"])
    assert code == 0
    text = capsys.readouterr().out
    assert "rnd GS" in text
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert len(rows) == 1 + 2 * 2 * 2 and rows[0]["method"] == "base"
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    # A random tiny CLIP has no unsafe direction to remove: no setting beats its control, none is saved.
    assert "beats its random control" in text and "nothing saved" in text
    assert not (tmp_path / "best").exists()


def test_sweep_saves_a_setting_at_chance_only_when_asked(files, tmp_path, capsys):
    code = main(["sweep", str(files / "model"), "--data", str(files / "pairs"), "--eval", str(files / "validation"),
                 "--tau", "0.02", "--output", str(tmp_path / "sweep"), "--save-best", str(tmp_path / "best"),
                 "--save-best-at-chance", "--max-zero-shot-drop", "100", "--quiet"])
    assert code == 0
    assert "does not beat its random control" in capsys.readouterr().out
    assert (tmp_path / "best" / "uwm_delta.safetensors").is_file()


@pytest.mark.parametrize("argv,message", [
    (["edit", "/no/such/model", "--data", "/no/such/data", "--output", "x"], "error"),
    (["edit", "MODEL", "--data", "organism", "--output", "x", "--towers", "audio"], "--towers"),
    (["edit", "MODEL", "--data", "DATA", "--output", "x", "--columns", "oops"], "--columns"),
])
def test_bad_arguments_give_a_message_not_a_traceback(files, argv, message, capsys):
    argv = [str(files / "model") if a == "MODEL" else str(files / "pairs") if a == "DATA" else a for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_required_argument_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["edit", "model"])
    assert exit_.value.code == 2
    assert "--data" in capsys.readouterr().err


def test_sweep_of_iterative_attribution_calibrates_once_per_score_setting(files, tmp_path, capsys, monkeypatch):
    from hf_uwm.editor import UWMEditor

    calls = []
    calibrate = UWMEditor.calibrate
    monkeypatch.setattr(UWMEditor, "calibrate",
                        lambda self, *a, **k: calls.append(self.config) or calibrate(self, *a, **k))
    assert main(["sweep", str(files / "model"), "--data", str(files / "pairs"), "--eval", str(files / "validation"),
                 "--score", "iterative_attribution", "--rounds", "1", "2", "--curvature-weight", "0", "4",
                 "--output", str(tmp_path / "sweep"), "--max-zero-shot-drop", "100", "--quiet"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "sweep.csv")))
    assert [r["setting"] for r in rows[1:]] == [f"rounds={r} curvature_weight={w} alpha=-1"
                                                for r in (1, 2) for w in (0, 4)]
    # The most rounds are calibrated once per curvature weight; fewer rounds are re-selected from that run.
    assert [(c.rounds, c.curvature_weight) for c in calls] == [(2, 0.0), (2, 4.0)]
