"""Deltas and configs written by earlier versions load, apply, revert and calibrate as they did."""

import hashlib
import json

import pytest
import torch

from conftest import FIXTURES
from hf_uwm import UWMConfig, UWMEditor

LEGACY = FIXTURES / "legacy_deltas"
EXPECTED = json.loads((LEGACY / "expected.json").read_text())


def _sha256(layers: dict) -> str:
    digest = hashlib.sha256()
    for name, layer in sorted(layers.items()):
        digest.update(name.encode())
        digest.update(layer.weight.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_delta_of_the_old_format_applies_and_reverts_bit_for_bit(name):
    record = json.loads((LEGACY / name / "uwm_config.json").read_text())
    assert record["config"]["score"] == name and "method" not in record["config"]   # the old format indeed
    editor = UWMEditor.from_pretrained(LEGACY / name)
    assert editor.config.method == name
    assert editor.counts() == EXPECTED[name]["counts"]
    assert list(editor.stop or []) == (EXPECTED[name]["stop"] or [])
    before = {n: layer.weight.detach().clone() for n, layer in editor.target_layers.items()}
    with editor.applied():
        assert _sha256(editor.target_layers) == EXPECTED[name]["applied_sha256"]
    for n, layer in editor.target_layers.items():
        assert torch.equal(layer.weight, before[n])


def test_an_old_config_keeps_its_own_settings_and_drops_the_other_methods():
    old = json.loads((LEGACY / "iterative_attribution" / "uwm_config.json").read_text())["config"]
    config = UWMConfig.from_dict(old)
    assert config.method == "iterative_attribution" and config.rounds == old["rounds"] == 3
    assert "tau" not in config.to_dict() and "score" not in config.to_dict()
    assert UWMConfig.from_dict(config.to_dict()) == config   # and it saves in the new format


def test_a_new_config_refuses_fields_of_another_method():
    with pytest.raises(ValueError, match="tau"):
        UWMConfig.from_dict({"method": "iterative_attribution", "tau": 0.02})
    with pytest.raises(ValueError, match="score"):
        UWMConfig(method="ratio", score="attribution")


def test_a_config_saved_before_the_curvature_estimator_calibrates_as_it_did():
    """Saved without `curvature_estimator` (before per-item squares): the summed estimator and eight
    probes it had, so calibrating it again reproduces it; a config saved now keeps per_item."""
    old = json.loads((LEGACY / "iterative_attribution" / "uwm_config.json").read_text())["config"]
    assert "curvature_estimator" not in old
    config = UWMConfig.from_dict(old)
    assert (config.curvature_estimator, config.curvature_probes) == ("summed", 8)
    for method in ("iterative_attribution", "caption_iterative"):
        new = UWMConfig(method=method)
        saved_before = {k: v for k, v in new.to_dict().items() if k != "curvature_estimator"}
        assert UWMConfig.from_dict({**saved_before, "method": method}).curvature_estimator == "summed"
        assert UWMConfig.from_dict({"method": method, "rounds": 3}).curvature_estimator == "per_item"   # by hand
        assert (new.curvature_estimator, new.curvature_probes) == ("per_item", 1)
        assert UWMConfig.from_dict(new.to_dict()) == new


def test_a_caption_config_saved_before_the_knowledge_terms_calibrates_as_it_did():
    """Saved whole without `knowledge_curvature` and `safe_likelihood_weight`: the reference tokens'
    curvature and no likelihood term, as then; its other saved settings (λ = 16...) are its own."""
    new = UWMConfig(method="caption_iterative")
    assert (new.knowledge_curvature, new.safe_likelihood_weight) == ("vocabulary", 12.0)
    old = {**{k: v for k, v in new.to_dict().items() if k not in ("knowledge_curvature", "safe_likelihood_weight")},
           "curvature_weight": 16.0, "round_density": 0.0005, "curvature_estimator": "summed", "curvature_probes": 8}
    config = UWMConfig.from_dict(old)
    assert (config.knowledge_curvature, config.safe_likelihood_weight) == ("reference", 0.0)
    assert (config.curvature_weight, config.curvature_estimator, config.curvature_probes) == (16.0, "summed", 8)
    by_hand = UWMConfig.from_dict({"method": "caption_iterative", "rounds": 3})   # not whole: today's defaults
    assert (by_hand.knowledge_curvature, by_hand.safe_likelihood_weight) == ("vocabulary", 12.0)
