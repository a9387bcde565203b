"""The delta format: `uwm_config.json` + `uwm_delta.safetensors` (+ `README.md`), and where a delta is.

Only JSON and safetensors are ever read: nothing is unpickled. A delta named by a Hub id is found
through `huggingface_hub` (`hf_hub_download`, `snapshot_download`, its cache), so tests replace
exactly that boundary.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download, snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from safetensors import SafetensorError, safe_open

from .files import check_writable, current_umask, save_safetensors, swap_into_place
from .hints import hint
from . import paths
from .paths import BUNDLED, check_local, is_hub_id, unreachable_error

CONFIG_NAME = "uwm_config.json"
DELTA_NAME = "uwm_delta.safetensors"
CARD_NAME = "README.md"
DELTA_FILES = (CONFIG_NAME, DELTA_NAME, CARD_NAME)
TRAJECTORY_NAME = "trajectory.png"   # the plot `hf-uwm edit` adds beside a delta that stopped by itself
# The same edit as a peft SHiRA adapter, written beside the delta with peft=True (see hf_uwm.peft_adapter).
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)
KNOWN_FILES = DELTA_FILES + (TRAJECTORY_NAME,) + ADAPTER_FILES   # what a delta folder may hold
FORMAT_VERSION = 1
# The top-level keys of uwm_config.json: what UWMEditor.record() writes, and the stopping trajectory of
# the iterative methods. A file of an older version has fewer; an unknown key is refused, not ignored.
RECORD_KEYS = ("format_version", "hf_uwm_version", "model_class", "base_model", "base_model_folder", "base_revision",
               "config", "fingerprint", "fingerprint_dtype", "layers", "counts", "trajectory", "stop",
               "concepts_in_words")


def fingerprint(layers: dict, streams: dict | None = None) -> str:
    """sha256 over the names, shapes and bfloat16-rounded bytes of the target weights, in name order.

    Rounding to bfloat16 lets a delta computed in float32 apply to the same checkpoint loaded in
    bfloat16 (and vice versa), while any real change of the weights still changes the hash.
    `streams` (device -> CUDA stream) runs the rounding and copies off the current stream.
    """
    digest = hashlib.sha256()
    for name in sorted(layers):
        weight = layers[name].weight.detach()
        stream = (streams or {}).get(weight.device)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            # Rounded before the copy, so only half the bytes leave a GPU.
            weight = weight.to(torch.bfloat16).cpu().contiguous()
        digest.update(f"{name}:{tuple(weight.shape)}\n".encode())
        digest.update(weight.view(torch.int16).numpy())       # hashlib reads the buffer, no copy
    return digest.hexdigest()


def fingerprint_in_background(layers: dict) -> Future:
    """`fingerprint(layers)` computed in a worker thread, overlapping the forward passes queued meanwhile.

    On a GPU the copies run on a side stream that starts after the work queued so far (so they see
    the weights as they are now) and runs beside later kernels. The target weights must not change
    until the result is read.
    """
    streams = {}
    for device in {layer.weight.device for layer in layers.values()}:
        if device.type == "cuda":
            streams[device] = torch.cuda.Stream(device)
            streams[device].wait_stream(torch.cuda.current_stream(device))
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_uwm-fingerprint")
    try:
        return pool.submit(fingerprint, dict(layers), streams)
    finally:
        pool.shutdown(wait=False)


def index_dtype(numel: int) -> torch.dtype:
    """int32 for a layer of fewer than 2³¹ weights (half the bytes), int64 otherwise."""
    return torch.int32 if numel < 2**31 else torch.int64


def scale_(weight: torch.Tensor, idx: torch.Tensor, alpha: float) -> torch.Tensor:
    """W.flat[idx] *= α in place, without autograd; returns the values before the change."""
    with torch.no_grad():
        flat = weight.view(-1)
        idx = idx.to(flat.device)
        before = flat[idx].clone()
        flat[idx] = before * alpha
    return before


def check_output_folder(directory: str | Path, overwrite: bool = False) -> Path:
    """Raise unless a delta can be written to `directory`: checked before any expensive work.

    The folder must be new or empty, or hold a delta and nothing else with `overwrite`; a delta is
    written beside it first and moved into place, so its parent must be writable.
    """
    directory = Path(directory)
    if directory.exists():
        if not directory.is_dir():
            raise FileExistsError(f"{directory} exists and is a file; choose a folder path for the delta.")
        names = {p.name for p in directory.iterdir()}
        foreign = sorted(names - set(KNOWN_FILES))
        if foreign:
            raise FileExistsError(f"{directory} already holds other files {foreign[:5]}; save the delta to "
                                  "an empty or new folder.")
        if names & {CONFIG_NAME, DELTA_NAME, *ADAPTER_FILES} and not overwrite:
            raise FileExistsError(f"{directory} already holds a delta; " + hint(
                "pass overwrite=True to replace it", "add --overwrite to replace it") + ", or choose a new folder.")
    check_writable(directory.parent, directory)
    return directory


def write_delta(directory: str | Path, record: dict, indices: dict[str, torch.Tensor], card: str, *,
                overwrite: bool = False, extra=None) -> Path:
    """Write the three files (and whatever `extra(folder)` writes) into a temporary sibling folder, then
    move it into place.

    An existing folder is replaced only if it holds nothing but delta files and `overwrite` is set
    (see `check_output_folder`), so a failure leaves no half-written delta and nothing else the
    user saved is lost. Indices are int32 where the layer
    allows; files and folder get the permissions of any other file the user creates.
    """
    directory = check_output_folder(directory, overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes it private (0700)
        tensors = {name: idx.to("cpu", index_dtype(_numel(record["layers"][name]["shape"])))
                   for name, idx in indices.items()}
        save_safetensors(tensors, staging / DELTA_NAME, {"format": "hf_uwm.delta",
                                                        "alpha": repr(record["config"]["alpha"])})
        (staging / CONFIG_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        (staging / CARD_NAME).write_text(card)
        if extra is not None:
            extra(staging)
        swap_into_place(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _numel(shape) -> int:
    return int(shape[0]) * int(shape[1])


def read_delta(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(record, indices) from a delta folder, checked for consistency; clear errors otherwise."""
    directory = Path(directory)
    config_path, delta_path = directory / CONFIG_NAME, directory / DELTA_NAME
    if not config_path.is_file() and (directory / ADAPTER_CONFIG_NAME).is_file():
        from .peft_adapter import read_adapter

        return read_adapter(directory)
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}: it is not a delta folder written by "
                                "UWMEditor.save_pretrained (a base model folder needs config=UWMConfig(...)).")
    try:
        record = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}); the delta is corrupted: save it again.") from None
    check_record(record, config_path)
    if not delta_path.is_file():
        raise FileNotFoundError(f"{directory} has {CONFIG_NAME} but no {DELTA_NAME}: the delta is incomplete.")
    try:
        with safe_open(delta_path, framework="pt") as f:
            stored = {name: f.get_tensor(name) for name in f.keys()}
        # int32 on disk (int64 in older deltas, and for layers of 2³¹ weights or more); int64 in memory.
        indices = {name: idx.long() if idx.dtype in (torch.int32, torch.int64) else idx
                   for name, idx in stored.items()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{delta_path} is corrupted or truncated ({err}); save or download the delta again.") from None
    check_indices(record, indices, delta_path)
    return record, indices


def check_record(record, path: Path):
    """Raise unless `record` (read from `path`) is an hf_uwm delta record this version can read."""
    if not isinstance(record, dict):
        raise ValueError(f"{path} does not hold an hf_uwm delta config (a JSON object).")
    for key in ("config", "fingerprint", "layers", "format_version"):
        if key not in record:
            raise ValueError(f"{path} lacks the field {key!r}: it is not an hf_uwm delta config.")
    if record["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{path} has delta format {record['format_version']}; this hf_uwm reads up to "
                         f"{FORMAT_VERSION}: upgrade hf_uwm.")
    unknown = sorted(set(record) - set(RECORD_KEYS))
    if unknown:
        raise ValueError(f"{path} has unknown top-level key(s) {unknown} (known: {list(RECORD_KEYS)}): it was "
                         "written by a newer hf_uwm (upgrade it) or edited by hand (remove them).")


def check_indices(record: dict, indices: dict[str, torch.Tensor], path: Path):
    """Raise unless `indices` are, per layer of `record`, its count of sorted, distinct positions."""
    if set(indices) != set(record["layers"]):
        raise ValueError(f"{path} holds layers {sorted(indices)} but its config lists {sorted(record['layers'])}.")
    for name, idx in indices.items():
        info = record["layers"][name]
        numel = _numel(info["shape"])
        ok = (idx.dtype == torch.int64 and idx.dim() == 1 and idx.numel() == info["selected"]
              and (idx.numel() == 0 or (int(idx[0]) >= 0 and int(idx[-1]) < numel))
              and bool((idx[1:] > idx[:-1]).all()))
        if not ok:
            raise ValueError(f"{path}: the indices of layer {name!r} are not {info['selected']} sorted, distinct "
                             f"positions in a {info['shape']} weight; the delta is corrupted.")


def resolve_delta_folder(name_or_path, revision: str | None = None, *, subfolder: str | None = None,
                         **download) -> Path | None:
    """The local folder of a delta (a folder, or a Hub repo downloaded or found in the cache).

    None means "not a delta": a base model folder or repo (or the bundled `organism`), which the
    caller loads as a model. `download` (token, cache_dir, local_files_only, force_download) goes to
    every `huggingface_hub` download; `subfolder` is where the delta lies inside the folder or repo.
    """
    check_local(name_or_path)
    if name_or_path in BUNDLED:
        return None
    local = Path(str(name_or_path)).expanduser() / (subfolder or "")
    if local.is_dir():
        # A folder holding only a peft adapter is read as a delta if hf_uwm wrote it, refused clearly if not.
        return local if (local / CONFIG_NAME).is_file() or (local / ADAPTER_CONFIG_NAME).is_file() else None
    repo_id = str(name_or_path)
    if not is_hub_id(repo_id):
        return None
    unreachable = paths.hub_unreachable()
    if unreachable:  # the cache answers at once; the Hub would be retried for half a minute
        download = {**download, "local_files_only": True}
    try:
        hf_hub_download(repo_id, CONFIG_NAME, revision=revision, subfolder=subfolder, **download)
    except LocalEntryNotFoundError as err:  # offline or unreachable Hub, and the file is not cached
        cached = try_to_load_from_cache(repo_id, f"{subfolder}/config.json" if subfolder else "config.json",
                                        cache_dir=download.get("cache_dir"), revision=revision)
        if isinstance(cached, str):
            return None  # a base model cached earlier: transformers loads it from the cache
        raise unreachable_error(repo_id, unreachable or _first_line(err)) from err
    except EntryNotFoundError:
        return None  # the repo has no uwm_config.json: a base model
    except GatedRepoError as err:
        raise OSError(f"The Hub repo {repo_id!r} is gated: request access on its page, then log in with "
                      "`hf auth login` (or set HF_TOKEN).") from err
    except RepositoryNotFoundError as err:
        raise OSError(f"{repo_id!r} is not a local folder, and the Hub has no model repo {repo_id!r} that you can "
                      "read (it does not exist, or it is private and your token cannot see it). Check the name, "
                      "give a local folder, or log in with `hf auth login`.") from err
    except RevisionNotFoundError as err:
        raise OSError(f"The Hub repo {repo_id!r} has no revision {revision!r}: give an existing branch, tag or "
                      "commit hash, or leave revision=None for the default branch.") from err
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        snapshot = snapshot_download(repo_id, revision=revision, allow_patterns=[prefix + f for f in DELTA_FILES],
                                     **download)
    except OSError as err:
        raise OSError(f"{repo_id!r} is an hf_uwm delta, but its files could not be downloaded "
                      f"({_first_line(err)}): check the connection and try again.") from err
    return Path(snapshot) / (subfolder or "")


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
