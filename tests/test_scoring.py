"""Scores against a direct implementation that materialises φ per item and per weight (SPEC §2)."""

import pytest
import torch

from conftest import make_clip, make_llava, make_pairs, make_siglip
from hf_uwm import UWMConfig, UWMEditor
from hf_uwm.families import ModelFamily
from hf_uwm.methods.uwm import RunningScores

EPS = 1e-8


def unpadded_text(processor, text):
    """One caption's tokens, no padding at all: its statistics must equal those of the padded batches."""
    tokens = processor.tokenizer([text], return_tensors="pt")
    return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


def item_inputs(model, processor, dataset, tower, layers):
    """Per pair: {layer: (safe z (T, in), unsafe z (T, in))}, each item run alone (no padding)."""
    family, captured = ModelFamily(model, processor), {}
    hooks = [layer.register_forward_hook(lambda m, a, o, n=name: captured.__setitem__(n, a[0][0].detach()))
             for name, layer in layers.items()]
    pairs = []
    try:
        for row in dataset:
            items = []
            for kind in ("safe", "unsafe"):
                if tower == "text":
                    family.run_tower("text", unpadded_text(processor, row[f"{kind}_text"]))
                else:
                    family.run_tower("vision", family.image_inputs([row[f"{kind}_image"]]))
                items.append(dict(captured))
            pairs.append({name: (items[0][name], items[1][name]) for name in layers})
    finally:
        for h in hooks:
            h.remove()
    return pairs


def phi(z, weight, token_norm):
    """φ_ij = a_i · c_j / (σ_j + ε), literally, as an (out, in) matrix."""
    T = z.shape[0]
    n = torch.stack([torch.sqrt(sum(z[t, j] ** 2 for t in range(T))) for j in range(z.shape[1])])
    if token_norm == "rms":
        n = n / T ** 0.5
    sigma = z.std(0, unbiased=True) if T > 1 else torch.zeros(z.shape[1], dtype=z.dtype)
    absw = weight.abs()
    m = absw.mean(0)
    a = torch.stack([(n * absw[i]).mean() for i in range(absw.shape[0])])
    c = n * m
    return a[:, None] * c[None, :] / (sigma[None, :] + EPS)


def naive_scores(pairs, layers, score, prior, token_norm):
    out = {}
    for name, layer in layers.items():
        w = layer.weight.detach()
        terms = []
        for p in pairs:
            phi_s, phi_u = phi(p[name][0], w, token_norm), phi(p[name][1], w, token_norm)
            terms.append({"ratio": phi_u / phi_s, "unsafe": phi_u, "difference": phi_u - phi_s}[score])
        s = torch.stack(terms).mean(0)
        if score == "difference":
            s = s.clamp(min=0)
        out[name] = s * w.abs() if prior else s
    return out


@pytest.mark.parametrize("score", ["ratio", "unsafe", "difference"])
@pytest.mark.parametrize("prior", [True, False])
@pytest.mark.parametrize("tower", ["text", "vision"])
def test_scores_match_literal_formula(score, prior, tower):
    model, processor = make_clip(dtype=torch.float64)
    data = make_pairs(5, seed=1)
    targets = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.out_proj", "mlp.fc1"]  # q, k: one input
    cfg = UWMConfig(method=score, text_prior=prior, vision_prior=prior, batch_size=2,
                    text_targets=targets if tower == "text" else [],
                    vision_targets=targets if tower == "vision" else [])
    editor = UWMEditor(model, processor, cfg).calibrate(data, progress=False)
    layers = editor.layers[tower]
    expected = naive_scores(item_inputs(model, processor, data, tower, layers), layers, score, prior, "l2")
    assert set(editor.scores) == set(expected)
    for name in layers:
        torch.testing.assert_close(editor.scores[name], expected[name], rtol=1e-6, atol=0)


@pytest.mark.parametrize("make_model", [make_clip, make_siglip, make_llava], ids=["clip", "siglip", "llava"])
def test_default_config_scores_match_literal_formula(make_model):
    # The family defaults as a user gets them: default targets, the |W| prior on the text tower only.
    model, processor = make_model(dtype=torch.float64)
    llava = make_model is make_llava
    data = make_pairs(3, seed=1, texts=not llava)
    editor = UWMEditor(model, processor, UWMConfig(batch_size=2)).calibrate(data, progress=False)
    assert editor.towers == (("vision",) if llava else ("text", "vision"))
    for tower, layers in editor.layers.items():
        expected = naive_scores(item_inputs(model, processor, data, tower, layers), layers, "ratio",
                                tower == "text", "l2")
        for name in layers:
            torch.testing.assert_close(editor.scores[name], expected[name], rtol=1e-6, atol=0)


def test_rms_token_norm_matches_literal_formula():
    model, processor = make_clip(dtype=torch.float64)
    data = make_pairs(4, seed=2)
    cfg = UWMConfig(token_norm="rms", vision_targets=[], batch_size=4)
    editor = UWMEditor(model, processor, cfg).calibrate(data, progress=False)
    layers = editor.layers["text"]
    expected = naive_scores(item_inputs(model, processor, data, "text", layers), layers, "ratio", True, "rms")
    for name in layers:
        torch.testing.assert_close(editor.scores[name], expected[name], rtol=1e-6, atol=0)
    l2 = UWMEditor(model, processor, UWMConfig(vision_targets=[])).calibrate(data, progress=False)
    assert not torch.allclose(l2.scores[name], editor.scores[name])


def test_attribution_matches_autograd_of_the_margin():
    model, processor = make_clip(dtype=torch.float64)
    data = make_pairs(4, seed=3)
    model.requires_grad_(False)
    model.logit_scale.requires_grad_(True)
    editor = UWMEditor(model, processor, UWMConfig(method="attribution", batch_size=3)).calibrate(data, progress=False)
    flags_after = [p.requires_grad for p in model.parameters()]
    family, layers = ModelFamily(model, processor), editor.target_layers
    weights = [layer.weight for layer in layers.values()]
    for w in weights:
        w.requires_grad_(True)
    ts, tu = (family.embed_text(family.text_inputs(data[c])) for c in ("safe_text", "unsafe_text"))
    is_, iu = (family.embed_images(family.image_inputs(data[c])) for c in ("safe_image", "unsafe_image"))
    s = lambda t, i: (t * i).sum(-1)  # noqa: E731
    margin = ((s(tu, iu) - s(tu, is_)) + (s(tu, iu) - s(ts, iu))).mean()
    grads = torch.autograd.grad(margin, weights)
    for (name, layer), g in zip(layers.items(), grads):
        torch.testing.assert_close(editor.scores[name], (layer.weight.detach() * g).clamp(min=0), rtol=1e-6, atol=1e-12)
    assert flags_after == [p is model.logit_scale for p in model.parameters()]  # restored
    assert all(layer.weight.grad is None for layer in editor.target_layers.values())


def test_layers_sharing_an_input_see_its_in_place_changes():
    # Statistics are computed once per input tensor (q, k, v share one); an in-place change between
    # two layers must still be seen by the second.
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)

        def forward(self, x):
            self.a(x)
            x.mul_(2)
            return self.b(x)

    torch.manual_seed(0)
    model, x = Twice(), torch.rand(6, 5, 4) + 0.1                    # 3 pairs of 5-token items
    shared = RunningScores({"a": model.a, "b": model.b}, "unsafe", "l2", 1e-6)
    alone = RunningScores({"b": model.b}, "unsafe", "l2", 1e-6)
    with shared.hooked():
        shared.observe(lambda inputs: model(inputs["x"]), {"x": x.clone()}, rows=[0, 1, 2])
    with alone.hooked():
        alone.observe(lambda inputs: model.b(inputs["x"]), {"x": 2 * x}, rows=[0, 1, 2])
    torch.testing.assert_close(shared.sums["b"], alone.sums["b"], rtol=1e-12, atol=0)


def test_statistics_are_float32_under_an_autocast_forward():
    # The layer's input is what the hook sees; the forward's autocast must not reach its matmuls.
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(8, 4), torch.rand(6, 5, 8) + 0.1
    sums = []
    for enabled in (False, True):
        running = RunningScores({"layer": layer}, "ratio", "l2", 1e-6)
        with running.hooked(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            running.observe(lambda inputs: layer(inputs["x"]), {"x": x}, rows=[0, 1, 2])
        sums.append(running.sums["layer"])
    torch.testing.assert_close(sums[1], sums[0], rtol=1e-12, atol=0)


def test_zero_safe_activation_is_clamped_at_eps():
    # An all-zero safe input has n = σ = 0 and a = 0; the denominators aˢ_i and nˢ_j are clamped at
    # ε, so ρ_ij = (aᵘ_i / ε) · (nᵘ_j / (σᵘ_j + ε)) · ((0 + ε) / ε): large, but finite.
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2).double()
    safe, unsafe = torch.zeros(1, 4, 3, dtype=torch.float64), torch.rand(1, 4, 3, dtype=torch.float64) + 0.5
    running = RunningScores({"layer": layer}, "ratio", "l2", EPS)
    with running.hooked():
        running.observe(lambda inputs: layer(inputs["x"]), {"x": torch.cat([safe, unsafe])}, rows=[0])
    n_u, sd_u, abs_w = unsafe[0].norm(dim=0), unsafe[0].std(0), layer.weight.detach().abs()
    a_u = (n_u * abs_w).mean(1)
    expected = (a_u / EPS)[:, None] * (n_u / (sd_u + EPS))[None, :]
    torch.testing.assert_close(running.sums["layer"], expected, rtol=1e-12, atol=0)
