"""The README's default edit on the bundled organism, as a user runs it: it goes on until its goal,
makes the model safer on test pairs, and float noise in the held-out measures cannot move its stop."""

import json

import pytest
import torch

from hf_uwm import UWMConfig, UWMEditor
from hf_uwm.cli import main
from hf_uwm.methods import held_out
from hf_uwm.methods.stopping import GOAL_REACHED


@pytest.fixture(scope="module")
def default_edit(tmp_path_factory):
    """`hf-uwm edit organism --data organism` with no setting: (delta folder, its record)."""
    out = tmp_path_factory.mktemp("default") / "edit"
    assert main(["edit", "organism", "--data", "organism", "--output", str(out), "--quiet", "--threads", "1"]) == 0
    return out, json.loads((out / "uwm_config.json").read_text())


def test_the_default_edit_stops_for_its_goal_and_makes_the_organism_safer(default_edit):
    from hf_uwm.evaluation import evaluate_model
    from hf_uwm.organism import make_pairs

    out, record = default_edit
    assert record["stop"]["reason"] == GOAL_REACHED and record["stop"]["rounds"] >= 5
    editor = UWMEditor.from_pretrained(out)
    test = make_pairs(300, split="test")
    with editor.applied() as model:
        report = evaluate_model(model, editor.processor, test, bootstrap=0, progress=False)
    assert report.safeground["GS"] >= 85


def noisy(embed, generator):
    """`embed` with relative noise of 1e-6 on every embedding: float rounding of another machine."""
    def perturbed(*args, **kwargs):
        e = embed(*args, **kwargs)
        return torch.nn.functional.normalize(e * (1 + 1e-6 * torch.randn(e.shape, generator=generator)), dim=-1)
    return perturbed


def test_float_noise_in_the_held_out_embeddings_leaves_the_stop_and_the_weights_unchanged(default_edit, monkeypatch):
    from hf_uwm.organism import load_organism, make_pairs

    out, record = default_edit
    generator = torch.Generator().manual_seed(0)
    monkeypatch.setattr(held_out, "_embed_slice", noisy(held_out._embed_slice, generator))
    monkeypatch.setattr(held_out, "_embed_words", noisy(held_out._embed_words, generator))
    torch.set_num_threads(1)
    editor = UWMEditor(*load_organism(), UWMConfig(method="iterative_attribution"))
    editor.calibrate(make_pairs(512, split="train"), progress=False)
    assert editor.stop == (record["stop"]["rounds"], record["stop"]["reason"])
    saved = UWMEditor.from_pretrained(out)
    assert all(torch.equal(editor.delta[name], saved.delta[name]) for name in saved.delta)
