"""Distributed, resumable and mixed-precision calibration (issue 6)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import make_clip, make_llava, make_pairs
from hf_uwm import UWMConfig, UWMEditor
from hf_uwm.methods.uwm import RunningScores

SCRIPT = Path(__file__).parent / "scripts" / "distributed_calibrate.py"


def free_port() -> int:
    # A fixed port collides when two test runs share the machine.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(out: Path, config: UWMConfig):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(SCRIPT), str(out), config.to_json_string()]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def read(path):
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# Every method's two-process run: tests/test_methods_common.py. Here: an edit that stops by itself at round 1 of 6.
@pytest.mark.parametrize("config", [UWMConfig(batch_size=2, method="iterative_attribution", rounds=6,
                                              round_density=0.005, curvature_probes=2, goal=50.0,
                                              knowledge_budget=None)],
                         ids=["iterative_attribution_stopping"])
def test_two_processes_match_one_process(tmp_path, config):
    run_two_processes(tmp_path / "run", config)
    ranks = [read(tmp_path / f"run.rank{r}.safetensors") for r in (0, 1)]
    assert ranks[0][1]["processes"] == "2"
    model, processor = make_clip(dtype=torch.float64)
    single = UWMEditor(model, processor, config).calibrate(make_pairs(21, seed=5), progress=False)
    for tensors, meta in ranks:
        # the same held-out measures, and the same round at which the edit stopped
        assert json.loads(meta["stop"]) == (list(single.stop) if single.stop else None)
        assert json.loads(meta["trajectory"]) == [s.to_dict() for s in single.trajectory or []]
        for name, scores in single.scores.items():
            torch.testing.assert_close(tensors[f"score/{name}"], scores, rtol=1e-10, atol=1e-300)
            assert torch.equal(tensors[f"delta/{name}"], single.delta[name])


def test_shards_are_disjoint_uneven_and_cover_every_pair():
    from hf_uwm.methods import Calibration

    class State:
        num_processes = 3

    covered, batches = [], []
    for rank in range(3):
        State.process_index = rank
        bounds = Calibration(list(range(13)), State, family=None, batch_size=2).batch_bounds()
        covered += [row for lo, hi in bounds for row in range(lo, hi)]
        batches += bounds
    assert covered == list(range(13))
    State.num_processes, State.process_index = 1, 0   # the batches one process makes, whole: none split
    assert batches == Calibration(list(range(13)), State, family=None, batch_size=2).batch_bounds()


class Killed(Exception):
    pass


@pytest.mark.parametrize("kill_at", [1, 4, 7])
def test_kill_and_resume_gives_identical_scores(tmp_path, monkeypatch, kill_at):
    model, processor = make_clip(dtype=torch.float64)
    data, cfg = make_pairs(9, seed=6), UWMConfig(batch_size=2)
    reference = UWMEditor(model, processor, cfg).calibrate(data, progress=False).scores

    calls = {"n": 0}
    observe = RunningScores.observe

    def dying_observe(self, *args):
        calls["n"] += 1
        if calls["n"] == kill_at:   # dies in the middle of a batch, after earlier checkpoints
            raise Killed
        return observe(self, *args)

    monkeypatch.setattr(RunningScores, "observe", dying_observe)
    with pytest.raises(Killed):
        UWMEditor(model, processor, cfg).calibrate(data, progress=False, checkpoint_dir=tmp_path, checkpoint_every=2)
    monkeypatch.setattr(RunningScores, "observe", observe)
    resumed = UWMEditor(model, processor, cfg).calibrate(data, progress=False, checkpoint_dir=tmp_path,
                                                         checkpoint_every=2)
    for name in reference:
        assert torch.equal(resumed.scores[name], reference[name])


def test_resume_after_completion_runs_no_forward(tmp_path, monkeypatch):
    model, processor = make_clip()
    data = make_pairs(4)
    first = UWMEditor(model, processor).calibrate(data, progress=False, checkpoint_dir=tmp_path)
    monkeypatch.setattr(RunningScores, "observe", lambda *a: pytest.fail("a finished tower ran again"))
    again = UWMEditor(model, processor).calibrate(data, progress=False, checkpoint_dir=tmp_path)
    assert all(torch.equal(first.scores[n], again.scores[n]) for n in first.scores)


def test_mismatched_checkpoint_is_refused(tmp_path):
    model, processor = make_clip()
    UWMEditor(model, processor).calibrate(make_pairs(4), progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="other data, model weights or settings"):
        UWMEditor(model, processor).calibrate(make_pairs(4, seed=9), progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="other data, model weights or settings"):
        UWMEditor(model, processor, UWMConfig(token_norm="rms")).calibrate(make_pairs(4), progress=False,
                                                                           checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="other data, model weights or settings"):
        UWMEditor(make_clip(seed=2)[0], processor).calibrate(make_pairs(4), progress=False, checkpoint_dir=tmp_path)


def assert_scores_close(low, ref, rtol: dict):
    """Every score (not only the largest) within rtol[tower] of the float32 one, relative to itself."""
    for name, scores in ref.scores.items():
        tower = "text" if name.startswith("text") else "vision"
        error = float(((low.scores[name] - scores).abs() / scores.abs()).max())
        assert error < rtol[tower], (name, error)


def assert_same_delta_where_unambiguous(low, ref, rtol: dict):
    """Identical selections, except weights whose reference score is within 2·rtol of the cut (two
    scores each known to rtol may swap there). The band must leave a good part of every selection
    checked: the random vision tower's scores are near-flat (largest/cut ≈ 1.03-1.05)."""
    for name, scores in ref.scores.items():
        tower = "text" if name.startswith("text") else "vision"
        flat = scores.flatten()
        cut = flat[ref.delta[name]].min()
        ambiguous = (flat - cut).abs() <= 2 * rtol[tower] * cut
        assert (~ambiguous[ref.delta[name]]).double().mean() >= 0.3, name
        differing = set(low.delta[name].tolist()) ^ set(ref.delta[name].tolist())
        assert all(bool(ambiguous[i]) for i in differing), name


def test_bf16_autocast_forward_gives_close_scores_and_the_same_delta():
    data = make_pairs(8, seed=7)
    model, processor = make_clip()
    fp32 = UWMEditor(model, processor).calibrate(data, progress=False)
    bf16 = UWMEditor(model, processor).calibrate(data, progress=False, autocast=torch.bfloat16)
    # Measured on this tiny model, largest error of any score relative to itself: text 9.1e-3,
    # vision 3.1e-3. A bug in the statistics (padding counted, a wrong norm) is off by far more.
    rtol = {"text": 1.5e-2, "vision": 5e-3}
    assert_scores_close(bf16, fp32, rtol)
    assert_same_delta_where_unambiguous(bf16, fp32, rtol)


def test_bf16_weights_give_close_scores_and_share_the_fingerprint():
    data = make_pairs(8, seed=7)
    model, processor = make_clip()
    fp32 = UWMEditor(model, processor).calibrate(data, progress=False)
    bf16 = UWMEditor(model.to(torch.bfloat16), processor).calibrate(data, progress=False)
    # Measured: text 2.4e-2 (its |W| prior is rounded to bfloat16 too), vision 3.2e-3.
    rtol = {"text": 4e-2, "vision": 5e-3}
    assert_scores_close(bf16, fp32, rtol)
    assert_same_delta_where_unambiguous(bf16, fp32, rtol)
    assert bf16.fingerprint == fp32.fingerprint  # a delta applies to either dtype


def test_dataloader_workers_give_identical_scores():
    model, processor = make_clip()
    data = make_pairs(6)
    a = UWMEditor(model, processor, UWMConfig(batch_size=2)).calibrate(data, progress=False)
    b = UWMEditor(model, processor, UWMConfig(batch_size=2)).calibrate(data, progress=False, num_workers=2)
    assert all(torch.equal(a.scores[n], b.scores[n]) for n in a.scores)


def test_text_only_edit_never_runs_the_vision_tower(monkeypatch):
    model, processor = make_clip()
    monkeypatch.setattr(model.vision_model, "forward", lambda *a, **k: pytest.fail("vision tower ran"))
    UWMEditor(model, processor, UWMConfig(vision_targets=[])).calibrate(make_pairs(3), progress=False)


def test_llava_loaded_with_a_device_map_in_bf16_calibrates_its_vision_tower_only(tmp_path, monkeypatch):
    model, processor = make_llava()
    model.save_pretrained(tmp_path / "llava")
    editor = UWMEditor.from_pretrained(tmp_path / "llava", processor=processor, device_map="cpu",
                                       dtype=torch.bfloat16)
    # device_map and dtype reach the model's from_pretrained (one CPU here: nothing to split).
    assert editor.family.dtype == torch.bfloat16 and editor.family.device.type == "cpu"
    monkeypatch.setattr(editor.model.model.language_model, "forward",
                        lambda *a, **k: pytest.fail("the language model ran during calibration"))
    editor.calibrate(make_pairs(4, texts=False), progress=False)
    reference = UWMEditor(model, processor).calibrate(make_pairs(4, texts=False), progress=False)
    for name, scores in reference.scores.items():
        assert (editor.scores[name] - scores).abs().max() <= 0.05 * scores.max()
    assert editor.fingerprint == reference.fingerprint and all(len(d) for d in editor.delta.values())
