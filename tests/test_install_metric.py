"""`hf-uwm install-metric`: `evaluate.load("safeground")`, verbatim, from evaluate's module cache."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import evaluate.loading
import hf_uwm.metrics
from evaluate import config
from hf_uwm.metrics import install_safeground, safeground_path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = Path(safeground_path())


def metric_folder(cache: Path) -> Path:
    return cache / "evaluate_modules" / "metrics" / "evaluate-metric--safeground"


def hashes(cache: Path) -> list[str]:
    return sorted(p.name for p in metric_folder(cache).iterdir() if p.is_dir())


def resolve(cache: Path) -> str:
    """The hash of the module `evaluate.load("safeground")` would import from this cache."""
    return evaluate.loading.evaluation_module_factory(
        "safeground", dynamic_modules_path=str(cache / "evaluate_modules")).hash


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setattr(config, "HF_EVALUATE_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no ./safeground/ folder for evaluate to find first


def upgraded_copy(tmp_path: Path) -> Path:
    """The metric folder with a line added to its script, as after an upgrade of hf_uwm."""
    folder = tmp_path / "upgraded" / SOURCE.name
    shutil.copytree(SOURCE, folder, ignore=shutil.ignore_patterns("__pycache__"))
    with open(folder / f"{SOURCE.name}.py", "a") as script:
        script.write("# upgraded\n")
    return folder


def test_layout_is_the_one_evaluate_writes_when_it_downloads_the_metric(tmp_path, monkeypatch):
    """Let evaluate itself 'download' evaluate-metric/safeground (the Hub mocked by the metric folder)."""
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    monkeypatch.setattr(sys, "path", sys.path[:])  # evaluate appends its cache to it
    dynamic = evaluate.loading.init_dynamic_modules(hf_modules_cache=theirs)
    monkeypatch.setattr(evaluate.loading, "increase_load_count", lambda *args, **kwargs: None)
    monkeypatch.setattr(evaluate.loading.HubEvaluationModuleFactory, "download_loading_script",
                        lambda self, revision: str(SOURCE / "safeground.py"))
    monkeypatch.setattr(evaluate.loading, "cached_path", lambda url, **kwargs: str(SOURCE / url.rsplit("/")[-1]))
    evaluate.loading.HubEvaluationModuleFactory("evaluate-metric/safeground", dynamic_modules_path=dynamic).get_module()
    written = Path(install_safeground(ours))

    def tree(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and not p.name.endswith((".lock", ".json"))}

    assert tree(ours) == tree(theirs) and len(tree(ours)) == 8
    assert written == metric_folder(ours) / hashes(theirs)[0] and len(written.name) == 64
    note, their_note = (json.loads(next(metric_folder(c).glob("*/safeground.json")).read_text()) for c in (ours, theirs))
    assert note == {"original file path": str(SOURCE / "safeground.py"), "local file path": str(written / "safeground.py")}
    assert set(note) == set(their_note)


def test_bare_name_resolves_to_the_install_offline(tmp_path, offline):
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match="Module 'safeground' doesn't exist on the Hugging Face Hub either"):
        resolve(cache)
    written = install_safeground(cache)
    assert resolve(cache) == Path(written).name


def test_bare_name_resolves_to_the_install_online_unless_the_hub_has_an_official_one(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    install_safeground(cache)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(evaluate.loading, "increase_load_count", lambda *args, **kwargs: None)

    def not_on_the_hub(self, revision):  # what evaluate's download raises for a 404
        raise FileNotFoundError(f"Couldn't find file at https://huggingface.co/{self.name}/safeground.py")

    monkeypatch.setattr(evaluate.loading.HubEvaluationModuleFactory, "download_loading_script", not_on_the_hub)
    assert resolve(cache) == hashes(cache)[0]
    official = evaluate.loading.ImportableModule("official", "f" * 64)
    monkeypatch.setattr(evaluate.loading.HubEvaluationModuleFactory, "get_module", lambda self: official)
    assert resolve(cache) == "f" * 64


def test_install_twice_leaves_one_module_and_the_latest_install_wins(tmp_path, offline, monkeypatch):
    cache = tmp_path / "cache"
    first = Path(install_safeground(cache))
    (first / "bootstrap.py").unlink()  # as a download cut short would leave it
    assert Path(install_safeground(cache)) == first and (first / "bootstrap.py").is_file()
    assert sorted(p.name for p in metric_folder(cache).iterdir()) == ["__init__.py", first.name]

    monkeypatch.setattr(hf_uwm.metrics, "safeground_path", lambda: str(upgraded_copy(tmp_path)))
    upgraded = Path(install_safeground(cache))
    assert upgraded != first and hashes(cache) == sorted([first.name, upgraded.name])
    assert resolve(cache) == upgraded.name
    assert (upgraded / "safeground.py").read_text().endswith("# upgraded\n")

    # installing the first version again makes it the newest, even against a script dated in the future
    os.utime(upgraded / "safeground.py", (time.time() + 1000,) * 2)
    monkeypatch.setattr(hf_uwm.metrics, "safeground_path", lambda: str(SOURCE))
    assert Path(install_safeground(cache)) == first and resolve(cache) == first.name


def test_a_failed_install_leaves_no_module(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    copies, copyfile = [], shutil.copyfile

    def copy_then_fail(source, destination):
        if copies:
            raise OSError("No space left on device")
        copies.append(copyfile(source, destination))

    monkeypatch.setattr(shutil, "copyfile", copy_then_fail)
    with pytest.raises(OSError, match="No space left"):
        install_safeground(cache)
    assert copies and [p.name for p in metric_folder(cache).iterdir()] == ["__init__.py"]


@pytest.fixture(scope="module")
def verbatim(tmp_path_factory):
    """One fresh process, offline, with its own HF_MODULES_CACHE: the bare name before and after the command."""
    folder = tmp_path_factory.mktemp("verbatim")
    env = {**os.environ, "HF_MODULES_CACHE": str(folder / "modules"), "HF_EVALUATE_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "load_safeground_verbatim.py")],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.splitlines()[-1]), stderr=done.stderr, cache=folder / "modules")


def test_bare_name_fails_with_evaluates_error_before_the_command(verbatim):
    assert not verbatim["installed_on_import"]  # importing hf_uwm installs nothing
    assert verbatim["before"] == (f"FileNotFoundError: Couldn't find a module script at "
                                  f"{Path(verbatim['cache']).parent / 'safeground' / 'safeground.py'}. "
                                  "Module 'safeground' doesn't exist on the Hugging Face Hub either.")


def test_bare_name_after_the_command_equals_the_folder_load_on_ties(verbatim):
    written = metric_folder(verbatim["cache"]) / hashes(verbatim["cache"])[0]
    assert verbatim["rc"] == 0 and str(written) in verbatim["printed"]
    assert verbatim["loaded_from"] == str(written / "safeground.py")
    assert "Using the latest cached version of the module from" in verbatim["stderr"]  # evaluate's own notice
    columns = list(verbatim["columns"].values())
    ties = sum(a == b for x, y in ((0, 1), (2, 3), (0, 2), (1, 3)) for a, b in zip(columns[x], columns[y]))
    assert ties > 400  # of 1600 comparisons
    assert verbatim["verbatim"] == verbatim["folder"] and len(verbatim["verbatim"]["confidence_intervals"]) == 9


def test_card_examples_run_as_doctests(verbatim):
    """The card shows `evaluate.load("safeground")` first: its examples run after `hf-uwm install-metric`."""
    card = verbatim["card"]
    assert card["tries"] >= 10 and card["failures"] == 0, card["report"]
    assert 'evaluate.load("safeground")' in (SOURCE / "README.md").read_text().split("```python")[1]


def test_an_unwritable_cache_is_refused_with_the_variable_to_change(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match=r"evaluate's module cache .* \(set HF_MODULES_CACHE to choose another\)"):
        install_safeground(tmp_path / "file" / "modules")
