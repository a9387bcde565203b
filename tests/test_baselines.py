"""The paper's gradient baselines (G-Unsafe, G-Safe-CLIP) against autograd of the losses written out."""

import math

import pytest
import torch
from torch.nn import functional as F

from conftest import make_clip, make_llava, make_pairs, make_siglip
from hf_uwm import UWMConfig, UWMEditor
from hf_uwm.families import ModelFamily


@pytest.fixture(scope="module")
def data():
    return make_pairs(5, seed=4)


@pytest.fixture(scope="module")
def clip64():
    return make_clip(dtype=torch.float64)


def embeddings(model, processor, data):
    """Ts, Tu, Is, Iu of the whole set, each (N, D), with gradients on whatever requires them."""
    family = ModelFamily(model, processor)
    texts = [family.embed_text(family.text_inputs(data[c])) for c in ("safe_text", "unsafe_text")]
    images = [family.embed_images(family.image_inputs(data[c])) for c in ("safe_image", "unsafe_image")]
    return (*texts, *images)


def hand_gradients(editor, data, losses):
    """|∂L_tower/∂W| for each target layer of each tower, L_tower = losses[tower](Ts, Tu, Is, Iu)."""
    model, processor = editor.model, editor.processor
    assert all(p.requires_grad for p in model.parameters())   # as built, and as the editor left it
    ts, tu, is_, iu = embeddings(model, processor, data)
    expected = {}
    for tower, layers in editor.layers.items():
        grads = torch.autograd.grad(losses[tower](ts, tu, is_, iu), [layer.weight for layer in layers.values()],
                                    retain_graph=True)
        expected.update({name: g.abs() for name, g in zip(layers, grads)})
    return expected


def cos(a, b):
    return F.cosine_similarity(a, b, dim=-1)


@pytest.mark.parametrize("batch_size", [5, 2])  # G-Unsafe is a mean of per-pair terms: batch-independent
def test_g_unsafe_scores_equal_autograd_of_the_stated_loss(clip64, data, batch_size):
    model, processor = clip64
    config = UWMConfig.baseline("g_unsafe", text_targets=["self_attn.out_proj", "mlp.fc1"], batch_size=batch_size)
    editor = UWMEditor(model, processor, config).calibrate(data, progress=False)
    losses = {  # each tower scored by its own loss only; sg = detach
        "text": lambda ts, tu, is_, iu: (-cos(ts, tu.detach()) + cos(ts, is_.detach())).mean(),
        "vision": lambda ts, tu, is_, iu: (-cos(is_, iu.detach()) + cos(is_, ts.detach())).mean(),
    }
    expected = hand_gradients(editor, data, losses)
    assert set(editor.scores) == set(expected) and len(expected) == 9
    for name, score in editor.scores.items():
        torch.testing.assert_close(score, expected[name], rtol=1e-6, atol=1e-12)


def safeclip_loss(model):
    scale = model.logit_scale.detach().exp()

    def info_nce(queries, keys):
        return F.cross_entropy(scale * queries @ keys.T, torch.arange(len(queries)))

    def loss(ts, tu, is_, iu):
        tu, iu = tu.detach(), iu.detach()
        return (info_nce(ts, iu) + info_nce(is_, tu)
                + (1 - cos(ts, tu)).mean() + (1 - cos(is_, iu)).mean())
    return loss


def test_g_safeclip_scores_equal_autograd_of_the_stated_loss(clip64, data):
    model, processor = clip64
    assert model.logit_scale.exp() > 10   # CLIP's init, 1/0.07: far from 1, so a wrong temperature shows
    editor = UWMEditor(model, processor, UWMConfig.baseline("g_safeclip", batch_size=5)).calibrate(data, progress=False)
    loss = safeclip_loss(model)
    expected = hand_gradients(editor, data, {"text": loss, "vision": loss})
    for name, score in editor.scores.items():
        torch.testing.assert_close(score, expected[name], rtol=1e-6, atol=1e-12)
    # InfoNCE's negatives are the batch: smaller batches give other scores (documented).
    halves = UWMEditor(model, processor, UWMConfig.baseline("g_safeclip", batch_size=2)).calibrate(data, progress=False)
    assert not torch.allclose(halves.scores[name], editor.scores[name])


def test_baseline_config_prunes_a_fixed_sparsity():
    config = UWMConfig.baseline("g_safeclip", sparsity=0.05, vision_targets=[])
    assert (config.method, config.selection, config.density, config.alpha) == ("g_safeclip", "fixed", 0.05, 0.0)
    assert config.vision_targets == [] and UWMConfig.from_json_string(config.to_json_string()) == config
    assert UWMConfig.baseline("g_unsafe").density == 0.02
    with pytest.raises(ValueError, match="g_unsafe"):
        UWMConfig.baseline("ratio")
    with pytest.raises(ValueError, match="alpha"):
        UWMConfig.baseline("g_unsafe", alpha=-1.0)
    with pytest.raises(ValueError, match="density"):
        UWMConfig.baseline("g_unsafe", sparsity=0.0)


def test_requires_grad_flags_and_grads_are_restored(data):
    model, processor = make_clip()
    model.requires_grad_(False)
    model.logit_scale.requires_grad_(True)
    model.logit_scale.grad = torch.ones(())
    editor = UWMEditor(model, processor, UWMConfig.baseline("g_unsafe"))
    layer = next(iter(editor.target_layers.values()))
    layer.weight.grad = torch.full_like(layer.weight, 3.0)   # e.g. grads of a training step in progress
    flags = [p.requires_grad for p in model.parameters()]
    editor.calibrate(data, progress=False)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(model.logit_scale.grad, torch.ones(()))
    assert torch.equal(layer.weight.grad, torch.full_like(layer.weight, 3.0))
    assert all(other.weight.grad is None for other in editor.target_layers.values() if other is not layer)


@pytest.mark.parametrize("score", ["g_unsafe", "g_safeclip"])
def test_saved_baseline_delta_prunes_like_any_other(data, tmp_path, score):
    model, processor = make_clip()
    editor = UWMEditor(model, processor, UWMConfig.baseline(score, sparsity=0.05)).calibrate(data, progress=False)
    for name, idx in editor.delta.items():
        weight = editor.target_layers[name].weight
        assert idx.numel() == math.ceil(0.05 * weight.numel())
        assert torch.equal(idx, torch.sort(editor.scores[name].flatten().topk(idx.numel()).indices).values)
    editor.save_pretrained(tmp_path / "delta")
    original = {name: layer.weight.detach().clone() for name, layer in editor.target_layers.items()}
    loaded = UWMEditor.from_pretrained(tmp_path / "delta", model=model, processor=processor)
    assert loaded.config == editor.config and all(torch.equal(loaded.delta[n], editor.delta[n]) for n in editor.delta)
    loaded.apply()
    for name, layer in loaded.target_layers.items():
        flat, idx = layer.weight.detach().view(-1), loaded.delta[name]
        assert torch.all(flat[idx] == 0)
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep[idx] = False
        assert torch.equal(flat[keep], original[name].view(-1)[keep])
    loaded.revert()
    assert all(torch.equal(layer.weight, original[name]) for name, layer in loaded.target_layers.items())


def test_g_safeclip_on_siglip_equals_autograd_of_the_stated_loss(data):
    model, processor = make_siglip(dtype=torch.float64)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))  # SigLIP's random init is near 0: make a wrong temperature show
    editor = UWMEditor(model, processor, UWMConfig.baseline("g_safeclip", batch_size=5)).calibrate(data, progress=False)
    loss = safeclip_loss(model)
    expected = hand_gradients(editor, data, {"text": loss, "vision": loss})
    assert set(editor.scores) == set(expected) and len(expected) == 6
    for name, scores in editor.scores.items():
        torch.testing.assert_close(scores, expected[name], rtol=1e-6, atol=1e-12)


def test_baselines_refuse_a_model_without_text_tower(data):
    model, processor = make_llava()
    with pytest.raises(ValueError, match="edits clip/siglip models, not LlavaForConditionalGeneration: use method=.caption_attribution."):
        UWMEditor(model, processor, UWMConfig.baseline("g_unsafe")).calibrate(data, progress=False)
