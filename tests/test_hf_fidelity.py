"""Works the way Hugging Face users expect: portable deltas, names that mean one thing, fail-fast commands."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import make_clip, make_pairs, make_siglip
from hf_uwm import UWMConfig, UWMEditor
from hf_uwm.cli import main
from hf_uwm.delta import CONFIG_NAME, DELTA_FILES, DELTA_NAME, read_delta
from hf_uwm import paths
from hf_uwm.paths import organism_path

ROOT = Path(__file__).resolve().parents[1]
REAL_HUB_PROBE = getattr(paths, "hub_unreachable", None)  # conftest replaces it in every test


@pytest.fixture(scope="module")
def organism_delta(tmp_path_factory):
    """A text-tower delta of the bundled organism, saved once."""
    from hf_uwm.organism import make_pairs as organism_pairs

    folder = tmp_path_factory.mktemp("organism") / "delta"
    editor = UWMEditor.from_pretrained("organism", UWMConfig(vision_targets=[], tau=0.05))
    editor.calibrate(organism_pairs(16, seed=0), progress=False).save_pretrained(folder)
    return folder


def no_paths_of_this_machine(folder: Path):
    text = "".join((folder / name).read_text() for name in (CONFIG_NAME, "README.md"))
    for path in (organism_path(), str(Path(organism_path()).parent), str(folder.parent), os.path.expanduser("~")):
        assert path not in text
    assert "/tmp/" not in text and "site-packages" not in text


# --- 1. portable deltas ------------------------------------------------------------------------------
def test_organism_delta_records_a_stable_name_and_loads_after_moving(organism_delta, tmp_path, monkeypatch, capsys):
    record = json.loads((organism_delta / CONFIG_NAME).read_text())
    assert record["base_model"] == "organism" and "base_model_folder" not in record
    no_paths_of_this_machine(organism_delta)
    moved = tmp_path / "elsewhere" / "moved-delta"
    shutil.copytree(organism_delta, moved)
    monkeypatch.chdir(tmp_path)  # another working directory
    editor = UWMEditor.from_pretrained(str(moved.relative_to(tmp_path)))
    assert editor.base_model == "organism" and editor.apply() is editor.model
    # every CLI command accepts the name; eval of a delta prints the bootstrap intervals it computed
    monkeypatch.setattr("hf_uwm.sources.load_zero_shot", lambda *args, **kwargs: None)  # not what is tested: saves time
    assert main(["eval", str(moved), "--data", "organism", "--samples", "20", "--bootstrap", "50", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "bootstrap 95% intervals" in out and "edited" in out
    assert re.search(r"^GS\s+\[[\d.]+, [\d.]+\]\s+\[[\d.]+, [\d.]+\]$", out, flags=re.M)  # base and edited


def test_a_delta_of_the_organism_path_records_the_name(tmp_path):
    from hf_uwm.organism import load_organism, make_pairs as organism_pairs

    editor = UWMEditor(*load_organism(), UWMConfig(vision_targets=[]), base_model=organism_path())
    editor.calibrate(organism_pairs(4), progress=False).save_pretrained(tmp_path / "d")
    assert json.loads((tmp_path / "d" / CONFIG_NAME).read_text())["base_model"] == "organism"
    no_paths_of_this_machine(tmp_path / "d")


# --- 2. a mistyped path is not a Hub id ---------------------------------------------------------------
@pytest.fixture
def no_hub(monkeypatch):
    def asked(*args, **kwargs):
        raise AssertionError(f"the Hub was asked about {args[:1]}")

    import datasets

    monkeypatch.setattr("hf_uwm.delta.hf_hub_download", asked)
    monkeypatch.setattr(datasets, "load_dataset", asked)


@pytest.mark.parametrize("name", ["/no/such/dir", "./no-such-folder", "~/no-such-model", "a/b/c"])
def test_missing_model_paths_fail_before_any_hub_call(no_hub, name):
    with pytest.raises(FileNotFoundError, match="no such file or folder: "):
        UWMEditor.from_pretrained(name)


@pytest.mark.parametrize("name", ["nosuch.csv", "data/pairs.parquet", "./pairs", "/no/such/pairs.jsonl"])
def test_missing_data_paths_fail_before_any_hub_call(no_hub, name, capsys):
    from hf_uwm.data import load_pairs

    with pytest.raises(FileNotFoundError, match="no such file or folder: "):
        load_pairs(name)
    assert main(["eval", "organism", "--data", name, "--quiet"]) == 1
    assert "no such file or folder" in capsys.readouterr().err


@pytest.mark.parametrize("name,near", [("organsim", "organism"), ("Organism-hrad", "organism-hard")])
def test_a_near_miss_of_a_bundled_name_suggests_it_before_any_hub_call(no_hub, name, near, capsys):
    from hf_uwm.data import load_pairs

    suggestion = f"{name!r} is no bundled name and no file or folder here: did you mean {near!r}?"
    with pytest.raises(FileNotFoundError, match=re.escape(suggestion)):
        UWMEditor.from_pretrained(name)
    with pytest.raises(FileNotFoundError, match=re.escape(suggestion)):
        load_pairs(name)
    assert main(["eval", name, "--data", "organism", "--quiet"]) == 1
    assert suggestion in capsys.readouterr().err


UNREACHABLE = "https://huggingface.co did not answer: ConnectError"


def test_an_unreachable_hub_is_one_line_after_one_short_try(monkeypatch, tmp_path):
    """Without network, a Hub name is looked up in the cache only, and the error never blames HF_HUB_OFFLINE."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    import datasets
    from hf_uwm.data import load_pairs
    from hf_uwm.loading import load_model

    asked = []

    def download(repo_id, filename, **kwargs):
        asked.append(kwargs.get("local_files_only"))
        raise LocalEntryNotFoundError("not in the cache")

    monkeypatch.setattr("hf_uwm.paths.hub_unreachable", lambda: UNREACHABLE)
    monkeypatch.setattr("hf_uwm.delta.hf_hub_download", download)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("asked the Hub for data"))
    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", lambda *a, **k: pytest.fail("asked the Hub"))
    line = rf"'me/nope' is not a local folder nor in the Hugging Face cache, and the Hub could not be reached " \
           rf"\({UNREACHABLE}\): check the name and the connection, or give a local folder\.$"
    with pytest.raises(OSError, match=line):
        UWMEditor.from_pretrained("me/nope")
    assert asked == [True]  # the cache only: huggingface_hub would retry the Hub for half a minute
    with pytest.raises(OSError, match=line):
        load_model("me/nope", cache_dir=tmp_path)
    with pytest.raises(OSError, match=r"'me/pairs' is no local file or folder, and the Hub could not be reached "
                                      r".*or set HF_HUB_OFFLINE=1 to read a dataset cached earlier"):
        load_pairs("me/pairs")


def test_hub_unreachable_tries_once_and_names_offline_mode(monkeypatch):
    from huggingface_hub import constants

    tries = []

    class Session:
        def head(self, url, timeout):
            tries.append(timeout)
            raise ConnectionError("no network")

    monkeypatch.setattr("huggingface_hub.utils.get_session", lambda: Session())
    probe = REAL_HUB_PROBE
    probe.cache_clear()
    try:
        assert probe() == f"{constants.ENDPOINT} did not answer: ConnectionError" and probe() == probe()
        assert len(tries) == 1 and tries[0] <= 5
        probe.cache_clear()
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        assert probe() == "HF_HUB_OFFLINE is set"
        assert "unset HF_HUB_OFFLINE" in str(paths.unreachable_error("me/x", probe()))
    finally:
        probe.cache_clear()


def test_a_hub_id_still_asks_the_hub(monkeypatch):
    from huggingface_hub.errors import EntryNotFoundError

    asked = []

    def download(repo_id, *args, **kwargs):
        asked.append(repo_id)
        raise EntryNotFoundError("no uwm_config.json")

    monkeypatch.setattr("hf_uwm.delta.hf_hub_download", download)
    from hf_uwm.delta import resolve_delta_folder

    assert resolve_delta_folder("org/clip") is None and asked == ["org/clip"]


# --- 3. checks before the expensive work ---------------------------------------------------------------
def test_edit_refuses_a_foreign_output_folder_before_calibrating(tmp_path, monkeypatch, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    monkeypatch.setattr(UWMEditor, "calibrate", lambda *a, **k: pytest.fail("calibrated before checking --output"))
    assert main(["edit", "organism", "--data", "organism", "--samples", "4", "--output", str(tmp_path / "out"),
                 "--quiet"]) == 1
    assert "already holds other files ['notes.txt']" in capsys.readouterr().err
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_eval_of_a_delta_on_other_weights_refuses_before_evaluating(organism_delta, tmp_path, monkeypatch, capsys):
    other = tmp_path / "other"
    shutil.copytree(organism_delta, other)
    record = json.loads((other / CONFIG_NAME).read_text())
    (other / CONFIG_NAME).write_text(json.dumps({**record, "fingerprint": "0" * 64}))
    monkeypatch.setattr("hf_uwm.evaluation.evaluate_model", lambda *a, **k: pytest.fail("evaluated the base first"))
    assert main(["eval", str(other), "--data", "organism", "--samples", "4", "--quiet"]) == 1
    assert "differ from the base model" in capsys.readouterr().err


# --- 4, 5. data errors in the user's terms -----------------------------------------------------------
def test_empty_datasets_say_they_have_no_rows(tmp_path):
    from hf_uwm.data import load_pairs

    (tmp_path / "header.csv").write_text("safe_text,unsafe_text\n")
    (tmp_path / "nothing.csv").write_text("")
    for name in ("header.csv", "nothing.csv"):
        with pytest.raises(ValueError, match=f"{name} has no rows"):
            load_pairs(tmp_path / name, split="train")


def test_command_line_hints_name_flags_and_show_the_files_columns(tmp_path, capsys):
    (tmp_path / "cols.csv").write_text("caption,nsfw\na cat,a dead cat\n")
    assert main(["edit", "organism", "--data", str(tmp_path / "cols.csv"), "--output", str(tmp_path / "d"),
                 "--towers", "text", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "['caption', 'nsfw']" in err and "--columns safe_text=" in err and "columns={" not in err
    (tmp_path / "bad.csv").write_text("safe_text,unsafe_text\na red cat on grass,a dead red cat on grass\n"
                                      "a blue dog on sand,\n")
    argv = ["edit", "organism", "--data", str(tmp_path / "bad.csv"), "--output", str(tmp_path / "d"),
            "--method", "ratio", "--towers", "text", "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "--skip-bad-rows" in err and "skip_bad_rows=True" not in err
    with pytest.warns(UserWarning, match="Skipped bad rows, 1 kept"):
        assert main(argv + ["--skip-bad-rows"]) == 0
    # the same errors in Python name the Python argument
    from hf_uwm.data import load_pairs

    with pytest.raises(ValueError, match="skip_bad_rows=True"):
        load_pairs(tmp_path / "bad.csv", split="train")


def test_new_flags_reach_the_editor_and_loaders(tmp_path, monkeypatch):
    seen = {}
    real = UWMEditor.calibrate

    def calibrate(self, data, **kwargs):
        seen.update(kwargs, threads=torch.get_num_threads())
        return real(self, data, **kwargs)

    monkeypatch.setattr(UWMEditor, "calibrate", calibrate)
    threads = torch.get_num_threads()
    try:
        assert main(["edit", "organism", "--data", "organism", "--samples", "20", "--towers", "text", "--quiet",
                     "--threads", "1", "--checkpoint-dir", str(tmp_path / "ck"), "--output", str(tmp_path / "d")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert seen["checkpoint_dir"] == str(tmp_path / "ck") and seen["threads"] == 1
    assert any((tmp_path / "ck").iterdir())


# --- 7. flags that do what they say ------------------------------------------------------------------
def test_samples_zero_is_refused_for_every_source(capsys):
    for data in ("organism", "pairs.csv"):
        with pytest.raises(SystemExit) as exit_:
            main(["edit", "organism", "--data", data, "--samples", "0", "--output", "x"])
        assert exit_.value.code == 2 and "--samples: expected a positive whole number" in capsys.readouterr().err


def test_alpha_one_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("hf_uwm.sources.load_data", lambda *a, **k: pytest.fail("loaded data for a no-op edit"))
    assert main(["edit", "organism", "--data", "organism", "--alpha", "1", "--output", str(tmp_path / "d")]) == 1
    assert "changes nothing" in capsys.readouterr().err
    editor = UWMEditor(*make_clip(), UWMConfig(alpha=1.0)).calibrate(make_pairs(), progress=False)
    with pytest.warns(UserWarning, match="changes nothing"):
        editor.save_pretrained(tmp_path / "python")


def test_quiet_silences_the_datasets_bars(tmp_path, capfd):
    import datasets

    (tmp_path / "fresh.csv").write_text("safe_text,unsafe_text\na red cat on grass,a dead red cat on grass\n")
    assert main(["edit", "organism", "--data", str(tmp_path / "fresh.csv"), "--method", "ratio", "--towers", "text",
                 "--quiet", "--output", str(tmp_path / "d")]) == 0
    err = capfd.readouterr().err
    assert "Generating train split" not in err and "examples/s" not in err
    assert datasets.is_progress_bar_enabled()  # restored for the rest of the process


# --- 6, 12. delta files -------------------------------------------------------------------------------
def test_delta_files_are_readable_by_others_and_byte_reproducible(tmp_path):
    editor = UWMEditor(*make_clip(), UWMConfig()).calibrate(make_pairs(), progress=False)
    folders = [editor.save_pretrained(tmp_path / f"d{i}") for i in range(6)]
    contents = {tuple((folder / name).read_bytes() for name in DELTA_FILES) for folder in folders}
    assert len(contents) == 1  # safetensors' metadata order varies between saves unless made canonical
    mask = os.umask(0)
    os.umask(mask)
    assert (folders[0].stat().st_mode & 0o777) == 0o777 & ~mask
    for name in DELTA_FILES:
        assert ((folders[0] / name).stat().st_mode & 0o777) == 0o666 & ~mask


def test_indices_are_int32_on_disk_and_int64_deltas_still_load(tmp_path):
    from safetensors.torch import save_file

    editor = UWMEditor(*make_clip(), UWMConfig()).calibrate(make_pairs(), progress=False)
    folder = editor.save_pretrained(tmp_path / "d")
    with safe_open(folder / DELTA_NAME, framework="pt") as f:
        assert {f.get_tensor(n).dtype for n in f.keys()} == {torch.int32}
    record, indices = read_delta(folder)
    assert all(indices[n].dtype == torch.int64 and torch.equal(indices[n], editor.delta[n]) for n in indices)
    save_file({n: i.long() for n, i in indices.items()}, folder / DELTA_NAME, metadata={"format": "hf_uwm.delta"})
    assert all(torch.equal(read_delta(folder)[1][n], indices[n]) for n in indices)  # a delta of hf_uwm 0.1.0
    save_file({n: i.float() for n, i in indices.items()}, folder / DELTA_NAME)
    with pytest.raises(ValueError, match="corrupted"):
        read_delta(folder)


# --- 8, 9. from_pretrained / save_pretrained like the rest of the ecosystem --------------------------
def test_from_pretrained_passes_hub_options_to_every_download(tmp_path, monkeypatch):
    import transformers
    from huggingface_hub.errors import EntryNotFoundError

    model, processor = make_clip()
    model.config.architectures = ["CLIPModel"]  # as a saved checkpoint's config says
    calls = []

    def recorder(what, result):
        def load(name, *args, **kwargs):
            calls.append((what, name, kwargs))
            return result()
        return load

    def delta_download(repo_id, filename, **kwargs):
        calls.append(("hf_hub_download", repo_id, kwargs))
        if repo_id == "org/base":
            raise EntryNotFoundError("not a delta")
        return str(tmp_path / "snap" / "sub" / filename)

    import copy

    monkeypatch.setattr("hf_uwm.delta.hf_hub_download", delta_download)
    monkeypatch.setattr("hf_uwm.delta.snapshot_download", recorder("snapshot_download", lambda: str(tmp_path / "snap")))
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", recorder("AutoConfig", lambda: model.config))
    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", recorder("CLIPModel", lambda: copy.deepcopy(model)))
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", recorder("AutoProcessor", lambda: processor))
    options = dict(token="hf_x", cache_dir=str(tmp_path / "cache"), local_files_only=True, force_download=True)

    UWMEditor.from_pretrained("org/base", revision="v1", subfolder="clip", **options)
    for what in ("AutoConfig", "CLIPModel", "AutoProcessor"):
        [(_, name, kwargs)] = [c for c in calls if c[0] == what]
        assert name == "org/base" and kwargs["revision"] == "v1" and kwargs["subfolder"] == "clip"
        assert {k: kwargs[k] for k in options} == options

    saved = UWMEditor(copy.deepcopy(model), processor, base_model="org/base", base_revision="abc")
    saved.calibrate(make_pairs(), progress=False).save_pretrained(tmp_path / "snap" / "sub")
    calls.clear()
    UWMEditor.from_pretrained("me/delta", revision="v2", subfolder="sub", **options)
    [(_, _, first)] = [c for c in calls if c[0] == "hf_hub_download"]
    [(_, _, snapshot)] = [c for c in calls if c[0] == "snapshot_download"]
    assert first["revision"] == "v2" and first["subfolder"] == "sub" and {k: first[k] for k in options} == options
    assert snapshot["allow_patterns"] == [f"sub/{name}" for name in DELTA_FILES]
    assert {k: snapshot[k] for k in options} == options
    for what in ("AutoConfig", "CLIPModel", "AutoProcessor"):  # the base: its own revision, no subfolder
        [(_, name, kwargs)] = [c for c in calls if c[0] == what]
        assert name == "org/base" and kwargs["revision"] == "abc" and "subfolder" not in kwargs
        assert {k: kwargs[k] for k in options} == options


def test_a_broken_processor_raises_and_a_missing_one_is_none(tmp_path):
    from hf_uwm.loading import load_model

    model, processor = make_clip()
    model.save_pretrained(tmp_path / "weights-only")
    assert load_model(tmp_path / "weights-only")[1] is None
    model.save_pretrained(tmp_path / "broken")
    processor.save_pretrained(tmp_path / "broken")
    (tmp_path / "broken" / "tokenizer_config.json").write_text("{ not json")
    with pytest.raises(OSError, match="processor of .* failed to load"):
        load_model(tmp_path / "broken")


def test_a_sentencepiece_tokenizer_without_its_libraries_names_the_siglip_extra(tmp_path, capsys):
    import importlib.util

    from hf_uwm.loading import load_model

    if importlib.util.find_spec("sentencepiece") is not None:
        pytest.skip("sentencepiece is installed: transformers loads the tokenizer")
    model, processor = make_siglip()
    model.save_pretrained(tmp_path / "siglip")
    processor.save_pretrained(tmp_path / "siglip")
    config = json.loads((tmp_path / "siglip" / "tokenizer_config.json").read_text())
    (tmp_path / "siglip" / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "SiglipTokenizer"}))
    with pytest.raises(ImportError, match=r"tokenizer of .*siglip needs sentencepiece, which is not installed: "
                                          r"pip install 'hf_uwm\[siglip\]'"):
        load_model(tmp_path / "siglip")
    assert main(["eval", str(tmp_path / "siglip"), "--data", "organism", "--quiet"]) == 1
    assert "pip install 'hf_uwm[siglip]'" in capsys.readouterr().err


def test_only_the_main_process_saves(tmp_path):
    editor = UWMEditor(*make_clip(), UWMConfig()).calibrate(make_pairs(), progress=False)
    assert editor.save_pretrained(tmp_path / "d", is_main_process=False) == tmp_path / "d"
    assert not (tmp_path / "d").exists()
    editor.save_pretrained(tmp_path / "d", is_main_process=True)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == sorted(DELTA_FILES)


# --- 11. evaluate stays out of every path that does not compute with it -------------------------------
def test_evaluate_is_not_imported_by_the_package_the_cli_or_evaluate_model():
    code = """
import sys
sys.path.insert(0, {tests!r})
import hf_uwm, hf_uwm.editor, hf_uwm.evaluation, hf_uwm.hub, hf_uwm.data
from hf_uwm.cli import main
try:
    main(["--help"])
except SystemExit:
    pass
from conftest import make_clip, make_pairs, make_siglip
from hf_uwm.evaluation import evaluate_model
evaluate_model(*make_clip(), make_pairs(4), bootstrap=10, progress=False)
print(sorted(m for m in sys.modules if m == "evaluate" or m.startswith("evaluate.")))
""".format(tests=str(ROOT / "tests"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


# --- 13. the README stands alone and its Python runs as written ---------------------------------------
@pytest.fixture
def installed_safeground(tmp_path, monkeypatch):
    """`hf-uwm install-metric` into a module cache of the test's own, offline: the README's
    `evaluate.load("safeground")` imports from there, whatever this process imported before."""
    from evaluate import config

    from hf_uwm.metrics import install_safeground

    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(config.HF_MODULES_CACHE)])
    for name in [m for m in sys.modules if m.split(".")[0] == config.MODULE_NAME_FOR_DYNAMIC_MODULES]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(config, "HF_MODULES_CACHE", tmp_path / "modules")
    monkeypatch.setattr(config, "HF_EVALUATE_OFFLINE", True)
    install_safeground()


def test_readme_python_runs_as_written(tmp_path, monkeypatch, installed_safeground):
    text = (ROOT / "README.md").read_text()
    assert "SPEC" not in text  # an internal document users do not have
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    offline = [b for b in blocks if not b.startswith("# Needs the Hugging Face Hub")]
    assert len(offline) >= 3 and len(blocks) > len(offline)
    for block in blocks:
        compile(block, "README.md", "exec")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in offline:  # in order, in one namespace, as a reader pastes them
        exec(compile(block, "README.md", "exec"), namespace)
    assert json.loads((tmp_path / "organism-edit" / CONFIG_NAME).read_text())["base_model"] == "organism"
    assert namespace["edited"].n_quadruples == 100
    assert ".evaluate-metric--safeground." in type(namespace["safeground"]).__module__  # the bare name, installed
