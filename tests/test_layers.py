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


def chains(start: str):
    """Each hf_uwm module that `start` reaches through its imports, with the chain of modules that leads there."""
    paths, todo = {start: [start]}, [start]
    while todo:
        current = todo.pop()
        for target, _ in imports(current):
            if target in MODULES and target not in paths:
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
