"""Checks a new user meets first: where a delta may be written, and which deltas a model accepts."""

import json
import os
import subprocess

import pytest

from conftest import make_clip, make_pairs, make_siglip
from hf_uwm import UWMConfig, UWMEditor
from hf_uwm.cli import main
from hf_uwm.delta import CONFIG_NAME, DELTA_NAME, RECORD_KEYS, read_delta


@pytest.fixture(scope="module")
def editor():
    return UWMEditor(*make_clip(), UWMConfig(tau=0.05)).calibrate(make_pairs(), progress=False)


@pytest.fixture
def read_only(tmp_path):
    """A folder nobody can create files in (immutable where the tests run as root, who ignores permissions)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    try:
        (folder / "probe").touch()
    except OSError:
        pass
    else:
        (folder / "probe").unlink()
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        if not immutable:
            folder.chmod(0o755)
            pytest.skip("cannot make a read-only folder here")
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


# --- where a delta may be written ---------------------------------------------------------------------
def test_save_refuses_an_unwritable_folder_and_a_path_under_a_file(editor, read_only, tmp_path):
    with pytest.raises(PermissionError, match=f"Cannot write {read_only / 'delta'}: the folder {read_only} is not "
                                              "writable"):
        editor.save_pretrained(read_only / "delta")
    (tmp_path / "notes.txt").write_text("mine")
    for path in (tmp_path / "notes.txt" / "delta", tmp_path / "notes.txt" / "a" / "delta"):
        with pytest.raises(FileExistsError, match="notes.txt is a file, so no folder can be made under it"):
            editor.save_pretrained(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "read-only"]  # no probe, no staging left


def test_save_replaces_a_delta_only_with_overwrite(editor, tmp_path):
    folder = editor.save_pretrained(tmp_path / "delta")
    before = (folder / DELTA_NAME).read_bytes()
    with pytest.raises(FileExistsError, match="already holds a delta; pass overwrite=True to replace it"):
        editor.with_settings(tau=0.1).save_pretrained(folder)
    assert (folder / DELTA_NAME).read_bytes() == before
    editor.with_settings(tau=0.1).save_pretrained(folder, overwrite=True)
    assert json.loads((folder / CONFIG_NAME).read_text())["config"]["tau"] == 0.1
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"other files \['notes.txt'\]"):
        editor.save_pretrained(folder, overwrite=True)  # overwrite replaces a delta, never anything else
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta"]


@pytest.fixture
def no_model_work(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("loaded data or a model before --output was checked")

    for name in ("hf_uwm.sources.load_data", "hf_uwm.loading.load_model"):
        monkeypatch.setattr(name, fail)


def test_edit_checks_its_output_before_any_model_is_loaded(editor, read_only, tmp_path, no_model_work, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    existing = editor.save_pretrained(tmp_path / "existing")
    for output, message in [(read_only / "delta", f"the folder {read_only} is not writable"),
                            (tmp_path / "notes.txt" / "delta", "notes.txt is a file, so no folder can be made"),
                            (existing, "already holds a delta; add --overwrite to replace it")]:
        assert main(["edit", "organism", "--data", "organism", "--output", str(output), "--quiet"]) == 1
        err = capsys.readouterr().err
        assert message in err and "Errno" not in err, err


def test_sweep_checks_its_folders_before_any_model_is_loaded(editor, read_only, tmp_path, no_model_work, capsys):
    existing = editor.save_pretrained(tmp_path / "existing")
    sweep = ["sweep", "organism", "--data", "organism", "--eval", "organism", "--quiet"]
    assert main(sweep + ["--output", str(read_only / "sweep")]) == 1
    assert f"the folder {read_only} is not writable" in capsys.readouterr().err
    assert main(sweep + ["--output", str(tmp_path / "sweep"), "--save-best", str(existing)]) == 1
    assert "already holds a delta; add --overwrite" in capsys.readouterr().err


# --- which deltas a model accepts ---------------------------------------------------------------------
def test_a_delta_of_another_model_class_is_named_as_such(editor, tmp_path):
    folder = editor.save_pretrained(tmp_path / "clip-delta")
    siglip, processor = make_siglip()
    # Same layer names and shapes as the tiny CLIP: without the class check only the fingerprint would differ.
    def shapes(e):
        return {name: layer.weight.shape for name, layer in e.target_layers.items()}

    assert shapes(UWMEditor(siglip, processor, editor.config)) == shapes(editor)
    with pytest.raises(ValueError, match=r"made on a CLIPModel \(clip\) and the model passed as model= is a "
                                         r"SiglipModel \(siglip\): pass the model it was made on"):
        UWMEditor.from_pretrained(folder, model=siglip, processor=processor)


def test_unknown_top_level_keys_are_refused_and_older_files_load(editor, tmp_path):
    folder = editor.save_pretrained(tmp_path / "delta")
    record = json.loads((folder / CONFIG_NAME).read_text())
    assert set(record) <= set(RECORD_KEYS)
    (folder / CONFIG_NAME).write_text(json.dumps({**record, "colour": "red"}))
    with pytest.raises(ValueError, match=r"unknown top-level key\(s\) \['colour'\]"):
        read_delta(folder)
    # A file of an older version: the required keys only, and a config of fewer fields (score, tau, alpha...).
    old_config = {k: record["config"][k] for k in ("tau", "alpha", "text_targets", "vision_targets")}
    old_config["score"] = record["config"]["method"]
    old = {k: record[k] for k in ("format_version", "model_class", "base_model", "base_revision", "fingerprint",
                                  "layers")}
    (folder / CONFIG_NAME).write_text(json.dumps({**old, "config": old_config}))
    loaded = UWMEditor.from_pretrained(folder, model=editor.model, processor=editor.processor)
    assert loaded.config.method == "ratio" and loaded.counts() == editor.counts()
    assert not any(name.startswith(".") for name in os.listdir(tmp_path))


def test_eval_checks_its_json_path_before_any_model_is_loaded(read_only, no_model_work, capsys):
    assert main(["eval", "organism", "--data", "organism", "--json", str(read_only / "r.json"), "--quiet"]) == 1
    assert f"the folder {read_only} is not writable" in capsys.readouterr().err
