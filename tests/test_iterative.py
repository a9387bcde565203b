"""Iterative, knowledge-guarded attribution against a direct implementation with autograd."""

import math
import statistics

import pytest
import torch

from conftest import make_clip, make_llava, make_pairs, make_siglip
from hf_uwm import UWMConfig, UWMEditor
from hf_uwm.families import ModelFamily
from hf_uwm.methods import Calibration
from hf_uwm.methods.iterative import IterativeAttribution, margin_and_curvature
from hf_uwm.methods.rounds import probe_directions

FC2 = dict(text_targets=["mlp.fc2"], vision_targets=[])


@pytest.fixture(scope="module")
def clip64():
    return make_clip(dtype=torch.float64)


@pytest.fixture(scope="module")
def data():
    return make_pairs(5, seed=8)


def iterative(**settings):
    """The method with every round run (no held-out slice, no stopping rule), as its definition."""
    return UWMConfig(method="iterative_attribution", **{"goal": None, "knowledge_budget": None, "holdout": 0,
                                                      **settings})


def state_of(model):
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def assert_same_state(model, before):
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())


# --- the definition, written out ------------------------------------------------------------------
def embeddings(family, data):
    ts, tu = (family.embed_text(family.text_inputs(data[c])) for c in ("safe_text", "unsafe_text"))
    is_, iu = (family.embed_images(family.image_inputs(data[c])) for c in ("safe_image", "unsafe_image"))
    return ts, tu, is_, iu


def hand_margin(ts, tu, is_, iu):
    s = lambda t, i: (t * i).sum(-1)  # noqa: E731
    return (2 * s(tu, iu) - s(tu, is_) - s(ts, iu)).mean()


def hand_curvature(safe, weights, directions, estimator):
    """G per layer from probes (P, N, D): each caption's probe gradient squared (per_item), or the
    probe gradient of all captions together squared (summed); averaged over the probes."""
    if estimator == "summed":
        grads = [torch.autograd.grad((d.to(safe) * safe).sum(), weights, retain_graph=True) for d in directions]
    else:
        grads = [torch.autograd.grad((d[b].to(safe) * safe[b]).sum(), weights, retain_graph=True)
                 for d in directions for b in range(safe.shape[0])]
    return [sum(g[i].square() for g in grads) / len(directions) for i in range(len(weights))]


def hand_rounds(model, processor, data, cfg):
    """Each round on the whole set at once, on a model edited in place; returns the round of each weight."""
    family = ModelFamily(model, processor)
    layers = family.target_layers("text", cfg.text_targets)
    weights = [layer.weight for layer in layers.values()]
    flipped = [torch.zeros(w.shape, dtype=torch.int32) for w in weights]
    original = [w.detach().clone() for w in weights]
    n = sum(w.numel() for w in weights)
    for r in range(1, cfg.rounds + 1):
        g = torch.autograd.grad(hand_margin(*embeddings(family, data)), weights)
        safe = family.embed_text(family.text_inputs(data["safe_text"]))              # (N, D)
        directions = probe_directions(cfg.seed, r, list(range(len(data))), cfg.curvature_probes, safe.shape[1])
        G = hand_curvature(safe, weights, directions, cfg.curvature_estimator)
        a = [w.detach() * gi for w, gi in zip(weights, g)]
        h = [(1 - cfg.alpha) ** 2 * w.detach() ** 2 * Gi for w, Gi in zip(weights, G)]
        a_mean = sum(x.abs().sum() for x in a) / n
        h_mean = sum(x.sum() for x in h) / n
        score = torch.cat([(ai / a_mean - cfg.curvature_weight * hi / h_mean).flatten() for ai, hi in zip(a, h)])
        score[torch.cat([f.flatten() for f in flipped]) > 0] = -math.inf
        top = torch.topk(score, math.ceil(cfg.round_density * n)).indices
        start = 0
        for w, f in zip(weights, flipped):
            mine = top[(top >= start) & (top < start + w.numel())] - start
            f.view(-1)[mine] = r
            with torch.no_grad():
                w.view(-1)[mine] *= cfg.alpha
            start += w.numel()
    with torch.no_grad():
        for w, o in zip(weights, original):
            w.copy_(o)
    return dict(zip(layers, flipped))


@pytest.mark.parametrize("estimator", ["per_item", "summed"])
def test_rounds_equal_the_definition_on_the_edited_model(clip64, data, estimator):
    model, processor = clip64
    cfg = iterative(rounds=3, round_density=0.01, curvature_weight=4.0, curvature_probes=3, batch_size=2, seed=5,
                    alpha=-0.5, curvature_estimator=estimator)
    before = state_of(model)
    editor = UWMEditor(model, processor, cfg).calibrate(data, progress=False)
    assert_same_state(model, before)          # every round's edit is undone
    expected = hand_rounds(model, processor, data, editor.config)
    for name, rounds in expected.items():
        assert torch.equal(editor.scores[name], rounds), name
    per_round = math.ceil(0.01 * sum(s.numel() for s in expected.values()))
    assert sum(len(idx) for idx in editor.delta.values()) == 3 * per_round


def test_one_round_without_curvature_is_attribution_with_a_shared_budget(clip64, data):
    model, processor = clip64
    once = UWMEditor(model, processor, iterative(rounds=1, round_density=0.02, curvature_weight=0.0))
    once.calibrate(data, progress=False)
    plain = UWMEditor(model, processor, UWMConfig(method="attribution", selection="fixed", density=0.02,
                                                  shared_budget=True, **FC2)).calibrate(data, progress=False)
    assert once.config.text_targets == ["mlp.fc2"] and once.config.vision_targets == []
    assert once.delta.keys() == plain.delta.keys()
    assert all(torch.equal(once.delta[name], plain.delta[name]) for name in plain.delta)
    # The shared budget is one ranking: layers get unequal shares (per layer, each would get 2%).
    sizes = {len(idx) for idx in plain.delta.values()}
    assert len(sizes) > 1 and sum(map(len, plain.delta.values())) == math.ceil(0.02 * 3 * 32 * 48)


def test_margin_gradient_equals_autograd(clip64, data):
    model, processor = clip64
    editor = UWMEditor(model, processor, iterative(curvature_weight=0.0, batch_size=2))
    run = Calibration(data, _OneProcess, editor.family, 2, progress=False)
    grads, curvature = margin_and_curvature(editor, run, 1)
    weights = [layer.weight for layer in editor.target_layers.values()]
    expected = torch.autograd.grad(hand_margin(*embeddings(editor.family, data)), weights)
    assert curvature is None
    for (name, g), e in zip(grads.items(), expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-15)


class _OneProcess:
    num_processes, process_index, is_main_process = 1, 0, True


def jacobian(editor, texts):
    """∂T_bk/∂W for every caption b and coordinate k: per layer (N·D, out·in)."""
    weights = [layer.weight for layer in editor.target_layers.values()]
    safe = editor.family.embed_text(editor.family.text_inputs(texts))               # (N, D)
    rows = [torch.autograd.grad(safe[b, k], weights, retain_graph=True)
            for b in range(safe.shape[0]) for k in range(safe.shape[1])]
    return [torch.stack([row[i].flatten() for row in rows]) for i in range(len(weights))], safe.shape


@pytest.mark.parametrize("estimator", ["per_item", "summed"])
def test_curvature_estimate_is_the_probe_average_of_its_definition(clip64, estimator):
    model, processor = clip64
    data = make_pairs(3, seed=9)
    probes = 6
    editor = UWMEditor(model, processor, iterative(curvature_probes=probes, batch_size=2, seed=3,
                                                   curvature_estimator=estimator))
    run = Calibration(data, _OneProcess, editor.family, 2, progress=False)
    _, estimate = margin_and_curvature(editor, run, 4)
    jacobians, (n, d) = jacobian(editor, data["safe_text"])
    # With the probes of round 4 r (P, N, D) and J_bk = ∂T_bk/∂W, over both batches:
    # per_item (1/P) Σ_p Σ_b (Σ_k r_pbk J_bk)², summed (1/P) Σ_p (Σ_bk r_pbk J_bk)².
    directions = probe_directions(3, 4, [0, 1, 2], probes, d).double()
    for (name, G), J in zip(estimate.items(), jacobians):
        per_caption = torch.einsum("pbk,bkw->pbw", directions, J.reshape(n, d, -1))        # (P, N, out·in)
        expected = (per_caption.square().sum(1) if estimator == "per_item" else per_caption.sum(1).square()).mean(0)
        torch.testing.assert_close(G.flatten(), expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("estimator", ["per_item", "summed"])
def test_curvature_estimate_converges_to_the_gauss_newton_diagonal(clip64, estimator):
    """Standard normal probes: with many, both reach E = Σ_bk J_bk² (the exact Gauss-Newton diagonal),
    relative error about sqrt(2/P) per weight; a wrong probe law (non-zero mean, other variance) or a
    square taken inside the sum over coordinates misses by far more."""
    model, processor = clip64
    data = make_pairs(3, seed=9)
    editor = UWMEditor(model, processor, iterative(curvature_probes=300, batch_size=2, seed=3,
                                                   curvature_estimator=estimator))
    _, estimate = margin_and_curvature(editor, Calibration(data, _OneProcess, editor.family, 2, progress=False), 1)
    jacobians, _ = jacobian(editor, data["safe_text"])
    for G, J in zip(estimate.values(), jacobians):
        exact = J.square().sum(0)
        assert float((G.flatten() - exact).norm() / exact.norm()) < 0.15


def test_one_probe_per_caption_estimates_the_curvature_better_than_one_summed_probe(clip64):
    """Squared per caption, one probe leaves only each caption's own noise; summed over the captions
    first, the cross terms of one probe stay. Over many draws, per_item misses by less."""
    model, processor = clip64
    data = make_pairs(8, seed=4)
    editor = UWMEditor(model, processor, iterative(batch_size=4))
    jacobians, _ = jacobian(editor, data["safe_text"])
    exact = torch.cat([J.square().sum(0) for J in jacobians])
    errors = {}
    for estimator in ("per_item", "summed"):
        editor = UWMEditor(model, processor, iterative(batch_size=4, curvature_probes=1, curvature_estimator=estimator))
        run = Calibration(data, _OneProcess, editor.family, 4, progress=False)
        errors[estimator] = statistics.median(
            float((torch.cat([G.flatten() for G in margin_and_curvature(editor, run, r)[1].values()]) - exact).norm()
                  / exact.norm()) for r in range(1, 9))
    assert errors["per_item"] < 0.6 * errors["summed"], errors


def test_item_gradients_of_a_layer_called_twice_sum_the_calls_before_the_square():
    """A target layer run twice in one forward (a shared module): item b's gradient is the sum over
    its calls of δ_bᵀ x_b, over every position of the item (here a 2-d grid of positions)."""
    from hf_uwm.methods.rounds import _item_gradient_squares, _summed_gradient

    g = torch.Generator().manual_seed(0)
    calls = [(torch.randn(3, 2, 4, 5, generator=g, dtype=torch.float64),        # x: (b, 2, 4, in)
              torch.randn(3, 2, 4, 6, generator=g, dtype=torch.float64)) for _ in range(2)]   # δ: (b, 2, 4, out)
    per_item = [sum(d[b].reshape(-1, 6).T @ x[b].reshape(-1, 5) for x, d in calls) for b in range(3)]   # (out, in)
    torch.testing.assert_close(_item_gradient_squares(calls, torch.float64), sum(grad.square() for grad in per_item))
    torch.testing.assert_close(_summed_gradient(calls, torch.float64), sum(per_item))


# --- resuming and processes ----------------------------------------------------------------------
class Killed(Exception):
    pass


def test_a_killed_run_resumes_at_its_last_round_with_the_same_result(tmp_path, monkeypatch, clip64, data):
    model, processor = clip64
    cfg, kill_at = iterative(rounds=2, round_density=0.005, curvature_probes=2, batch_size=3), 2
    reference = UWMEditor(model, processor, cfg).calibrate(data, progress=False)
    before = state_of(model)
    rounds_run = []
    original_round = IterativeAttribution.round_scores

    def dying_round(self, editor, run, round_index):
        rounds_run.append(round_index)
        if len(rounds_run) == kill_at:
            raise Killed
        return original_round(self, editor, run, round_index)

    monkeypatch.setattr(IterativeAttribution, "round_scores", dying_round)
    with pytest.raises(Killed):
        UWMEditor(model, processor, cfg).calibrate(data, progress=False, checkpoint_dir=tmp_path)
    assert_same_state(model, before)          # the rounds done before the kill are undone too
    resumed = UWMEditor(model, processor, cfg).calibrate(data, progress=False, checkpoint_dir=tmp_path)
    assert rounds_run == [1, 2, 2]   # restarted at the killed round
    assert_same_state(model, before)
    assert all(torch.equal(resumed.scores[n], reference.scores[n]) for n in reference.scores)
    assert all(torch.equal(resumed.delta[n], reference.delta[n]) for n in reference.delta)


def test_a_finished_checkpoint_extends_to_more_rounds_and_refuses_other_settings(tmp_path, clip64, data):
    model, processor = clip64
    cfg = iterative(rounds=1, round_density=0.005, curvature_probes=2, batch_size=3)
    UWMEditor(model, processor, cfg).calibrate(data, progress=False, checkpoint_dir=tmp_path)
    more = UWMEditor(model, processor, iterative(rounds=2, round_density=0.005, curvature_probes=2, batch_size=3))
    more.calibrate(data, progress=False, checkpoint_dir=tmp_path)
    fresh = UWMEditor(model, processor, more.config).calibrate(data, progress=False)
    assert all(torch.equal(more.scores[n], fresh.scores[n]) for n in fresh.scores)
    with pytest.raises(ValueError, match="other data, model weights or settings"):
        UWMEditor(model, processor, iterative(rounds=1, round_density=0.005, curvature_probes=3, batch_size=3)
                  ).calibrate(data, progress=False, checkpoint_dir=tmp_path)


@pytest.mark.parametrize("limit,passes_preprocessed", [(2**30, 1), (16, 3)])
def test_kept_batches_are_replayed_within_the_memory_limit(monkeypatch, limit, passes_preprocessed):
    import hf_uwm.methods.calibration as calibration

    monkeypatch.setattr(calibration, "KEEP_BYTES", limit)    # 16 bytes: less than the first batch
    calls = []

    def preprocess(rows):
        calls.append(rows)
        return {"x": torch.tensor(rows)}

    run = Calibration(list(range(7)), _OneProcess, family=None, batch_size=3, progress=False)
    passes = [[(i, rows, inputs["x"].tolist()) for i, rows, inputs in run.batches(preprocess, "", keep=True)]
              for _ in range(3)]
    assert passes[0] == passes[1] == passes[2] == [(0, [0, 1, 2], [0, 1, 2]), (1, [3, 4, 5], [3, 4, 5]),
                                                   (2, [6], [6])]
    assert len(calls) == 3 * passes_preprocessed


# --- the delta's life ------------------------------------------------------------------------------
def test_fewer_rounds_reselect_a_prefix_and_the_delta_saves_applies_and_reverts(tmp_path, data):
    model, processor = make_clip()
    cfg = iterative(rounds=3, round_density=0.005, curvature_probes=2)
    editor = UWMEditor(model, processor, cfg).calibrate(data, progress=False)
    two = editor.with_settings(rounds=2)
    fresh = UWMEditor(model, processor, iterative(rounds=2, round_density=0.005, curvature_probes=2))
    fresh.calibrate(data, progress=False)
    assert all(torch.equal(two.delta[n], fresh.delta[n]) for n in fresh.delta)
    assert sum(map(len, two.delta.values())) < sum(map(len, editor.delta.values()))
    with pytest.raises(ValueError, match="only 3 rounds were calibrated"):
        editor.with_settings(rounds=4)
    with pytest.raises(ValueError, match="calibrate again"):
        editor.with_settings(curvature_weight=1.0)
    before = state_of(model)
    editor.save_pretrained(tmp_path / "delta")
    loaded = UWMEditor.from_pretrained(tmp_path / "delta", model=model, processor=processor)
    assert loaded.stop == editor.stop == (3, None)        # no stopping rule: every round of the config
    loaded.apply()
    for name, layer in loaded.target_layers.items():
        flat, original = layer.weight.detach().view(-1), before[name + ".weight"].view(-1)
        changed = (flat != original).nonzero().squeeze(1)
        assert torch.equal(changed, editor.delta[name]) and torch.equal(flat[changed], -original[changed])
    loaded.revert()
    assert_same_state(model, before)


def test_bf16_sums_in_float32_and_stays_close(data):
    cfg = iterative(curvature_probes=2)
    runs = []
    for dtype, autocast in ((torch.float32, None), (torch.float32, torch.bfloat16), (torch.bfloat16, None)):
        editor = UWMEditor(*make_clip(dtype=dtype), cfg)
        run = Calibration(data, _OneProcess, editor.family, 32, progress=False, autocast=autocast)
        runs.append(margin_and_curvature(editor, run, 1))
    for low in runs[1:]:
        for part in (0, 1):
            for name, fp32 in runs[0][part].items():
                assert low[part][name].dtype == torch.float32
                assert float((low[part][name] - fp32).norm() / fp32.norm()) < 0.1, name


def test_siglip_calibrates(data):
    editor = UWMEditor(*make_siglip(), iterative(rounds=2, round_density=0.005, curvature_probes=2))
    editor.calibrate(data, progress=False)
    assert all(name.startswith("text_model") for name in editor.delta) and sum(editor.counts().values()) > 0


# --- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("rounds", 0), ("rounds", 2.0), ("round_density", 0.0),
                                         ("round_density", 1.5), ("curvature_weight", -1.0),
                                         ("curvature_weight", float("inf")), ("curvature_probes", 0),
                                         ("shared_budget", "yes")])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"UWMConfig.{field}"):
        iterative(**{field: value})


def test_more_rounds_than_weights_is_refused():
    with pytest.raises(ValueError, match="UWMConfig.round_density.*at most 1"):
        iterative(rounds=30, round_density=0.05)


def test_config_round_trips_through_json():
    cfg = iterative(rounds=7, round_density=0.002, curvature_weight=0.5, curvature_probes=4, shared_budget=False)
    assert UWMConfig.from_json_string(cfg.to_json_string()) == cfg


def test_llava_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="edits clip/siglip models, not LlavaForConditionalGeneration: use "
                                         "method='caption_iterative'"):
        UWMEditor(*make_llava(), iterative())


def test_every_method_declares_itself_once():
    from hf_uwm.methods import get_method, method_names

    names = method_names()
    assert len(set(names)) == len(names) >= 10 and UWMConfig().method == "ratio"
    for name in names:
        method = get_method(name)
        assert method.name == name and method.title and method.help and method.card_text
        assert set(method.families) <= {"clip", "siglip", "llava"}
        method.settings_class()   # its defaults are valid settings
