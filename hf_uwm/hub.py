"""Hub side of a delta: where its files are, and the model card that describes it."""

from __future__ import annotations

from pathlib import Path

from .delta import CONFIG_NAME, DELTA_FILES


def resolve_delta_folder(name_or_path, revision: str | None = None) -> Path | None:
    """The local folder of a delta (downloading it from the Hub if needed), or None for a base model."""
    local = Path(str(name_or_path)).expanduser()
    if local.is_dir():
        return local if (local / CONFIG_NAME).is_file() else None
    if local.exists() or str(name_or_path).count("/") > 1:
        return None
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        config_file = hf_hub_download(str(name_or_path), CONFIG_NAME, revision=revision)
    except EntryNotFoundError:
        return None
    folder = snapshot_download(str(name_or_path), revision=revision, allow_patterns=list(DELTA_FILES))
    return Path(folder) if Path(folder, CONFIG_NAME).is_file() else Path(config_file).parent


def render_card(record: dict, report=None) -> str:
    """A minimal model card for a saved delta."""
    cfg = record["config"]
    counts = ", ".join(f"{tower}: {n:,}" for tower, n in record["counts"].items())
    lines = [
        "---",
        "library_name: hf_uwm",
        f"base_model: {record['base_model']}" if record.get("base_model") else None,
        "tags:", "- hf_uwm", "- uwm", "- safety",
        "---",
        "",
        f"# UWM edit of {record.get('base_model') or 'a ' + record['model_class']}",
        "",
        f"Unsafe Weights Manipulation: score `{cfg['score']}`, selection `{cfg['selection']}`, "
        f"τ = {cfg['tau']}, α = {cfg['alpha']}; weights changed per tower: {counts}.",
        "",
        "```python",
        "from hf_uwm import UWMEditor",
        "model = UWMEditor.from_pretrained(\"<this folder or repo>\").apply()",
        "```",
    ]
    if report is not None:
        lines += ["", "## Evaluation", "", "```", str(report), "```"]
    return "\n".join(line for line in lines if line is not None) + "\n"
