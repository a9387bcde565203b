"""A delta as a peft SHiRA adapter (`adapter_config.json` + `adapter_model.safetensors`), and back.

peft's SHiRA adapter adds, per target layer, a value at each of r·(out + in) listed (row, col)
positions of the base weight. A UWM edit W ← α·W at the selected positions is that adapter with the
value (α − 1)·W there; the remaining positions of a layer are padded with unselected ones at value 0.
At α = −1 (value −2W) and α = 0 (value −W) the sum W + (α − 1)·W is α·W exactly, so the peft model
computes what `UWMEditor.apply()` computes, bit for bit; see `rounding_bound` for other α.

Per layer the selected positions come first, in the delta's order, so hf_uwm reads the delta back
from the adapter alone (the delta's record travels in the safetensors metadata).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .delta import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, check_indices, check_record
from .files import save_safetensors
from .paths import is_hub_id

FORMAT = "hf_uwm.shira"   # the safetensors metadata that marks an adapter written by hf_uwm
PEFT_TYPE = "SHIRA"
PEFT_INSTALL = 'pip install "hf_uwm[peft]"'
PREFIX = "base_model.model."   # peft's name for the wrapped model in an adapter's state dict


def require_peft():
    """peft's `ShiraConfig`, or an ImportError that names the extra to install."""
    try:
        from peft import ShiraConfig
    except ImportError:
        raise ImportError(f"Writing a peft adapter needs peft 0.18 or newer (its SHiRA adapter): {PEFT_INSTALL}.") from None
    return ShiraConfig


def shira_rank(record: dict) -> int:
    """The smallest r whose r·(out + in) slots hold every layer's selected weights.

    peft gives every target layer the same r, and refuses a layer where r·(out + in) exceeds out·in.
    """
    layers = record["layers"].values()
    r = max([1] + [math.ceil(info["selected"] / sum(info["shape"])) for info in layers])
    too_small = [name for name, info in record["layers"].items()
                 if r * sum(info["shape"]) > info["shape"][0] * info["shape"][1]]
    if too_small:
        raise ValueError(f"A SHiRA adapter gives each layer r·(out + in) weights with one r for all; r = {r} (for the "
                         f"largest selection) exceeds the size of {too_small[:3]}: this delta cannot be a peft SHiRA "
                         "adapter. Save it without peft=True.")
    return r


def adapter_tensors(record: dict, delta: dict[str, torch.Tensor],
                    selected_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's state dict: per layer int32 (row, col) indices [2, r·(out + in)] and their values.

    `selected_weights[name]` are the base weights at `delta[name]`, in that order.
    """
    r, alpha = shira_rank(record), record["config"]["alpha"]
    tensors = {}
    for name, idx in delta.items():
        out_features, in_features = record["layers"][name]["shape"]
        padding = _unselected(idx, r * (out_features + in_features) - idx.numel())
        flat = torch.cat([idx.cpu().long(), padding])
        values = selected_weights[name].detach().cpu() * (alpha - 1)
        tensors[f"{PREFIX}{name}.shira_indices"] = torch.stack([flat // in_features, flat % in_features]).int()
        tensors[f"{PREFIX}{name}.shira_weight"] = torch.cat([values, values.new_zeros(padding.numel())])
    return tensors


def _unselected(idx: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` positions that `idx` does not hold: all lie below count + len(idx), so only
    those are looked at (not a mask of the whole layer)."""
    candidates = torch.arange(count + idx.numel())
    return candidates[~torch.isin(candidates, idx.cpu())][:count]


def adapter_config(record: dict, model) -> dict:
    """`adapter_config.json`: a SHiRA config of the installed peft over the delta's layers, for inference."""
    ShiraConfig = require_peft()
    base = record.get("base_model")
    config = ShiraConfig(r=shira_rank(record), target_modules=sorted(record["layers"]), inference_mode=True,
                         base_model_name_or_path=base if is_hub_id(base) else None,
                         revision=record.get("base_revision") if is_hub_id(base) else None).to_dict()
    config["target_modules"] = sorted(config["target_modules"])
    # What peft's AutoPeftModel loads the base model with (peft writes it for a model without a task type).
    config["auto_mapping"] = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    return config


def write_adapter(folder: Path, record: dict, delta: dict[str, torch.Tensor],
                  selected_weights: dict[str, torch.Tensor], model):
    """Write the adapter's two files into `folder` (the staging folder of `write_delta`)."""
    config = adapter_config(record, model)
    save_safetensors(adapter_tensors(record, delta, selected_weights), folder / ADAPTER_WEIGHTS_NAME,
                     {"format": "pt", "hf_uwm": FORMAT, "record": json.dumps(record, sort_keys=True)})
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(record, indices) of a SHiRA adapter written by hf_uwm; a clear error for any other adapter."""
    config_path, weights_path = folder / ADAPTER_CONFIG_NAME, folder / ADAPTER_WEIGHTS_NAME
    try:
        config = json.loads(config_path.read_text())
        with safe_open(weights_path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()} if metadata.get("hf_uwm") == FORMAT else {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, SafetensorError) as err:
        raise ValueError(f"{folder} holds a peft adapter that cannot be read ({err}); download or export it again.") \
            from None
    if not isinstance(config, dict) or config.get("peft_type") != PEFT_TYPE or "record" not in metadata or not tensors:
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise ValueError(f"{folder} holds a peft {kind} adapter that hf_uwm did not write: hf_uwm "
                         "reads only the SHiRA adapters it exports beside a delta. Load this one with peft "
                         "(PeftModel.from_pretrained(base_model, folder)).")
    try:
        record = json.loads(metadata["record"])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{weights_path} has a corrupted hf_uwm record ({err}); export the adapter again.") from None
    check_record(record, weights_path)
    indices = {}
    for name, info in record["layers"].items():
        rows_cols = tensors.get(f"{PREFIX}{name}.shira_indices")
        if rows_cols is None:
            raise ValueError(f"{weights_path} has no indices for the layer {name!r} its record lists; export it again.")
        rows, cols = rows_cols[:, :info["selected"]].long()
        indices[name] = rows * info["shape"][1] + cols
    check_indices(record, indices, weights_path)
    return record, indices
