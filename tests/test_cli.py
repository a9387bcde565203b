"""The hf-uwm command line on a tiny CLIP saved to disk and a small saved pair set."""

import csv
import json
import re
import warnings

import pytest

from conftest import make_pairs, save_model_and_pairs
from hf_uwm.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return save_model_and_pairs(tmp_path_factory.mktemp("cli"), pairs=20, validation=10)   # 4 held out: the least a stopping rule takes


def test_help_explains_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "edit", "eval", "sweep", "push-metric", "install-metric"):
        assert command in out
    assert main([]) == 2


def test_edit_then_eval_a_delta(files, tmp_path, capsys):
    delta = tmp_path / "delta"
    assert main(["edit", str(files / "model"), "--data", str(files / "pairs"), "--output", str(delta),
                 "--method", "ratio", "--tau", "0.05", "--quiet"]) == 0
    record = json.loads((delta / "uwm_config.json").read_text())
    assert record["config"]["tau"] == 0.05 and record["base_model"] is None and record["base_model_folder"] == "model"
    assert main(["eval", str(delta), "--data", str(files / "validation"), "--bootstrap", "0", "--quiet"]) == 1
    assert "--base PATH" in capsys.readouterr().err  # a local base is not recorded by path: the CLI says how
    assert main(["eval", str(delta), "--base", str(files / "model"), "--data", str(files / "validation"),
                 "--bootstrap", "0", "--quiet", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "base" in out and "edited" in out and "GS" in out
    assert set(json.loads((tmp_path / "r.json").read_text())) == {"base", "edited"}
    assert main(["eval", str(delta), "--base", str(files / "model"), "--data", str(files / "validation"),
                 "--bootstrap", "0", "--quiet", "--random-control", "--json", str(tmp_path / "r.json")]) == 0
    reports = json.loads((tmp_path / "r.json").read_text())
    assert list(reports) == ["base", "edited", "random control"] and "random control" in capsys.readouterr().out
    assert reports["random control"] != reports["edited"]
    assert main(["eval", str(files / "model"), "--data", str(files / "validation"), "--random-control"]) == 1
    assert "--random-control needs a delta" in capsys.readouterr().err


def test_text_only_edit(files, tmp_path):
    # a random model's vocabulary moves more in one round than the default budget allows
    assert main(["edit", str(files / "model"), "--data", str(files / "pairs"), "--towers", "text",
                 "--knowledge-budget", "none", "--rounds", "3", "--output", str(tmp_path / "d"), "--quiet"]) == 0
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
    # the organism: a random model's vocabulary moves more in one round than the default budget allows
    assert main(["sweep", "organism", "--data", "organism", "--samples", "40", "--eval", "organism", "--eval-samples",
                 "40", "--method", "iterative_attribution", "--rounds", "1", "2", "--curvature-weight", "0", "4",
                 "--output", str(tmp_path / "sweep"), "--max-zero-shot-drop", "100", "--quiet"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "sweep.csv")))
    assert [r["setting"] for r in rows[1:]] == [f"rounds={r} curvature_weight={w} alpha=-1"
                                                for r in (1, 2) for w in (0, 4)]
    # The most rounds are calibrated once per curvature weight; fewer rounds are re-selected from that run.
    assert [(c.rounds, c.curvature_weight) for c in calls] == [(2, 0.0), (2, 4.0)]


# --- the default method and its flags ---------------------------------------------------------------
def test_edit_help_gives_every_method_its_purpose_and_marks_the_default(capsys):
    from hf_uwm.methods import get_method, method_names

    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    assert "iterative_attribution (default): recommended" in out
    for name in method_names():
        assert f"{name}{' (default)' if name == 'iterative_attribution' else ''}: {get_method(name).help}" in out
    assert "reproduces the paper" in get_method("ratio").help


def test_edit_runs_iterative_attribution_by_default_and_says_what_it_did(files, tmp_path, capsys):
    assert main(["edit", str(files / "model"), "--data", str(files / "pairs"), "--output", str(tmp_path / "d"),
                 "--rounds", "2", "--knowledge-budget", "none", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert json.loads((tmp_path / "d" / "uwm_config.json").read_text())["config"]["method"] == "iterative_attribution"
    assert "iterative_attribution" in out and "flipped" in out and "τ" not in out  # it has no τ
    assert main(["edit", str(files / "model"), "--data", str(files / "pairs"), "--output", str(tmp_path / "u"),
                 "--method", "ratio", "--quiet"]) == 0
    assert "ratio, τ=0.02, α=-1" in capsys.readouterr().out


def test_the_stopping_flags_reach_the_config_and_foreign_flags_are_refused(files, tmp_path, capsys):
    assert main(["edit", str(files / "model"), "--data", str(files / "pairs"), "--output", str(tmp_path / "d"),
                 "--goal", "none", "--knowledge-budget", "100", "--knowledge-measure", "agreement", "--holdout", "0.25",
                 "--rounds", "2", "--quiet"]) == 0
    config = json.loads((tmp_path / "d" / "uwm_config.json").read_text())["config"]
    assert (config["goal"], config["knowledge_budget"], config["knowledge_measure"], config["holdout"],
            config["rounds"]) == (None, 100.0, "agreement", 0.25, 2)
    base = ["edit", str(files / "model"), "--data", str(files / "pairs"), "--output", str(tmp_path / "x"), "--quiet"]
    assert main(base + ["--tau", "0.05"]) == 1
    assert "add --method ratio for UWM as published" in capsys.readouterr().err
    assert main(base + ["--method", "ratio", "--goal", "90", "--holdout", "0.1"]) == 1
    assert ("--goal, --holdout: not a setting of --method ratio (its settings: --tau, --selection, --density, "
            "--token-norm, --text-prior, --vision-prior, --eps)") in capsys.readouterr().err
    assert main(base + ["--score", "caption_iterative", "--round-density", "0.01"]) == 1   # the former flag name
    assert "edits llava models, not CLIPModel: use method='iterative_attribution'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--knowledge-budget", "lots"])
    assert "expected a number of points such as 2, or 'none'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_trajectory_is_summarised_and_plotted_when_the_editor_has_one(files, tmp_path, capsys):
    import json

    assert main(["edit", str(files / "model"), "--data", str(files / "pairs"), "--output", str(tmp_path / "d"),
                 "--rounds", "2", "--goal", "none", "--knowledge-budget", "none", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "stopped after 2 of 2 rounds: maximum rounds reached" in out and "τ" not in out
    assert (tmp_path / "d" / "trajectory.png").read_bytes()[:4] == b"\x89PNG"
    record = json.loads((tmp_path / "d" / "uwm_config.json").read_text())
    assert [step["round"] for step in record["trajectory"]] == [0, 1, 2]
    # the plot is part of the delta: a second edit into the folder is refused, then replaces it
    assert main(["edit", str(files / "model"), "--data", str(files / "pairs"), "--output", str(tmp_path / "d"),
                 "--rounds", "1", "--goal", "none", "--knowledge-budget", "none", "--quiet", "--overwrite"]) == 0


def test_text_only_pairs_edit_the_text_tower_or_are_refused_with_the_methods_that_take_them(files, tmp_path, capsys):
    (tmp_path / "texts.csv").write_text("safe_text,unsafe_text\n" + "".join(
        f"a red {n},a dead red {n}\na blue {n},a blue {n} next to a gun\n" for n in "cat dog car tree house".split()))
    assert main(["edit", str(files / "model"), "--data", str(tmp_path / "texts.csv"), "--output", str(tmp_path / "d"),
                 "--rounds", "2", "--goal", "none", "--knowledge-budget", "none", "--holdout", "0", "--quiet"]) == 0
    record = json.loads((tmp_path / "d" / "uwm_config.json").read_text())
    assert record["counts"]["text"] > 0 and "vision" not in record["counts"]
    assert main(["edit", str(files / "model"), "--data", str(tmp_path / "texts.csv"), "--output",
                 str(tmp_path / "e"), "--method", "g_unsafe", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "10 of the 10 calibration pairs are text-only (no images), and --method g_unsafe needs" in err
    assert "iterative_attribution" in err and "method=" not in err
    assert not (tmp_path / "e").exists()


def test_concepts_build_text_only_pairs_in_the_captions_pattern(tmp_path, monkeypatch):
    from hf_uwm.commands import edit
    from hf_uwm.organism import make_pairs

    (tmp_path / "concepts.txt").write_text("# named in words\nlaser\n")
    seen = {}

    class Stop(Exception):
        pass

    def calibrate(editor, data, **kwargs):
        seen["data"] = data
        raise Stop   # before any compute: the pairs are what is checked

    monkeypatch.setattr("hf_uwm.editor.UWMEditor.calibrate", calibrate)
    with pytest.raises(Stop):
        main(["edit", "organism", "--data", "organism", "--samples", "20", "--concepts", str(tmp_path / "concepts.txt"),
              "--output", str(tmp_path / "d"), "--quiet"])
    data, pairs = seen["data"], make_pairs(20)
    assert len(data) == 24 and data["concept"][20:] == ["laser"] * 4   # 20 pairs of 5 concepts: 4 per concept
    expected = {s + u[len(s):].rsplit(" ", 1)[0] + " laser" for s, u, c in zip(pairs["safe_text"], pairs["unsafe_text"],
                                                                                pairs["concept"]) if u.endswith(c)}
    assert set(data["unsafe_text"][20:]) <= expected and data["safe_image"][20:] == [None] * 4
    with pytest.raises(Stop):
        main(["edit", "organism", "--data", "organism", "--samples", "20", "--concepts", str(tmp_path / "concepts.txt"),
              "--concept-template", "{caption} and a {concept}", "--output", str(tmp_path / "d"), "--quiet"])
    assert all(u == f"{s} and a laser" for s, u in zip(seen["data"]["safe_text"][20:], seen["data"]["unsafe_text"][20:]))


@pytest.mark.parametrize("flags, message", [
    (["--concept-template", "{caption} x {concept}"], "give --concepts FILE too"),
    (["--concepts", "missing.txt"], "does not exist"),
    (["--concepts", "empty.txt"], "names no concept"),
    (["--concepts", "concepts.txt", "--concept-template", "{caption} and a gun"], r"must hold \{caption\} and \{concept\}"),
    (["--text-pairs", "missing.csv"], "missing.csv"),
])
def test_concept_flags_refuse_bad_input_in_one_line(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    (tmp_path / "concepts.txt").write_text("gun\n")
    assert main(["edit", "organism", "--data", "organism", "--samples", "20", *flags, "--output", "d", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err and not (tmp_path / "d").exists()


# --- a user's own single-file data ------------------------------------------------------------------
@pytest.fixture(scope="module")
def csv_pairs(files):
    """The saved pairs as one CSV of texts and relative image paths, as a user writes them."""
    import datasets

    pairs = datasets.load_from_disk(str(files / "validation"))
    (files / "img").mkdir(exist_ok=True)
    with open(files / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["safe_text", "unsafe_text", "safe_image", "unsafe_image"])
        for i, row in enumerate(pairs):
            row["safe_image"].save(files / "img" / f"s{i}.png")
            row["unsafe_image"].save(files / "img" / f"u{i}.png")
            writer.writerow([row["safe_text"], row["unsafe_text"], f"img/s{i}.png", f"img/u{i}.png"])
    return files / "pairs.csv"


def test_single_file_data_is_its_own_split_for_eval_and_sweep(files, csv_pairs, tmp_path, capsys):
    delta = tmp_path / "delta"
    assert main(["edit", str(files / "model"), "--data", str(csv_pairs), "--output", str(delta), "--method", "ratio",
                 "--quiet"]) == 0
    # eval's default split is test, sweep's --eval-split validation: the file's rows answer to both.
    assert main(["eval", str(delta), "--base", str(files / "model"), "--data", str(csv_pairs), "--bootstrap", "0",
                 "--quiet"]) == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["sweep", str(files / "model"), "--data", str(csv_pairs), "--eval", str(csv_pairs), "--tau",
                     "0.02", "--output", str(tmp_path / "sweep"), "--quiet"]) == 0
    assert not [w for w in caught if "Asked for" in str(w.message)]  # nobody asked for a number of pairs
    assert "GS" in capsys.readouterr().out and (tmp_path / "sweep" / "pareto.png").is_file()


def test_warnings_are_one_line_of_the_command(files, csv_pairs, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import hf_uwm

    root = str(Path(hf_uwm.__file__).parents[1])
    run = subprocess.run([sys.executable, "-m", "hf_uwm.cli", "edit", str(files / "model"), "--data", str(csv_pairs),
                          "--samples", "300", "--method", "ratio", "--output", str(tmp_path / "d"), "--quiet"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": root})
    assert run.returncode == 0, run.stderr
    assert "hf-uwm edit: warning: Asked for 300 pairs but" in run.stderr
    assert "UserWarning" not in run.stderr and "data.py" not in run.stderr and "return _finish" not in run.stderr


def test_a_missing_optional_dependency_is_a_message_not_a_traceback(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "sacrebleu", None)   # as if `hf_uwm[captioning]` were not installed
    assert main(["eval-captions", "organism-captioner", "--data", "organism", "--samples", "2", "--no-meteor",
                 "--bootstrap", "0", "--max-new-tokens", "2", "--quiet"]) == 1
    assert "pip install hf_uwm[captioning]" in capsys.readouterr().err


# --- messages about the real mismatch ---------------------------------------------------------------
@pytest.fixture(scope="module")
def organism_delta(tmp_path_factory):
    folder = tmp_path_factory.mktemp("organism") / "delta"
    assert main(["edit", "organism", "--data", "organism", "--samples", "16", "--method", "ratio", "--towers", "text",
                 "--output", str(folder), "--quiet"]) == 0
    return folder


def test_a_wrong_base_is_blamed_on_base_and_says_what_to_give(files, organism_delta, tmp_path, capsys):
    tiny = tmp_path / "tiny-delta"
    assert main(["edit", str(files / "model"), "--data", str(files / "pairs"), "--method", "ratio", "--towers", "text",
                 "--output", str(tiny), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tiny), "--data", "organism", "--base", "organism", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "that the model of --base (a CLIPModel) lacks or has in other shapes: give the model it was made on " \
           "(a local model folder 'model') with --base." in err and "None" not in err
    assert main(["eval", str(organism_delta), "--data", "organism", "--base", "organism-hard", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "The target weights of the model of --base differ from the base model this delta was made on " \
           "('organism'): drop --base: the delta loads 'organism' itself." in err and "already applied" not in err


def test_an_unknown_method_in_a_saved_delta_names_the_file(organism_delta, tmp_path, capsys):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(organism_delta, other)
    record = json.loads((other / "uwm_config.json").read_text())
    record["config"]["method"] = "frobnicate"
    (other / "uwm_config.json").write_text(json.dumps({**record, "hf_uwm_version": "9.0"}))
    assert main(["eval", str(other), "--data", "organism", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"{other / 'uwm_config.json'}: Unknown method 'frobnicate'" in err and "written by hf_uwm 9.0" in err


def test_alpha_outside_minus_one_to_one_is_warned_about(files, tmp_path):
    edit = ["edit", str(files / "model"), "--data", str(files / "pairs"), "--method", "ratio", "--quiet", "--alpha"]
    with pytest.warns(UserWarning, match=r"--alpha 5 multiplies each selected weight by 5, beyond the \[-1, 1\]"):
        assert main(edit + ["5", "--output", str(tmp_path / "d")]) == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(edit + ["-0.5", "--output", str(tmp_path / "e")]) == 0
    assert not [w for w in caught if "--alpha" in str(w.message)]


def test_output_piped_into_a_closed_pipe_ends_quietly(tmp_path):
    import subprocess
    import sys

    # `hf-uwm eval ... | head -1`: the reader leaves after one line; printing more must not be an error line.
    code = ("import sys; from hf_uwm import cli; from hf_uwm.commands import eval; eval.run = lambda args: "
            "[print('row', i, flush=True) for i in range(10**6)]; "
            "sys.exit(cli.main(['eval', 'organism', '--data', 'organism']))")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline() == b"row 0\n"
    process.stdout.close()
    assert process.wait(timeout=120) == 141
    assert b"Broken pipe" not in process.stderr.read()


def test_eval_of_a_delta_splits_unseen_concepts_by_what_it_was_told_in_words(tmp_path, capsys):
    (tmp_path / "concepts.txt").write_text("gun\n")
    assert main(["edit", "organism-hard", "--data", "organism-hard", "--samples", "24", "--concepts",
                 str(tmp_path / "concepts.txt"), "--rounds", "1", "--goal", "none", "--knowledge-budget", "none",
                 "--holdout", "0", "--output", str(tmp_path / "d"), "--quiet"]) == 0
    assert json.loads((tmp_path / "d" / "uwm_config.json").read_text())["concepts_in_words"] == ["gun"]
    assert "| concepts named in words only (text-only calibration pairs, no image of them) | gun |" in \
        (tmp_path / "d" / "README.md").read_text()
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "d"), "--data", "organism-hard", "--samples", "90", "--bootstrap", "50",
                 "--quiet", "--json", str(tmp_path / "r.json")]) == 0
    subsets = json.loads((tmp_path / "r.json").read_text())["edited"]["subsets"]
    assert {"unseen, named", "unseen, not named", "unseen, named with cues", "unseen, not named without cues",
            "seen concepts with cues"} <= set(subsets)
    assert subsets["unseen, named"]["quadruples"] == 10   # 90 test quadruples cycle through 9 concepts: 10 of gun
