"""The GPU check's CPU mode, calibration without `datasets`, and the GPU costs it guards against."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_clip, make_pairs
from hf_uwm import UWMConfig, UWMEditor
from hf_uwm.families import ModelFamily
from hf_uwm.data import PreprocessedPairs
from hf_uwm.delta import fingerprint, fingerprint_in_background
from hf_uwm.methods.uwm import RunningScores

ROOT = Path(__file__).resolve().parents[1]
# Runs code with the packages a bare GPU machine lacks made unimportable.
BLOCKED = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("datasets", "evaluate", "dill", "multiprocess"):
            raise ImportError(f"{name} is blocked: the GPU machine does not have it")
sys.meta_path.insert(0, Blocker())
"""


def run_blocked(code: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", BLOCKED + code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)


def test_editor_imports_without_datasets_or_evaluate(tmp_path):
    done = run_blocked("from hf_uwm import UWMConfig, UWMEditor\nimport hf_uwm.data, hf_uwm.methods.uwm\n"
                       "UWMEditor.calibrate\nprint('imported')\n"
                       "try:\n    import datasets\nexcept ImportError:\n    print('datasets blocked')", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["imported", "datasets", "blocked"]


def test_cpu_mode_of_the_gpu_check_runs_without_datasets(tmp_path):
    out = tmp_path / "check.json"
    code = (f"import runpy, sys, torch\ntorch.set_num_threads(1)\n"
            f"sys.argv = ['gpu_check.py', '--device', 'cpu', '--tiny', '--pairs', '8', '--budget', '3000',\n"
            f"            '--out', {str(out)!r}]\n"
            f"runpy.run_path({str(ROOT / 'scripts' / 'gpu_check.py')!r}, run_name='__main__')")
    done = run_blocked(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [(c["pairs"], c["dtype"]) for c in report["cases"]] == [(8, "bf16"), (8, "fp32")]
    for case in report["cases"]:
        for phase in ("plain", "calibrate", "literal", "iterative"):
            assert case[phase].get("seconds", 0) > 0 and len(case[phase]["runs"]) == 3, (phase, case[phase])
        assert set(case["fixed"]) == {"fingerprint", "selection", "scores_to_cpu", "indices_to_cpu"}
        assert case["literal"]["max_rel_diff_vs_calibrate"] < 1e-4     # the baseline computes the same scores
        assert case["literal"]["max_rel_diff_vs_float64_literal"] < 1e-4
        assert case["ratios"]["calibrate_vs_plain"] > 0
    assert "| tiny | 8 | bf16 |" in done.stdout and "calib/plain" in done.stdout


def _preprocessed(editor, data) -> PreprocessedPairs:
    """The pairs as model inputs, texts padded to one length across safe and unsafe items."""
    n = len(data)
    text = editor.family.preprocess_text(list(data["safe_text"]) + list(data["unsafe_text"]))
    images = editor.family.preprocess_images(list(data["safe_image"]) + list(data["unsafe_image"]))
    side = lambda rows: {"text": {k: v[rows] for k, v in text.items()},  # noqa: E731
                         "vision": {k: v[rows] for k, v in images.items()}}
    return PreprocessedPairs(side(slice(0, n)), side(slice(n, 2 * n)))


def test_preprocessed_pairs_give_the_scores_of_the_dataset():
    model, processor = make_clip(dtype=torch.float64)
    data = make_pairs(5, seed=4)
    config = UWMConfig(batch_size=2, text_targets=["self_attn.out_proj", "mlp.fc1"])
    expected = UWMEditor(model, processor, config).calibrate(data, progress=False)
    editor = UWMEditor(model, None, config)
    got = editor.calibrate(_preprocessed(expected, data), progress=False)
    assert set(got.scores) == set(expected.scores)
    for name, scores in expected.scores.items():
        torch.testing.assert_close(got.scores[name], scores, rtol=1e-10, atol=0)
    assert got.fingerprint == expected.fingerprint == fingerprint(editor.target_layers)


def test_preprocessed_pairs_refuse_bad_inputs():
    model, processor = make_clip()
    pixels = torch.zeros(3, 3, 32, 32)
    with pytest.raises(ValueError, match="one shape"):
        PreprocessedPairs({"vision": {"pixel_values": pixels}}, {"vision": {"pixel_values": pixels[:, :, :8]}})
    with pytest.raises(TypeError, match="same towers"):
        PreprocessedPairs({"vision": {"pixel_values": pixels}}, {"text": {"input_ids": pixels}})
    images_only = PreprocessedPairs({"vision": {"pixel_values": pixels}}, {"vision": {"pixel_values": pixels}})
    with pytest.raises(ValueError, match=r"lack inputs for column\(s\) \['safe_text', 'unsafe_text'\]"):
        UWMEditor(model, processor).calibrate(images_only, progress=False)


HOST_READS = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "cpu", "numpy")


def test_statistics_read_the_device_once_per_batch(monkeypatch):
    """On a GPU every read of a tensor's value by the host waits for all queued work: the hooks
    may read once per batch (the non-finite flag), not once per layer."""
    model, processor = make_clip()
    family = ModelFamily(model, processor)
    layers = family.target_layers("text", ["self_attn.q_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"])
    inputs = family.text_inputs(["a cat", "a dog on a street", "a bloody cat", "a dog with a knife on a street"])
    reads = []
    for method in HOST_READS:
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method,
                            lambda self, *a, _original=original, _name=method, **k: (reads.append(_name),
                                                                                     _original(self, *a, **k))[1])

    def count(run):
        reads.clear()
        run()
        return list(reads)

    with torch.no_grad():
        plain = count(lambda: family.run_tower("text", inputs))
    running = RunningScores(layers, "difference", "l2", 1e-8)                 # two terms per layer
    with running.hooked():
        hooked = count(lambda: running.observe(lambda x: family.run_tower("text", x), inputs, [0, 1]))
    assert len(layers) == 12 and len(hooked) - len(plain) == 1, hooked


def test_fingerprint_is_the_sha256_of_the_bfloat16_weights_and_runs_in_the_background():
    model, _ = make_clip()
    layers = ModelFamily(model).target_layers("vision", ["mlp.fc1", "mlp.fc2"])
    digest = hashlib.sha256()
    for name in sorted(layers):
        weight = layers[name].weight.detach().to(torch.bfloat16)
        digest.update(f"{name}:{tuple(weight.shape)}\n".encode())
        digest.update(weight.view(torch.int16).numpy().tobytes())
    assert fingerprint(layers) == fingerprint_in_background(layers).result() == digest.hexdigest()
    with torch.no_grad():
        next(iter(layers.values())).weight[0, 0] += 1
    assert fingerprint_in_background(layers).result() != digest.hexdigest()
