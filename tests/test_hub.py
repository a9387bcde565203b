"""Hub integration, offline: the `huggingface_hub` network boundary is replaced by a fake repo in a folder."""

import copy
import fnmatch
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard, SpaceCard, constants
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RemoteEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)

from conftest import make_clip, make_pairs
from hf_uwm import UWMConfig, UWMEditor
from hf_uwm.delta import ADAPTER_FILES, CONFIG_NAME, DELTA_FILES, DELTA_NAME, read_delta, resolve_delta_folder
from hf_uwm.evaluation import EvaluationReport
from hf_uwm.hub import PushError, render_card

TOKEN = "hf_SeCrEt0123456789abcdef"
BASE, BASE_REVISION, SHA = "org/clip-base", "0123abc", "f" * 40
METRICS = ("P_s^t", "P_u^t", "P_s^v", "P_u^v", "Txt_s", "Img_s", "PS", "PU", "GS")


def http_error(cls, status=404, message="boom"):
    return cls(message, response=SimpleNamespace(status_code=status, headers={}, request=None))


class FakeHub:
    """One model repo whose files live in a folder; every HfApi call is recorded, commits are applied."""

    def __init__(self, root: Path, files: dict | None = None, license: str | None = "mit"):
        self.root, self.exists, self.license = root, files is not None, license
        self.calls, self.commits, self.tokens, self.revisions = [], [], set(), []
        root.mkdir(parents=True)
        for name, content in (files or {}).items():
            (root / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        self.fail = {}  # method name -> exception to raise

    def install(self, monkeypatch):
        for name in ("repo_info", "model_info", "create_repo", "create_branch", "create_commit", "hf_hub_download",
                     "upload_folder"):
            monkeypatch.setattr(HfApi, name, self._method(name))
        monkeypatch.setattr("hf_uwm.delta.hf_hub_download", self.download)
        monkeypatch.setattr("hf_uwm.delta.snapshot_download", self.snapshot)
        return self

    def _method(self, name):
        def call(api, *args, **kwargs):
            self.calls.append(name)
            self.tokens.add(api.token)
            if name in self.fail:
                raise self.fail[name]
            return getattr(self, name)(*args, **kwargs)
        return call

    def files(self):
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())

    # HfApi methods
    def repo_info(self, repo_id, revision=None, **_):
        if not self.exists:
            raise http_error(RepositoryNotFoundError)
        if revision not in (None, "main"):
            raise http_error(RevisionNotFoundError)
        return SimpleNamespace(sha=SHA, siblings=[SimpleNamespace(rfilename=f) for f in self.files()])

    def model_info(self, repo_id, revision=None, **_):
        assert (repo_id, revision) == (BASE, BASE_REVISION)
        return SimpleNamespace(card_data=SimpleNamespace(license=self.license))

    def create_repo(self, repo_id, **kwargs):
        self.create_repo_kwargs = kwargs
        self.exists = True

    def create_branch(self, repo_id, branch, **kwargs):
        self.branch = (branch, kwargs)

    def create_commit(self, repo_id, operations, *, commit_message, revision=None, parent_commit=None, **_):
        added = [op.path_in_repo for op in operations if isinstance(op, CommitOperationAdd)]
        deleted = [op.path_in_repo for op in operations if not isinstance(op, CommitOperationAdd)]
        for op in operations:
            target = self.root / op.path_in_repo
            if isinstance(op, CommitOperationAdd):
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(op.path_or_fileobj, target)
            else:
                target.unlink()
        self.commits.append(dict(repo_id=repo_id, message=commit_message, revision=revision, parent=parent_commit,
                                 added=added, deleted=deleted, description=_.get("commit_description"),
                                 create_pr=_.get("create_pr")))
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{'1' * 40}",
                          commit_message=commit_message, commit_description="", oid="1" * 40)

    def hf_hub_download(self, repo_id, filename, revision=None, **_):
        return str(self.root / filename)

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=(), commit_message, **kwargs):
        for path in Path(folder_path).rglob("*"):
            name = path.relative_to(folder_path).as_posix()
            if path.is_file() and not any(fnmatch.fnmatch(name, p) for p in ignore_patterns):
                (self.root / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, self.root / name)
        self.commits.append(dict(repo_id=repo_id, message=commit_message, **kwargs))
        return CommitInfo(commit_url=f"https://huggingface.co/spaces/{repo_id}/commit/{'1' * 40}",
                          commit_message=commit_message, commit_description="", oid="1" * 40)

    # module-level download functions, served from the repo folder
    def download(self, repo_id, filename, revision=None, **_):
        self.revisions.append(revision)
        if not (self.root / filename).is_file():
            raise http_error(RemoteEntryNotFoundError)
        return str(self.root / filename)

    def snapshot(self, repo_id, revision=None, allow_patterns=None, **_):
        self.revisions.append(revision)
        snapshot = self.root.parent / "snapshot"
        shutil.rmtree(snapshot, ignore_errors=True)
        snapshot.mkdir()
        for name in self.files():
            if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                shutil.copyfile(self.root / name, snapshot / name)
        return str(snapshot)


@pytest.fixture(scope="module")
def clip():
    return make_clip()


def fresh_clip(clip):
    """A copy of the untouched tiny CLIP (quicker than building one) and its processor."""
    return copy.deepcopy(clip[0]), clip[1]


@pytest.fixture(scope="module")
def saved(clip, tmp_path_factory):
    """A delta of the tiny CLIP, calibrated once, whose record names a Hub base model."""
    folder = tmp_path_factory.mktemp("delta") / "d"
    editor = UWMEditor(*fresh_clip(clip), base_model=BASE, base_revision=BASE_REVISION)
    editor.calibrate(make_pairs(), progress=False).save_pretrained(folder)
    return folder


@pytest.fixture
def editor(clip, saved):
    model, processor = fresh_clip(clip)
    return UWMEditor.from_pretrained(saved, model=model, processor=processor)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    return FakeHub(tmp_path / "remote").install(monkeypatch)


def state(model):
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def report(offset):
    return EvaluationReport(safeground={m: 10.0 + offset + i for i, m in enumerate(METRICS)},
                            intervals={m: (5.0 + offset, 20.0 + offset) for m in METRICS},
                            retrieval={"R@1 Ts->Is": 40.0 + offset}, zero_shot=70.0 - offset, n_quadruples=100)


# --- pushing ---------------------------------------------------------------------------------------
def test_push_uploads_the_delta_and_its_card_in_one_commit(editor, hub, saved):
    info = editor.push_to_hub("me/clip-uwm", private=True, token=TOKEN)
    assert hub.calls == ["repo_info", "model_info", "create_repo", "create_commit"]
    assert hub.create_repo_kwargs == {"private": True, "exist_ok": True} and hub.tokens == {TOKEN}
    [commit] = hub.commits
    assert commit["added"] == sorted(DELTA_FILES) and commit["deleted"] == [] and commit["parent"] is None
    assert commit["message"] == f"Upload UWM edit of {BASE} ({sum(editor.counts().values())} weights, α=-1.0)"
    assert info.commit_url.startswith("https://huggingface.co/me/clip-uwm/commit/")
    (record, indices), (saved_record, saved_indices) = read_delta(hub.root), read_delta(saved)
    assert record == saved_record and same(indices, saved_indices)
    card = ModelCard((hub.root / "README.md").read_text())
    assert card.data.base_model == BASE and card.data.library_name == "hf_uwm" and card.data.license == "mit"
    assert {"hf_uwm", "uwm", "safety", "clip"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "zero-shot-image-classification" and card.data.base_model_relation == "adapter"
    assert 'UWMEditor.from_pretrained("me/clip-uwm")' in card.text and "CLIPModel.from_pretrained" not in card.text


def test_card_says_what_was_edited_per_tower_and_layer(editor):
    record = editor.record()
    card = ModelCard(render_card(record))
    assert card.data.model_name is None and card.data.eval_results is None
    for name, info in record["layers"].items():
        assert f"| `{name}` | {info['tower']} | {info['shape'][0]}×{info['shape'][1]} | {info['selected']} |" in card.text
    for tower, count in record["counts"].items():
        total = sum(i["shape"][0] * i["shape"][1] for i in record["layers"].values() if i["tower"] == tower)
        assert f"| {tower} | 3 | {count} of {total:,} |" in card.text
    assert "adaptive, τ = 0.02" in card.text and "α = -1.0 (they are negated)" in card.text
    assert "Anyone can undo this edit" in card.text and "harder but not impossible" in card.text


def test_card_with_before_and_after_reports_fills_table_and_model_index(editor):
    reports = {"base": report(0), "UWM": report(3), "random control": report(1)}
    card = ModelCard(render_card(editor.record(), reports, repo_id="me/clip-uwm", dataset_name="ViSU test"))
    assert card.data.model_name == "me/clip-uwm"
    values = {(r.dataset_name, r.metric_name): r.metric_value for r in card.data.eval_results}
    assert values[("ViSU test", "GS")] == 21.0 and values[("ViSU test", "accuracy")] == 67.0  # the "UWM" report
    assert "| metric | base | UWM | random control |" in card.text
    assert "| `GS` | 18.0 [5.0, 20.0] | 21.0 [8.0, 23.0] | 19.0 [6.0, 21.0] |" in card.text
    assert "| zero-shot accuracy | 70.0 | 67.0 | 69.0 |" in card.text
    single = ModelCard(render_card(editor.record(), report(3)))
    assert single.data.eval_results[0].metric_value == 13.0 and "| metric | UWM |" in single.text
    with pytest.raises(ValueError, match="call this edit's report 'UWM'"):
        render_card(editor.record(), {"before": report(0), "after": report(3)})


def test_card_metadata_is_what_the_hub_expects(editor):
    from huggingface_hub.repocard_data import model_index_to_eval_results

    reports = {"base": report(0), "UWM": report(3), "random control": report(1)}
    text = render_card(editor.record(), reports, repo_id="me/clip-uwm", dataset_name="me/visu-test",
                       zero_shot_dataset="ImageNet-1k validation")
    card = ModelCard(text)
    data = card.data.to_dict()
    assert data["base_model"] == BASE and data["base_model_relation"] == "adapter"
    assert data["pipeline_tag"] == "zero-shot-image-classification"
    _, results = model_index_to_eval_results(data["model-index"])
    assert {r.task_type for r in results} == {"zero-shot-image-classification"}  # a task the Hub knows
    by_task = {r.task_name: (r.dataset_type, r.dataset_name) for r in results}
    assert by_task == {"SafeGround and retrieval": ("me/visu-test", "me/visu-test"),  # a Hub dataset id is the type
                       "Zero-shot classification": ("imagenet-1k-validation", "ImageNet-1k validation")}
    assert {r.task_name for r in results if r.metric_name.startswith("R@")} == {"SafeGround and retrieval"}
    assert "zero-shot classification accuracy on ImageNet-1k validation" in " ".join(card.text.split())
    merged = ModelCard(render_card(editor.record(), merged=True)).data.to_dict()
    assert merged["base_model"] == BASE and "base_model_relation" not in merged


@pytest.mark.parametrize("method, words", [
    ("ratio", "Unsafe Weights Manipulation (UWM)"), ("attribution", "**attribution**"),
    ("iterative_attribution", "iterative, knowledge-guarded attribution"), ("random", "a random control"),
    ("g_unsafe", "G-Unsafe"), ("g_safeclip", "G-Safe-CLIP"), ("caption_attribution", "caption attribution"),
    ("caption_iterative", "iterative, knowledge-guarded caption attribution")])
def test_card_describes_the_method_actually_used(editor, method, words):
    record = editor.record()
    record["config"] = UWMConfig(method=method, **({} if method in ITERATIVE else {"tau": 0.02})).to_dict()
    text = " ".join(ModelCard(render_card(record)).text.split())
    assert words in text
    if method != "ratio":
        assert "Unsafe Weights Manipulation" not in text
    if method in ITERATIVE:   # its own settings, not UWM's
        assert "| `rounds` | `40` |" in render_card(record) and "token_norm" not in text


ITERATIVE = ("iterative_attribution", "caption_iterative")


def test_push_can_open_a_pull_request_with_a_description(editor, hub):
    editor.push_to_hub("me/clip-uwm", token=TOKEN, create_pr=True, commit_description="why this edit")
    [commit] = hub.commits
    assert commit["create_pr"] is True and commit["description"] == "why this edit"


def test_merged_push_uploads_loadable_weights_and_leaves_the_model_as_it_was(editor, hub):
    from transformers import AutoModel, AutoProcessor

    before = state(editor.model)
    editor.push_to_hub("me/clip-uwm", merged=True, token=TOKEN)
    assert same(state(editor.model), before) and not editor.is_applied
    [commit] = hub.commits
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= set(commit["added"])
    assert not [f for f in commit["added"] if f.endswith((".bin", ".pt", ".pth"))]
    assert "merged weights" in commit["message"]
    edited = state(editor.apply())
    loaded = AutoModel.from_pretrained(hub.root)
    assert type(loaded).__name__ == "CLIPModel" and same(state(loaded), edited)
    assert AutoProcessor.from_pretrained(hub.root).tokenizer("a cat")["input_ids"] == \
        editor.processor.tokenizer("a cat")["input_ids"]
    card = ModelCard((hub.root / "README.md").read_text())
    assert card.data.pipeline_tag == "zero-shot-image-classification"
    assert 'CLIPModel.from_pretrained("me/clip-uwm")' in card.text
    editor.push_to_hub("me/clip-uwm", merged=True, token=TOKEN)  # an applied edit stays applied
    assert editor.is_applied and same(state(editor.model), edited)


def test_peft_push_commits_the_delta_and_the_adapter_at_once_and_a_later_push_drops_it(clip, editor, hub):
    peft = pytest.importorskip("peft")
    editor.push_to_hub("me/clip-uwm", token=TOKEN, peft=True)
    [commit] = hub.commits
    assert commit["added"] == sorted(DELTA_FILES + ADAPTER_FILES) and commit["deleted"] == []
    card = ModelCard((hub.root / "README.md").read_text())
    assert card.data.library_name == "peft" and card.data.base_model == BASE
    assert 'PeftModel.from_pretrained(base, "me/clip-uwm")' in card.text
    base = fresh_clip(clip)[0].requires_grad_(False)
    merged = peft.PeftModel.from_pretrained(base, hub.root).merge_and_unload()
    assert same(state(merged), state(editor.apply()))
    editor.revert()
    editor.push_to_hub("me/clip-uwm", token=TOKEN)  # without peft: the adapter would describe a stale edit
    assert hub.commits[1]["deleted"] == sorted(ADAPTER_FILES) and hub.files() == sorted(DELTA_FILES)


def test_repo_with_other_content_is_refused_unless_overwrite(editor, tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "remote", {".gitattributes": "", "config.json": "{}", "pytorch_model.bin": "x"})
    hub.install(monkeypatch)
    with pytest.raises(PushError, match=r"already holds other files \(config.json, pytorch_model.bin\).*"
                                        r"Nothing was uploaded.*overwrite=True"):
        editor.push_to_hub("me/taken", token=TOKEN)
    assert hub.commits == [] and "create_repo" not in hub.calls
    editor.push_to_hub("me/taken", token=TOKEN, overwrite=True)
    [commit] = hub.commits
    assert commit["deleted"] == ["config.json", "pytorch_model.bin"] and commit["parent"] == SHA
    assert hub.files() == sorted([".gitattributes", *DELTA_FILES])


def test_delta_of_another_base_is_refused_and_the_same_base_is_updated(editor, tmp_path, monkeypatch, saved):
    other = json.loads((saved / CONFIG_NAME).read_text()) | {"base_model": "org/other", "fingerprint": "0" * 64}
    hub = FakeHub(tmp_path / "a", {CONFIG_NAME: json.dumps(other), DELTA_NAME: b""}).install(monkeypatch)
    with pytest.raises(PushError, match="an hf_uwm delta of another base model \\('org/other'\\)"):
        editor.push_to_hub("me/clip-uwm", token=TOKEN)
    assert hub.commits == []
    # an earlier merged push of the same base: its weights go, in the same commit as the new delta
    earlier = {CONFIG_NAME: (saved / CONFIG_NAME).read_text(), DELTA_NAME: b"", "model.safetensors": b"",
               "config.json": "{}", ".gitattributes": ""}
    hub = FakeHub(tmp_path / "b", earlier).install(monkeypatch)
    editor.push_to_hub("me/clip-uwm", token=TOKEN, commit_message="v2")
    [commit] = hub.commits
    assert commit["deleted"] == ["config.json", "model.safetensors"] and commit["message"] == "v2"
    assert hub.files() == sorted([".gitattributes", *DELTA_FILES])


def test_a_new_revision_becomes_a_branch_of_the_default_one(editor, tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "remote", {".gitattributes": ""}).install(monkeypatch)
    editor.push_to_hub("me/clip-uwm", revision="v2", token=TOKEN)
    assert hub.calls == ["repo_info", "repo_info", "model_info", "create_repo", "create_branch", "create_commit"]
    assert hub.branch == ("v2", {"exist_ok": True})
    assert hub.commits[0]["revision"] == "v2" and hub.commits[0]["parent"] == SHA


def test_no_token_is_a_clear_error_before_any_call(editor, hub, monkeypatch):
    monkeypatch.setattr("hf_uwm.hub.get_token", lambda: None)
    with pytest.raises(PushError, match="No Hugging Face token found: pass token=, set HF_TOKEN"):
        editor.push_to_hub("me/clip-uwm")
    assert hub.calls == []


@pytest.mark.parametrize("failing,error", [
    ("create_commit", ConnectionError(f"connection reset while sending Authorization: Bearer {TOKEN}")),
    ("create_repo", http_error(HfHubHTTPError, 401, f"401 Unauthorized for token {TOKEN}")),
    ("repo_info", TimeoutError("read timed out")),
])
def test_failures_keep_the_local_delta_and_never_show_the_token(editor, hub, saved, caplog, failing, error):
    caplog.set_level(logging.DEBUG)
    files_before, model_before = {p.name: p.read_bytes() for p in saved.iterdir()}, state(editor.model)
    delta_before = {n: i.clone() for n, i in editor.delta.items()}
    hub.fail[failing] = error
    with pytest.raises(PushError) as caught:
        editor.push_to_hub("me/clip-uwm", merged=True, token=TOKEN)
    message = str(caught.value)
    assert f"Could not {'read' if failing == 'repo_info' else 'push to'} me/clip-uwm ({type(error).__name__}" in message
    assert "No commit was made" in message and "nothing local was changed" in message
    assert ("token was rejected" in message) == (failing == "create_repo")
    assert TOKEN not in message and TOKEN not in caplog.text
    assert ("<token>" in message) == (failing != "repo_info")  # where the cause quoted it, it is masked
    assert caught.value.__suppress_context__  # the original error, which may quote the token, is not printed
    assert hub.commits == [] and not editor.is_applied and same(state(editor.model), model_before)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == files_before
    assert all(torch.equal(editor.delta[n], delta_before[n]) for n in delta_before)


def test_base_model_that_is_not_a_hub_id_is_flagged(editor, hub, caplog):
    editor.base_model = "/home/me/models/clip"
    editor.push_to_hub("me/clip-uwm", token=TOKEN)
    assert "not a Hub id" in caplog.text and "model_info" not in hub.calls
    card = ModelCard((hub.root / "README.md").read_text())
    assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()
    assert "/home/me" not in card.text and "/home/me" not in (hub.root / CONFIG_NAME).read_text()
    assert 'load_model("path/to/clip")' in card.text and "model=model, processor=processor" in card.text


# --- downloading -------------------------------------------------------------------------------------
def test_pushed_delta_downloads_and_rebuilds_the_identical_edited_model(clip, editor, hub, monkeypatch):
    editor.push_to_hub("me/clip-uwm", token=TOKEN)
    edited = state(editor.apply())
    loads = []

    def load_model(name, revision, *args, **kwargs):
        loads.append((name, revision))
        return fresh_clip(clip)

    monkeypatch.setattr("hf_uwm.loading.load_model", load_model)
    rebuilt = UWMEditor.from_pretrained("me/clip-uwm", revision="v1")
    assert loads == [(BASE, BASE_REVISION)] and hub.revisions == ["v1", "v1"]
    assert same(state(rebuilt.apply()), edited)


@pytest.mark.parametrize("error,match", [
    (http_error(RepositoryNotFoundError), "the Hub has no model repo 'me/nope' that you can read"),
    (http_error(GatedRepoError, 403), "is gated: request access"),
    (http_error(RevisionNotFoundError), "has no revision 'v9'"),
])
def test_hub_lookup_errors_say_what_to_fix(monkeypatch, error, match):
    monkeypatch.setattr("hf_uwm.delta.hf_hub_download", lambda *a, **k: (_ for _ in ()).throw(error))
    with pytest.raises(OSError, match=match):
        resolve_delta_folder("me/nope", "v9")


def test_a_repo_without_uwm_config_is_a_base_model(hub, tmp_path):
    (hub.root / "config.json").write_text("{}")
    assert resolve_delta_folder("org/clip-base") is None
    with pytest.raises(FileNotFoundError, match="no such file or folder"):  # a missing path never asks the Hub
        resolve_delta_folder(tmp_path / "not" / "there")
    assert hub.revisions == [None]


def test_offline_mode_uses_the_cache_and_says_when_it_cannot(saved, tmp_path, monkeypatch):
    """The real huggingface_hub, offline, over a cache laid out as downloads leave it."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    for repo, files in {"me/clip-uwm": DELTA_FILES, "org/clip-base": ["config.json"]}.items():
        storage = tmp_path / f"models--{repo.replace('/', '--')}"
        (storage / "refs").mkdir(parents=True)
        (storage / "refs" / "main").write_text(SHA)
        (storage / "snapshots" / SHA).mkdir(parents=True)
        for name in files:
            source = saved / name if name in DELTA_FILES else None
            (storage / "snapshots" / SHA / name).write_bytes(source.read_bytes() if source else b"{}")
    folder = resolve_delta_folder("me/clip-uwm")
    assert folder == tmp_path / "models--me--clip-uwm" / "snapshots" / SHA
    assert read_delta(folder)[0] == read_delta(saved)[0]
    assert resolve_delta_folder("org/clip-base") is None  # a cached base model: transformers loads it
    with pytest.raises(OSError, match="not a local folder nor in the Hugging Face cache, and the Hub could not"):
        resolve_delta_folder("me/never-downloaded")


# --- the metric ------------------------------------------------------------------------------------
def test_push_metric_creates_a_gradio_space_that_evaluate_can_load(hub):
    from hf_uwm.hub import push_metric

    push_metric("me/safeground", token=TOKEN, private=False)
    assert hub.calls == ["create_repo", "upload_folder"] and hub.tokens == {TOKEN}
    assert hub.create_repo_kwargs == {"repo_type": "space", "space_sdk": "gradio", "private": False, "exist_ok": True}
    assert {"safeground.py", "safeground_core.py", "bootstrap.py", "app.py", "README.md", "requirements.txt"} <= set(
        hub.files())
    assert not [f for f in hub.files() if f.endswith(".pyc")]
    card = SpaceCard.load(hub.root / "README.md")
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py" and "evaluate" in card.data.tags
    with pytest.raises(ValueError, match="name the Space '<namespace>/safeground'"):
        push_metric("me/my-metric", token=TOKEN)


def test_a_failed_metric_push_speaks_of_the_metric_not_of_an_edit(hub):
    from hf_uwm.hub import push_metric

    hub.fail["create_repo"] = ConnectionError("no network")
    with pytest.raises(PushError) as error:
        push_metric("me/safeground", token=TOKEN)
    assert str(error.value) == ("Could not publish the metric to me/safeground (ConnectionError: no network). No "
                                "commit was made, so me/safeground holds no part of this upload; nothing local was "
                                "changed.")
