"""Register SafeGround in `evaluate`'s module cache, so that `evaluate.load("safeground")` finds it.

For a bare name, `evaluate.load` asks the Hub for `evaluate-metric/<name>`; when the Hub has no such
module or cannot be reached, it loads the newest cached download of it instead (by the modification
time of its script), from `<HF_MODULES_CACHE>/evaluate_modules/metrics/evaluate-metric--<name>/<hash>/`.
`install_safeground` writes that download from the installed metric folder, laid out as `evaluate`
lays out its own (package `__init__.py` files, the script, the sibling modules it imports, a JSON
note of its origin, and the folder named by `evaluate`'s own hash of the code). An official
`evaluate-metric/safeground` on the Hub, which `evaluate` asks first, would still take precedence.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

NAMESPACE = "evaluate-metric"  # the Hub namespace `evaluate` looks in first for a bare name


def install_safeground(modules_cache: str | os.PathLike | None = None) -> str:
    """Make `evaluate.load("safeground")` load the SafeGround module installed with hf_uwm, offline too.

    `modules_cache` defaults to evaluate's (`HF_MODULES_CACHE`, else ~/.cache/huggingface/modules).
    Running it again replaces the same version and makes the installed one the newest cached version,
    the one `evaluate` picks. Returns the folder written.
    """
    from evaluate import config
    from evaluate.loading import files_to_hash, get_imports
    from filelock import FileLock

    from ..files import check_writable
    from . import safeground_path

    source = Path(safeground_path())
    script = source / f"{source.name}.py"
    # the relative imports `evaluate` copies beside the script: the script's own, not theirs
    siblings = {name: source / f"{path}.py" for kind, name, path, _ in get_imports(str(script)) if kind == "internal"}
    cache = Path(modules_cache if modules_cache is not None else config.HF_MODULES_CACHE)
    check_writable(cache, f"evaluate's module cache {cache} (set HF_MODULES_CACHE to choose another)")
    folder = cache / config.MODULE_NAME_FOR_DYNAMIC_MODULES / "metrics" / f"{NAMESPACE}--{source.name}"
    target = folder / files_to_hash([str(script), *map(str, siblings.values())])
    folder.mkdir(parents=True, exist_ok=True)
    packages = folder.relative_to(cache)
    for package in (packages, *packages.parents):  # the cache itself too: evaluate imports from each level
        (cache / package / "__init__.py").touch()
    with FileLock(f"{folder}.lock"):  # the lock `evaluate` takes when it writes this folder
        staging = Path(tempfile.mkdtemp(prefix=".install-", dir=folder))  # not a 64-character hash: evaluate skips it
        try:
            _write_module(staging, script, siblings, target)
            _swap_in(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already once swapped in
        _make_newest(target / script.name)
    return str(target)


def _write_module(staging: Path, script: Path, siblings: dict[str, Path], target: Path):
    (staging / "__init__.py").touch()
    for name, path in {script.stem: script, **siblings}.items():
        shutil.copyfile(path, staging / f"{name}.py")
    note = {"original file path": str(script), "local file path": str(target / script.name)}
    (staging / f"{script.stem}.json").write_text(json.dumps(note))


def _swap_in(staging: Path, target: Path):
    """Put the fresh folder at `target`, replacing the same version: never a half-written hash folder."""
    old = None
    if target.exists():
        old = target.with_name(f".replaced-{staging.name}")
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _make_newest(script: Path):
    """Date the script after every other cached version's, even within the file system's time resolution."""
    others = [p.stat().st_mtime for p in script.parent.parent.glob(f"*/{script.name}") if p != script]
    stamp = max([time.time(), *(mtime + 1 for mtime in others)])
    os.utime(script, (stamp, stamp))
