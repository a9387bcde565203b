"""Which modules of hf_uwm may import which: read from the source with `ast`, module- and function-level imports."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_uwm"
METRIC = "hf_uwm.metrics.safeground"  # runs as an `evaluate` module and a Space: nothing of hf_uwm
# The library's lower rooms, and what they must never reach, not even through another module.
LOWER = ("captioning", "caption_evaluation", "evaluation", "data", "delta", "hints", "loading", "paths", "selection",
         "config")
UPPER = ("organism", "organism_captioner", "demo", "llava_demo", "cli", "commands", "sweep", "editor", "sources")
ENTRY_POINTS = ("cli", "commands", "demo", "llava_demo")  # imported by the CLI (cli.py and its commands) alone


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> list[tuple[str, int]]:
    """(imported module, relative level) of every import in the module, at any depth (also inside functions).

    `from .x import y` counts as importing x, and y too where y is a module; a package the module lies in is
    left out (Python imports it first anyway, and its function-level imports do not run).
    """
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found += [(target, node.level)] + [(f"{target}.{alias.name}", node.level) for alias in node.names
                                               if f"{target}.{alias.name}" in MODULES]
    return [(target, level) for target, level in found
            if not (target in MODULES and (name + ".").startswith(target + ".") and target != name)]


def ours(target: str) -> bool:
    return target == "hf_uwm" or target.startswith("hf_uwm.")


def within(target: str, room: str) -> bool:
    return target == room or target.startswith(room + ".")


def chains(start: str, keep=lambda name: True):
    """Each hf_uwm module that `start` reaches through its imports, with the chain of modules that leads there
    (only through the modules `keep` keeps)."""
    paths, todo = {start: [start]}, [start]
    while todo:
        current = todo.pop()
        for target, _ in imports(current):
            if target in MODULES and target not in paths and keep(target):
                paths[target] = paths[current] + [target]
                todo.append(target)
    return {target: chain for target, chain in paths.items() if target != start}


def test_every_module_is_read():
    assert {f"hf_uwm.{name}" for name in LOWER + UPPER} <= set(MODULES)
    assert {f"{METRIC}.safeground", f"{METRIC}.safeground_core", f"{METRIC}.bootstrap"} <= set(MODULES)


@pytest.mark.parametrize("name", [name for name in MODULES if within(name, METRIC)])
def test_the_metric_imports_nothing_of_hf_uwm(name):
    """Only its own files, as relative imports from its folder: `evaluate.load` copies exactly those."""
    for target, level in imports(name):
        if ours(target) or level:
            assert level == 1 and within(target, METRIC), f"{name} imports {target}: the metric must be self-contained"


@pytest.mark.parametrize("low", LOWER)
def test_lower_modules_never_reach_the_upper_ones(low):
    reached = chains(f"hf_uwm.{low}")
    bad = [" -> ".join(chain) for target, chain in reached.items()
           if any(within(target, f"hf_uwm.{up}") for up in UPPER)]
    assert not bad, f"hf_uwm.{low} must not import {', '.join(UPPER)}: {bad}"


def test_only_the_cli_imports_the_entry_points():
    bad = [f"{name} imports {target}" for name in MODULES
           if name != "hf_uwm.cli" and not within(name, "hf_uwm.commands") for target, _ in imports(name)
           if any(within(target, f"hf_uwm.{entry}") for entry in ENTRY_POINTS)]
    assert not bad


def private_dataset_reads(tree) -> list[str]:
    """`x._name` where x is a dataset (`dataset`, `self.dataset`, `datasets`...), and any `._fingerprint`."""
    def owner(node):
        return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""

    return [f"line {node.lineno}: .{node.attr}" for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and node.attr.startswith("_") and not node.attr.startswith("__")
            and (owner(node.value).lower().endswith(("dataset", "datasets")) or node.attr == "_fingerprint")]


@pytest.mark.parametrize("name", list(MODULES))
def test_no_private_attribute_of_datasets_is_read(name):
    path = MODULES[name]
    assert not private_dataset_reads(ast.parse(path.read_text(), str(path))), name


def test_the_checks_see_violations():
    """Each check fails on a module that breaks its rule."""
    assert private_dataset_reads(ast.parse("key = self.dataset._fingerprint\nrows = datasets._private")) == [
        "line 1: ._fingerprint", "line 2: ._private"]
    assert private_dataset_reads(ast.parse("n = dataset.num_rows\nx = self._cache")) == []


def test_methods_read_only_the_edit_interface_of_the_editor():
    from hf_uwm.methods.base import Edit

    allowed = {name for name in vars(Edit) if not name.startswith("_")} | set(Edit.__annotations__)
    read = set()
    for path in sorted((PACKAGE / "methods").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "editor":
                read.add((path.name, node.attr))
    assert read and {attr for _, attr in read} <= allowed, sorted(r for r in read if r[1] not in allowed)


# --- rooms with one purpose ------------------------------------------------------------------------
# What every method builds on; none of it may reach a module that registers a method.
SHARED_METHOD_ROOMS = ("base", "calibration", "gradients", "held_out", "margins", "pair_images", "rounds", "stopping")


def registers_a_method(name: str) -> bool:
    """A module that calls `register_method` at its top level: one method's own room."""
    top = [node for node in ast.parse(MODULES[name].read_text()).body
           if not isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    return any(isinstance(call, ast.Call) and getattr(call.func, "id", "") == "register_method"
               for node in top for call in ast.walk(node))


def private_imports(name: str) -> list[str]:
    """`from hf_uwm.x import _y` (any depth): a name another module keeps to itself."""
    tree = ast.parse(MODULES[name].read_text())
    return [f"line {node.lineno}: {alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and (node.level or ours(node.module or "")) for alias in node.names
            if alias.name.startswith("_") and not alias.name.endswith("__")]


@pytest.mark.parametrize("room", SHARED_METHOD_ROOMS)
def test_what_methods_share_reaches_no_method(room):
    methods = {name for name in MODULES if within(name, "hf_uwm.methods") and registers_a_method(name)}
    assert {"hf_uwm.methods.iterative", "hf_uwm.methods.uwm"} <= methods
    # Within the package: `hf_uwm.methods` itself imports every method to register it.
    inside = chains(f"hf_uwm.methods.{room}",
                    keep=lambda name: within(name, "hf_uwm.methods") and name != "hf_uwm.methods")
    bad = [" -> ".join(chain) for target, chain in inside.items() if target in methods]
    assert not bad, f"hf_uwm.methods.{room} is shared by every method and must not import one: {bad}"


@pytest.mark.parametrize("leaf", ("files", "distributed"))
def test_file_and_process_helpers_import_nothing_of_hf_uwm(leaf):
    assert not [target for target, _ in imports(f"hf_uwm.{leaf}") if ours(target)]


@pytest.mark.parametrize("name", [name for name in MODULES if not within(name, METRIC)])
def test_no_module_imports_a_private_name_of_another(name):
    """A name two modules share is public; the metric's files are exempt (one self-contained folder)."""
    assert not private_imports(name), name


@pytest.mark.parametrize("name", [name for name in MODULES if within(name, "hf_uwm.methods")])
def test_no_method_module_imports_matplotlib(name):
    assert not [target for target, _ in imports(name) if within(target, "matplotlib")], "plots live in hf_uwm.plots"


def test_editing_never_loads_matplotlib():
    import subprocess
    import sys

    code = "import sys, hf_uwm.methods, hf_uwm.editor; print('matplotlib' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=PACKAGE.parent).stdout.strip()
    assert loaded == "False"


def test_the_room_checks_see_violations(tmp_path, monkeypatch):
    """Each room check fails on a module that breaks its rule."""
    module = tmp_path / "module.py"
    module.write_text("from .calibration import _Columns\nfrom os import _exit\nfrom . import __version__\n"
                      "for m in (Thing(),):\n    register_method(m)\n")
    monkeypatch.setitem(MODULES, "hf_uwm.methods.module", module)
    assert private_imports("hf_uwm.methods.module") == ["line 1: _Columns"]
    assert registers_a_method("hf_uwm.methods.module")
    module.write_text("def f():\n    from .iterative import IterativeSettings\n")
    assert "hf_uwm.methods.iterative" in chains("hf_uwm.methods.module")
