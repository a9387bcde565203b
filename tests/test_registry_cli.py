"""The registry drives the command line: every declared setting has its flag, an installed package adds a
method through an entry point, config and methods keep their layering, and errors speak the CLI."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import magnitude_method  # noqa: F401  (registers "magnitude" before the parser is built)
from conftest import save_model_and_pairs
from hf_uwm.cli import main
from hf_uwm.commands.method_flags import in_flags
from hf_uwm.methods import base, get_method, method_names
from hf_uwm.settings import setting_info, setting_names

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_uwm"


def _flag(name):
    return "--" + name.replace("_", "-")


def test_edit_help_lists_every_declared_setting_of_every_method(capsys):
    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    out = capsys.readouterr().out
    for method in method_names():
        for name in setting_names(get_method(method).settings_class):
            assert f"  {_flag(name)} " in out, f"{method}'s {name} has no flag"
    assert "--power POWER" in out and "settings of magnitude" in out
    # defaults are read from the dataclasses, per method where they differ
    assert "(default 0.002 for iterative_attribution, 0.001 for caption_iterative)" in " ".join(out.split())
    assert "clip 0.02, siglip 0.02, llava 0.085" in " ".join(out.split())


def test_every_package_setting_declares_its_help():
    for method in method_names():
        if method == "magnitude":
            continue
        settings_class = get_method(method).settings_class
        for name in setting_names(settings_class):
            assert setting_info(settings_class, name).help, f"{method}.{name} declares no help"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return save_model_and_pairs(tmp_path_factory.mktemp("registry"), pairs=6, validation=6)


def test_the_toy_methods_own_setting_works_from_the_cli(files, tmp_path, capsys):
    import json

    assert main(["edit", str(files / "model"), "--data", str(files / "pairs"), "--method", "magnitude",
                 "--power", "2", "--output", str(tmp_path / "d"), "--quiet"]) == 0
    assert json.loads((tmp_path / "d" / "uwm_config.json").read_text())["config"]["power"] == 2.0
    assert "| `power` | `2.0` |" in (tmp_path / "d" / "README.md").read_text()
    assert main(["edit", str(files / "model"), "--data", str(files / "pairs"), "--method", "ratio",
                 "--power", "2", "--output", str(tmp_path / "x"), "--quiet"]) == 1
    assert "--power: not a setting of --method ratio" in capsys.readouterr().err


def test_config_refusals_speak_in_flags(files, tmp_path, capsys):
    assert main(["edit", str(files / "model"), "--data", str(files / "pairs"), "--holdout", "0",
                 "--output", str(tmp_path / "d"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "--holdout 0.0 is invalid" in err and "set --goal none and --knowledge-budget none too" in err
    assert "=None" not in err and "UWMConfig." not in err
    assert in_flags("UWMConfig.knowledge_measure='rougeL' is invalid") == "--knowledge-measure rougeL is invalid"


def test_a_programming_error_keeps_its_traceback(monkeypatch, capsys):
    from hf_uwm.commands import install_metric

    def bug(args):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(install_metric, "run", bug)
    with pytest.raises(TypeError, match="unsupported operand"):
        main(["install-metric"])


def test_a_user_error_of_the_projects_own_class_stays_one_line(monkeypatch, capsys):
    from hf_uwm.commands import install_metric
    from hf_uwm.errors import UnsupportedModelError

    def refuse(args):
        raise UnsupportedModelError("hf_uwm does not support BertModel.")

    monkeypatch.setattr(install_metric, "run", refuse)
    assert main(["install-metric"]) == 1
    assert capsys.readouterr().err == "hf-uwm install-metric: error: hf_uwm does not support BertModel.\n"


# --- entry points ------------------------------------------------------------------------------------
def _installed_plugin(site: Path, name: str, value: str, module: str | None = None):
    """A package 'installed' in `site`: its dist-info names an entry point of the hf_uwm.methods group."""
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{base.ENTRY_POINT_GROUP}]\n{value}\n")
    if module:
        shutil.copy(ROOT / "tests" / f"{module}.py", site / f"{module}.py")


def test_an_installed_entry_point_method_reaches_help_card_and_sweep(files, tmp_path):
    site = tmp_path / "site"
    _installed_plugin(site, "magnitude_plugin", "magnitude = magnitude_method", module="magnitude_method")
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}

    def cli(*argv):
        done = subprocess.run([sys.executable, "-m", "hf_uwm.cli", *argv], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "magnitude: toy method" in cli("edit", "--help") and "--power POWER" in cli("edit", "--help")
    cli("edit", str(files / "model"), "--data", str(files / "pairs"), "--method", "magnitude", "--power", "2",
        "--output", str(tmp_path / "d"), "--quiet")
    card = (tmp_path / "d" / "README.md").read_text()
    assert "Magnitude pruning edit of" in card and "| `power` | `2.0` |" in card
    out = cli("sweep", str(files / "model"), "--data", str(files / "pairs"), "--eval", str(files / "validation"),
              "--method", "magnitude", "--power", "1", "2", "--output", str(tmp_path / "sweep"), "--quiet")
    assert "power=1" in out and "power=2" in out


def test_a_broken_entry_point_is_skipped_with_a_warning_naming_its_package(tmp_path, monkeypatch):
    _installed_plugin(tmp_path, "broken_plugin", "nothing = no_such_module_of_hf_uwm_tests")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(base, "_entry_points_loaded", False)
    with pytest.warns(UserWarning, match="'nothing' of broken_plugin .* failed to load and is skipped"):
        names = method_names()
    assert "ratio" in names and "nothing" not in names


# --- layering ----------------------------------------------------------------------------------------
def _imports(source: str, package: str) -> set[str]:
    """Absolute names of the hf_uwm modules `source` (a module of `package`) imports, relative imports resolved."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{parent}.{node.module}" if node.module else parent
                found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
    return {name for name in found if name == "hf_uwm" or name.startswith("hf_uwm.")}


def test_the_settings_module_is_a_leaf_and_methods_never_import_the_config():
    assert _imports((PACKAGE / "settings.py").read_text(), "hf_uwm") == set()
    for path in (PACKAGE / "methods").rglob("*.py"):
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
        assert not any(name.startswith("hf_uwm.config") for name in _imports(path.read_text(), package)), path


def test_the_layering_check_sees_every_form_of_import():
    assert "hf_uwm.config" in _imports("from ..config import is_number", "hf_uwm.methods")
    assert "hf_uwm.config" in _imports("from .. import config", "hf_uwm.methods")
    assert "hf_uwm.config" in _imports("import hf_uwm.config", "hf_uwm.methods")
    assert _imports("from .base import Method\nimport torch", "hf_uwm.methods") == {"hf_uwm.methods.base",
                                                                                      "hf_uwm.methods.base.Method"}


def test_sweep_labels_use_the_declared_symbols():
    from hf_uwm import sweep

    row = sweep.SweepRow("iterative_attribution", {"tau": 0.05, "round_density": 0.002, "curvature_weight": 4.0,
                                                   "power": 2.0, "alpha": -1.0}, 1, None, None)
    assert row.setting_label() == "τ=0.05 δ=0.002 λ=4 power=2 α=-1"
    assert sweep.symbols()["curvature_weight"] == "λ"   # what the LLaVA demo's labels read
