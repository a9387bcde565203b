"""Hub side of a delta: describe it (model card), publish it (one commit).

Finding a delta (folder, Hub or cache) is `hf_uwm.delta.resolve_delta_folder`. Every network call
here goes through `huggingface_hub` (`HfApi` methods), so tests replace exactly that boundary.
"""

from __future__ import annotations

import json
import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.repocard_data import model_index_to_eval_results

from . import __version__
from .settings import setting_names
from .delta import CARD_NAME, CONFIG_NAME
from .errors import PushError  # noqa: F401  (raised here; importable from here as before)
from .formatting import with_interval
from .hints import hint
from .methods import get_method
from .paths import BUNDLED, ORGANISM_WORLDS, bundled_path, hub_card_path, is_hub_id, local_base_folder

logger = logging.getLogger(__name__)

CARD_TEMPLATE = hub_card_path("model_card.md")
EDITED = "UWM"  # the name of this edit's report in report={...}; its numbers fill the model-index
DEFAULT_DATASET = "SafeGround quadruples"  # the card's dataset name when none is given
# model class -> (card tag, pipeline tag of the merged checkpoint)
FAMILY_TAGS = {"CLIPModel": ("clip", "zero-shot-image-classification"),
               "SiglipModel": ("siglip", "zero-shot-image-classification"),
               "LlavaForConditionalGeneration": ("llava", "image-text-to-text")}
NOTHING_COMMITTED = "No commit was made, so {repo_id} holds no part of this upload; nothing local was changed{kept}."
EDIT_KEPT = " (the edit in memory and any folder you saved it to are intact)"


# --- model card ------------------------------------------------------------------------------------
ORGANISM_DATASETS = ("hf_uwm organism world (quadruples)", "hf_uwm organism world (14-class zero-shot)")


def render_card(record: dict, report=None, *, repo_id: str | None = None, merged: bool = False,
                license: str | None = None, dataset_name: str | None = None, zero_shot_dataset: str | None = None,
                base_folder: str | Path | None = None, peft: bool = False) -> str:
    """The README.md of a delta: YAML metadata and what was edited, how well, how to load it, its limits.

    With `peft` the card describes the peft adapter beside the delta too: the Hub then lists the repo
    as a peft adapter of its base model and shows peft's loading snippet.

    `report` is an `EvaluationReport`, or a dict of them by column name such as
    {"base": r0, "UWM": r1, "random control": r2}; the "UWM" entry (or the only one) fills the model-index.
    `dataset_name` (SafeGround and retrieval) and `zero_shot_dataset` are Hub dataset ids or display
    names; a Hub id becomes the model-index dataset `type`. `license` defaults to the base model's,
    when its folder (`base_folder`, or the organism's) holds a card that says it.
    """
    reports = _named_reports(report)
    base = record.get("base_model")
    on_hub = is_hub_id(base)
    if base in ORGANISM_WORLDS:
        dataset_name, zero_shot_dataset = dataset_name or ORGANISM_DATASETS[0], zero_shot_dataset or ORGANISM_DATASETS[1]
    dataset_name = dataset_name or DEFAULT_DATASET
    method = get_method(record["config"]["method"])
    model_name = repo_id or f"{base or record.get('base_model_folder') or record['model_class']} + {method.title}"
    family_tag, pipeline_tag = FAMILY_TAGS.get(record["model_class"], (None, None))
    data = ModelCardData(
        base_model=base if on_hub else None,
        # A delta-only repo is an family of its base (the Hub's model tree); a merged checkpoint is left to the Hub.
        base_model_relation="adapter" if on_hub and not merged else None,
        library_name="peft" if peft else "hf_uwm",
        license=license or _base_license(record, folder=base_folder),
        tags=[t for t in ("hf_uwm", "uwm", "safety", family_tag) if t] + (["peft", "shira"] if peft else []),
        pipeline_tag=pipeline_tag if merged or pipeline_tag == "zero-shot-image-classification" else None,
        model_name=model_name if reports else None,
        eval_results=_eval_results(reports, model_name, dataset_name, zero_shot_dataset),
    )
    card = ModelCard.from_template(data, template_path=str(CARD_TEMPLATE), **_card_context(record, reports),
                                   repo_id=repo_id or "<this folder or repo id>", merged=merged, peft=peft,
                                   method_name=method.title, method=method.card_text,
                                   dataset_name=dataset_name, zero_shot_dataset=zero_shot_dataset or "a zero-shot set",
                                   version=__version__)
    return str(card).rstrip("\n") + "\n"  # jinja drops the template's final newline


def _base_license(record: dict, api: HfApi | None = None, folder: str | Path | None = None) -> str | None:
    """The license in the base model's card: a local folder's README.md, or (given `api`) its Hub card."""
    base = record.get("base_model")
    folder = bundled_path(base) if base in ORGANISM_WORLDS else folder
    try:
        if folder and Path(folder).expanduser().is_dir():
            readme = Path(folder).expanduser() / CARD_NAME
            has_metadata = readme.is_file() and readme.read_text(errors="replace").startswith("---")
            return ModelCard.load(readme).data.license if has_metadata else None
        if api is not None and is_hub_id(base):
            card_data = api.model_info(base, revision=record.get("base_revision")).card_data
            return card_data.license if card_data else None
    except (OSError, ValueError):  # no readable card (missing, private, malformed): the card just omits it
        return None
    return None


def _named_reports(report) -> dict:
    if report is None:
        return {}
    reports = dict(report) if isinstance(report, dict) else {EDITED: report}
    if len(reports) > 1 and EDITED not in reports:
        raise ValueError(f"report= names {list(reports)}: call this edit's report {EDITED!r} so the card knows "
                         f"which numbers are this model's, e.g. {{'base': before, {EDITED!r}: after}}.")
    return reports


def _eval_results(reports: dict, model_name: str, dataset_name: str, zero_shot_dataset: str | None):
    if not reports:
        return None
    edited = reports.get(EDITED, next(iter(reports.values())))
    return model_index_to_eval_results(edited.to_model_index(model_name, dataset_name, zero_shot_dataset))[1]


def _card_context(record: dict, reports: dict) -> dict:
    """Template variables: the edit's settings, per-tower and per-layer counts, the evaluation table."""
    cfg, base = record["config"], record.get("base_model")
    method = get_method(cfg["method"])
    layers = [{"name": name, "tower": info["tower"], "shape": "×".join(map(str, info["shape"])),
               "selected": info["selected"], "total": info["shape"][0] * info["shape"][1]}
              for name, info in record["layers"].items()]
    for layer in layers:
        layer["percent"] = 100 * layer["selected"] / layer["total"]
    towers = []
    for tower in dict.fromkeys(layer["tower"] for layer in layers):
        mine = [layer for layer in layers if layer["tower"] == tower]
        selected, total = sum(l["selected"] for l in mine), sum(l["total"] for l in mine)
        towers.append({"name": tower, "layers": len(mine), "selected": selected, "total": total,
                       "percent": 100 * selected / total})
    return {
        "title": base or record.get("base_model_folder") or f"a {record['model_class']}",
        "base_model": base,
        "base_on_hub": is_hub_id(base),
        "base_is_organism": base in ORGANISM_WORLDS,
        "base_folder": record.get("base_model_folder"),
        # The folder name a user loads the base from, without hf_uwm (the peft snippet).
        "base_folder_name": (BUNDLED[base] if base in BUNDLED else record.get("base_model_folder")) or "the-base-model",
        "base_link": (f"[{base}](https://huggingface.co/{base})" if is_hub_id(base)
                      else f"`{base or record.get('base_model_folder') or record['model_class']}`"),
        "base_revision": record.get("base_revision"),
        "model_class": record["model_class"],
        "config": cfg,
        "alpha": cfg["alpha"],
        "concepts_in_words": record.get("concepts_in_words", []),
        "selection": method.selection_text(cfg, record.get("stop")),
        "settings": {name: cfg[name] for name in setting_names(method.settings_class)},
        "towers": towers,
        "layers": layers,
        "total_selected": f"{sum(t['selected'] for t in towers):,}",
        "fingerprint": record["fingerprint"],
        "evaluation": _evaluation_table(reports) if reports else None,
    }


def _evaluation_table(reports: dict) -> dict:
    """Columns = report names; rows = the SafeGround metrics, zero-shot accuracy and the set size."""
    first = next(iter(reports.values()))
    rows = [(f"`{metric}`", [_percent(r.safeground.get(metric), r.intervals.get(metric)) for r in reports.values()])
            for metric in first.safeground]
    if any(r.zero_shot is not None for r in reports.values()):
        rows.append(("zero-shot accuracy", [_percent(r.zero_shot) for r in reports.values()]))
    rows.append(("quadruples", [f"{r.n_quadruples:,}" for r in reports.values()]))
    return {"columns": list(reports), "rows": rows}


def _percent(value, interval=None) -> str:
    if value is None:
        return "–"
    return with_interval(value, interval)


# --- publishing an edit ----------------------------------------------------------------------------
def push_edit(editor, repo_id: str, *, private: bool | None = None, revision: str | None = None,
              commit_message: str | None = None, commit_description: str | None = None, create_pr: bool = False,
              merged: bool = False, token: str | None = None, report=None, license: str | None = None,
              dataset_name: str | None = None, zero_shot_dataset: str | None = None, overwrite: bool = False,
              peft: bool = False):
    """Upload an editor's delta and model card (and, with `merged`, the edited checkpoint; with `peft`, the
    same edit as a peft adapter) in one commit.

    The repo then holds exactly this edit: files of an earlier push that this one does not write are
    deleted in the same commit. A repo holding anything but an hf_uwm delta of the same base model is
    refused unless `overwrite=True`. With `create_pr` the commit opens a pull request. Returns the
    `CommitInfo` (its `commit_url` links the commit, `pr_url` the pull request).
    """
    token = _token(token)
    api = HfApi(token=token)
    record = editor.record()
    _warn_if_base_not_on_hub(record)
    with _hub_failures("read", repo_id, token):
        remote_files, parent = _remote_files(api, repo_id, revision)
        if not overwrite:
            _refuse_foreign_content(api, repo_id, remote_files, parent, record)
        license = license or _base_license(record, api)
    with tempfile.TemporaryDirectory(prefix="hf_uwm-push-") as tmp:
        folder = Path(tmp) / "upload"
        editor.save_pretrained(folder, peft=peft)
        # The pushed card knows the repo id, the license and whether merged weights or an adapter come along.
        card = render_card(record, report, repo_id=repo_id, merged=merged, license=license, dataset_name=dataset_name,
                           zero_shot_dataset=zero_shot_dataset, base_folder=local_base_folder(editor.base_model),
                           peft=peft)
        (folder / CARD_NAME).write_text(card)
        if merged:
            _save_merged(editor, folder)
        with _hub_failures("push to", repo_id, token):
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision is not None:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            return api.create_commit(repo_id, _operations(folder, remote_files), revision=revision,
                                     commit_message=commit_message or _default_message(record, merged),
                                     commit_description=commit_description, create_pr=create_pr,
                                     parent_commit=parent)


def _token(token: str | None) -> str:
    token = token or get_token()
    if not token:
        raise PushError(f"No Hugging Face token found: {hint('pass token=', 'pass --token')}, set HF_TOKEN, or run "
                        "`hf auth login`. "
                        "Nothing was uploaded and nothing local was changed.")
    return token


@contextmanager
def _hub_failures(action: str, repo_id: str, token: str, kept: str = EDIT_KEPT):
    """Any failure of a Hub call becomes a PushError that says no commit was made and never shows the token.

    `kept` says what the user still has locally (an edit; nothing for the metric, which has no edit).
    """
    try:
        yield
    except PushError:
        raise
    except Exception as err:  # whatever failed (HTTP, connection, client), no commit happened
        status = getattr(getattr(err, "response", None), "status_code", None)
        hint = (" The token was rejected or cannot write there: check it with `hf auth whoami`."
                if status in (401, 403) else "")
        detail = f"{type(err).__name__}: {err}".replace(token, "<token>")
        raise PushError(f"Could not {action} {repo_id} ({detail}).{hint} "
                        + NOTHING_COMMITTED.format(repo_id=repo_id, kept=kept)) from None  # the cause may quote the token


def _warn_if_base_not_on_hub(record: dict):
    if not is_hub_id(record.get("base_model")) and record.get("base_model") not in ORGANISM_WORLDS:
        logger.warning("The delta's base model (%s) is not a Hub id: others must pass model= and processor= "
                       "to UWMEditor.from_pretrained. Set editor.base_model = '<org>/<name>' before pushing to fix it.",
                       record.get("base_model") or f"a local folder {record.get('base_model_folder')!r}")


def _remote_files(api: HfApi, repo_id: str, revision: str | None) -> tuple[list[str], str | None]:
    """(files, head commit) of the branch the push commits to; ([], None) for a repo that does not exist yet."""
    try:
        info = api.repo_info(repo_id, revision=revision)
    except RepositoryNotFoundError:
        return [], None
    except RevisionNotFoundError:
        info = api.repo_info(repo_id)  # a new branch starts from the default branch
    return [sibling.rfilename for sibling in info.siblings or []], info.sha


def _refuse_foreign_content(api: HfApi, repo_id: str, files: list[str], parent: str | None, record: dict):
    """Raise unless the repo is empty or already holds an hf_uwm delta of the same base model."""
    foreign = [name for name in files if name != ".gitattributes"]
    if not foreign:
        return
    if CONFIG_NAME in files:
        remote = _remote_record(api, repo_id, parent)
        if remote is not None and _same_base(remote, record):
            return
        what = (f"an hf_uwm delta of another base model ({remote.get('base_model')!r})" if remote is not None
                else f"a {CONFIG_NAME} that is not an hf_uwm delta config")
    else:
        what = f"other files ({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''})"
    raise PushError(f"{repo_id} already holds {what}. Nothing was uploaded; the local delta is intact. Push to "
                    "another repo id, or pass overwrite=True to replace the repo's content with this edit in one "
                    "commit (the old files stay in its git history).")


def _remote_record(api: HfApi, repo_id: str, revision: str | None) -> dict | None:
    path = api.hf_hub_download(repo_id, CONFIG_NAME, revision=revision)
    try:
        record = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and "fingerprint" in record else None


def _same_base(a: dict, b: dict) -> bool:
    """Same target weights (fingerprint), or the same base model name (another config of the same model)."""
    same_name = bool(a.get("base_model")) and a.get("base_model") == b.get("base_model")
    return a.get("fingerprint") == b.get("fingerprint") or same_name


def _save_merged(editor, folder: Path):
    """The full edited checkpoint beside the delta, so plain `from_pretrained(repo)` loads it."""
    with editor.applied():
        editor.model.save_pretrained(folder)
    if editor.processor is None:
        logger.warning("The editor has no processor: the merged checkpoint holds weights and config only.")
    else:
        editor.processor.save_pretrained(folder)


def _operations(folder: Path, remote_files: list[str]) -> list:
    local = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    # Stale files of an earlier push (merged weights, say) would describe another edit than the delta.
    stale = sorted(set(remote_files) - set(local) - {".gitattributes"})
    return ([CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in local]
            + [CommitOperationDelete(path_in_repo=name) for name in stale])


def _default_message(record: dict, merged: bool) -> str:
    cfg, changed = record["config"], sum(record["counts"].values())
    method = get_method(cfg["method"]).title
    return (f"Upload {method} edit of {record.get('base_model') or record['model_class']} ({changed:,} weights, "
            f"α={cfg['alpha']}){' with merged weights' if merged else ''}")


# --- publishing the metric -------------------------------------------------------------------------
def push_metric(repo_id: str, *, token: str | None = None, private: bool | None = None,
                commit_message: str | None = None):
    """Publish the SafeGround metric as a Gradio Space, so `evaluate.load("NAMESPACE/safeground")` works."""
    from .metrics import safeground_path

    folder = Path(safeground_path())
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or repo_id.split("/")[1] != folder.name:
        raise ValueError(f"repo_id={repo_id!r}: name the Space '<namespace>/{folder.name}'. evaluate.load("
                         f"'<namespace>/<name>') runs the file <name>.py, and the metric's file is {folder.name}.py.")
    token = _token(token)
    api = HfApi(token=token)
    with _hub_failures("publish the metric to", repo_id, token, kept=""):
        api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        message = commit_message or f"Upload the SafeGround metric (hf_uwm {__version__})"
        return api.upload_folder(repo_id=repo_id, repo_type="space", folder_path=folder, commit_message=message,
                                 ignore_patterns=["__pycache__/*", "*.pyc"])
