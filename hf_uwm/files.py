"""Files written so that a failure or a kill leaves nothing half-written, and folders checked before the work.

Every file hf_uwm writes (deltas, peft adapters, score caches, checkpoints) goes through here:
safetensors with a reproducible header, written beside the target and moved into place, with the
permissions any other file the user creates would get.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]):
    """safetensors `save_file`, byte-reproducible and readable as the umask allows.

    safetensors writes its metadata in hash-map order, which differs between runs; the header is
    rewritten with sorted keys (the same bytes reordered, so its length and the data offsets stay).
    """
    save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, path, metadata=metadata)
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = f.read(size)
        canonical = json.dumps(json.loads(header), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(canonical) > size:  # never: the same keys and values, reordered
            raise RuntimeError(f"Cannot write a canonical safetensors header for {path}.")
        f.seek(8)
        f.write(canonical.ljust(size, b" "))
    os.chmod(path, 0o666 & ~current_umask())


def save_file_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]):
    """`save_safetensors` via a sibling temporary file: a kill at any point leaves `path` as it was."""
    staging = path.with_name(path.name + ".tmp")
    save_safetensors(tensors, staging, metadata)
    os.replace(staging, path)


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(folder: str | Path, what: str | Path | None = None) -> Path:
    """Raise unless files can be made in `folder` or, when it does not exist yet, in the folder it goes under.

    A probe file is created and removed: permissions, read-only mounts and immutable folders all
    show up here, before any model is loaded, instead of as a raw errno after the work is done.
    `what` names the path the user gave, in the message (default `folder`).
    """
    folder = Path(folder)
    what = folder if what is None else what
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise FileExistsError(f"Cannot write {what}: {existing} is a file, so no folder can be made under it; "
                              "choose a path that is not under a file.")
    try:
        handle, probe = tempfile.mkstemp(prefix=".hf_uwm-probe-", dir=existing)
    except OSError as err:
        raise PermissionError(f"Cannot write {what}: the folder {existing} is not writable ({err.strerror}); "
                              "choose a folder you can write to.") from None
    os.close(handle)
    os.unlink(probe)
    return folder


def swap_into_place(staging: Path, directory: Path):
    """Move the finished folder `staging` to `directory`, replacing what is there only once it has moved."""
    if not directory.exists():
        os.replace(staging, directory)
        return
    old = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(directory, old)
    try:
        os.replace(staging, directory)
    except BaseException:
        os.replace(old, directory)
        raise
    shutil.rmtree(old, ignore_errors=True)
