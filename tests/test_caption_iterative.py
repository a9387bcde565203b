"""Iterative, knowledge-guarded caption attribution against a direct implementation with autograd,
on a tiny random LLaVA built from a config."""

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import concatenate_datasets

from conftest import make_clip, make_pairs
from hf_uwm import UWMConfig, UWMEditor, caption_evaluation, captioning
from hf_uwm.methods import Calibration
from hf_uwm.methods.caption_iterative import (MAX_CAPTION_TOKENS, MAX_TOKENS, CaptionIterative, margin_and_fisher,
                                              slice_measures, unsafe_words)
from hf_uwm.methods.rounds import probe_directions
from hf_uwm.organism_captioner import build_processor
from test_captioning import tiny_llava

SCRIPT = Path(__file__).parent / "scripts" / "distributed_caption_iterative.py"


@pytest.fixture(scope="module")
def processor():
    return build_processor()


@pytest.fixture(scope="module")
def llava64(processor):
    return tiny_llava(processor, seed=3).to(torch.float64)


@pytest.fixture(scope="module")
def data():
    return make_pairs(3, seed=7)


def iterative(**settings):
    return UWMConfig(method="caption_iterative", goal=None, knowledge_budget=None, holdout=0.0, **settings)


class _OneProcess:
    num_processes, process_index, is_main_process = 1, 0, True


def state_of(model):
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


# --- the definition, written out: one pair at a time, no padding ----------------------------------
def position_log_ps(model, processor, image, caption):
    """{sequence position t: (log p(· | image, tokens ≤ t) (V,), token t + 1)} over the caption's tokens, by hand."""
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": captioning.DEFAULT_PROMPT}]}]
    prompt = processor.apply_chat_template(turn, add_generation_prompt=True)
    text = processor.apply_chat_template(turn + [{"role": "assistant", "content": [{"type": "text", "text": caption}]}])
    start = processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    logits, ids = model(**inputs).logits[0], inputs["input_ids"][0]
    return {t - 1: (logits[t - 1].log_softmax(-1), ids[t]) for t in range(start, len(ids))}


def token_log_p(model, processor, image, caption):
    """{sequence position t: log p(token t + 1 | image, tokens ≤ t)} over the caption's tokens, by hand."""
    return {t: lp[token] for t, (lp, token) in position_log_ps(model, processor, image, caption).items()}


def log_p(model, processor, image, caption):
    return sum(token_log_p(model, processor, image, caption).values())


def flat_grad(value, weights):
    return torch.cat([x.flatten() for x in torch.autograd.grad(value, weights, retain_graph=True)])


def hand_gradients(model, processor, data, weights, probes, curvature="reference", mu=0.0, exact=False):
    """∂(m + μ·L)/∂W, the probe gradients per probe and caption (P, N, n) and, when `exact`, their
    expectation's definition, flattened and concatenated. L = (1/N) Σ_b log p(Ts_b | Is_b).

    reference: Σ_t r_pbt ∂ℓ_bt/∂W, r (P, N, T) by sequence position; exact Σ_bt (∂ℓ_bt/∂W)².
    vocabulary: Σ_tv r_pbiv ∂ log p_btv/∂W, r (P, N, caption positions, V) by caption position i;
    exact Σ_btv (∂ log p_btv/∂W)²."""
    margin = sum(log_p(model, processor, r["unsafe_image"], r["safe_text"])
                 - log_p(model, processor, r["unsafe_image"], r["unsafe_text"])
                 + mu * log_p(model, processor, r["safe_image"], r["safe_text"]) for r in data) / len(data)
    g = flat_grad(margin, weights)
    probed, total = [0] * len(data), 0
    for b, row in enumerate(data):
        positions = position_log_ps(model, processor, row["safe_image"], row["safe_text"])
        for i, (t, (lp, token)) in enumerate(sorted(positions.items())):
            if curvature == "reference":
                grad = flat_grad(lp[token], weights)
                probed[b] = probed[b] + probes[:, b, t, None].double() * grad                     # (P, n)
                total = total + grad.square() if exact else 0
                continue
            probed[b] = probed[b] + torch.stack([flat_grad(probes[p, b, i].to(lp) @ lp, weights)
                                                 for p in range(probes.shape[0])])                 # (P, n)
            if exact:
                total = total + sum(flat_grad(lp[v], weights).square() for v in range(lp.shape[0]))
    return g, torch.stack(probed, 1), total


def hand_probes(cfg, round_index, n, vocab):
    """The probe directions of a round for rows 0..n-1, as the definition indexes them."""
    if cfg.knowledge_curvature == "reference":
        return probe_directions(cfg.seed, round_index, list(range(n)), cfg.curvature_probes, MAX_TOKENS)
    noise = probe_directions(cfg.seed, round_index, list(range(n)), cfg.curvature_probes, MAX_CAPTION_TOKENS * vocab)
    return noise.view(cfg.curvature_probes, n, MAX_CAPTION_TOKENS, vocab)


def hand_curvature(probed, estimator):
    """G from per-caption probe gradients (P, N, n): squared per caption, or summed over them first."""
    return (probed.square().sum(1) if estimator == "per_item" else probed.sum(1).square()).mean(0)


def hand_rounds(model, processor, data, cfg, layers):
    """The round of each weight, every round re-scored by hand on the model as edited so far."""
    weights = [layer.weight for layer in layers.values()]
    original = [w.detach().clone() for w in weights]
    flipped = torch.zeros(sum(w.numel() for w in weights), dtype=torch.int32)
    vocab = model.config.text_config.vocab_size
    try:
        for r in range(1, cfg.rounds + 1):
            w = torch.cat([x.detach().flatten() for x in weights])
            g, probed, _ = hand_gradients(model, processor, data, weights, hand_probes(cfg, r, len(data), vocab),
                                          cfg.knowledge_curvature, cfg.safe_likelihood_weight)
            G = hand_curvature(probed, cfg.curvature_estimator)                                # (n,)
            a, h = -w * g, (1 - cfg.alpha) ** 2 * w.square() * G
            score = a / a.abs().mean() - cfg.curvature_weight * h / h.mean()
            score[flipped > 0] = -math.inf
            top = torch.topk(score, math.ceil(cfg.round_density * len(score))).indices
            flipped[top] = r
            with torch.no_grad():
                for layer_w, (start, stop) in zip(weights, _bounds(weights)):
                    mine = top[(top >= start) & (top < stop)] - start
                    layer_w.view(-1)[mine] *= cfg.alpha
    finally:
        with torch.no_grad():
            for w, o in zip(weights, original):
                w.copy_(o)
    return {name: flipped[start:stop].view(layer.weight.shape)
            for (name, layer), (start, stop) in zip(layers.items(), _bounds(weights))}


def _bounds(weights):
    stops = torch.tensor([w.numel() for w in weights]).cumsum(0).tolist()
    return list(zip([0] + stops[:-1], stops))


# --- the tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["per_item", "summed"])
@pytest.mark.parametrize("curvature,mu", [("vocabulary", 3.0), ("reference", 0.0)])
def test_margin_gradient_and_fisher_probes_equal_autograd(llava64, processor, data, estimator, curvature, mu):
    probes = 2
    editor = UWMEditor(llava64, processor, iterative(curvature_probes=probes, batch_size=2, seed=3,
                                                     curvature_estimator=estimator, knowledge_curvature=curvature,
                                                     safe_likelihood_weight=mu))
    run = Calibration(data, _OneProcess, editor.family, 2, progress=False)
    grads, estimate = margin_and_fisher(editor, run, 4)
    weights = [layer.weight for layer in editor.target_layers.values()]
    # With the probes of round 4, over both batches: per_item (1/P) Σ_pb (probe gradient of b)²,
    # summed (1/P) Σ_p (Σ_b probe gradient of b)².
    directions = hand_probes(editor.config, 4, len(data), llava64.config.text_config.vocab_size)
    g, probed, _ = hand_gradients(llava64, processor, data, weights, directions, curvature, mu)
    expected = hand_curvature(probed, estimator)
    assert g.abs().sum() > 0 and expected.sum() > 0
    # Llama's attention takes its softmax in float32 even in a float64 model: agreement to ~1e-7.
    close = dict(rtol=1e-5)
    torch.testing.assert_close(torch.cat([x.flatten() for x in grads.values()]), g, **close, atol=1e-7 * g.abs().max())
    torch.testing.assert_close(torch.cat([x.flatten() for x in estimate.values()]), expected,
                               **close, atol=1e-7 * expected.max())


def test_the_safe_likelihood_adds_its_gradient_to_the_margin(llava64, processor, data):
    """g(μ) − g(0) = μ·∂L/∂W, L = (1/N) Σ_b log p(Ts_b | Is_b): checked against the hand margin without it."""
    weights_of = lambda e: [layer.weight for layer in e.target_layers.values()]   # noqa: E731
    grads = {}
    for mu in (0.0, 2.5):
        editor = UWMEditor(llava64, processor, iterative(batch_size=2, curvature_weight=0.0, safe_likelihood_weight=mu))
        g, curvature = margin_and_fisher(editor, Calibration(data, _OneProcess, editor.family, 2, progress=False), 1)
        assert curvature is None
        grads[mu] = torch.cat([x.flatten() for x in g.values()])
    likelihood = sum(log_p(llava64, processor, r["safe_image"], r["safe_text"]) for r in data) / len(data)
    expected = 2.5 * flat_grad(likelihood, weights_of(editor))
    assert expected.abs().sum() > 0
    torch.testing.assert_close(grads[2.5] - grads[0.0], expected, rtol=1e-5, atol=1e-7 * expected.abs().max())


@pytest.mark.parametrize("curvature", ["reference", "vocabulary"])
def test_fisher_estimate_converges_to_the_exact_diagonal(llava64, processor, data, curvature):
    """With many probes the estimate reaches its exact Gauss-Newton diagonal: Σ_bt (∂ℓ_bt/∂W)² of
    the reference tokens, or Σ_btv (∂ log p_btv/∂W)² of every word."""
    probes = 400
    editor = UWMEditor(llava64, processor, iterative(curvature_probes=probes, batch_size=3, seed=1,
                                                     knowledge_curvature=curvature))
    _, estimate = margin_and_fisher(editor, Calibration(data, _OneProcess, editor.family, 3, progress=False), 1)
    weights = [layer.weight for layer in editor.target_layers.values()]
    vocab = llava64.config.text_config.vocab_size
    unused = torch.zeros(1, 3, MAX_TOKENS) if curvature == "reference" else torch.zeros(1, 3, MAX_CAPTION_TOKENS, vocab)
    _, _, exact = hand_gradients(llava64, processor, data, weights, unused, curvature, exact=True)
    relative = float((torch.cat([x.flatten() for x in estimate.values()]) - exact).norm() / exact.norm())
    assert relative < 0.2   # about sqrt(2/P) = 0.07; per-caption instead of per-token probes miss by more


@pytest.mark.parametrize("targets, knowledge", [
    (None, {}), (["mlp.fc2", "projector.linear_1"], {}),
    (None, dict(knowledge_curvature="reference", safe_likelihood_weight=0.0, curvature_estimator="summed")),
    (None, dict(curvature_weight=0.0, safe_likelihood_weight=0.0))],   # no safe images needed at all
    ids=["vision", "with-projector", "the-edit-before", "margin-only"])
def test_rounds_equal_the_definition_on_the_edited_model(llava64, processor, data, targets, knowledge):
    cfg = iterative(**{**dict(rounds=3, round_density=0.004, curvature_weight=2.0, curvature_probes=2, batch_size=2,
                              seed=5, alpha=-0.5, vision_targets=targets), **knowledge})
    before = state_of(llava64)
    editor = UWMEditor(llava64, processor, cfg).calibrate(data, progress=False)
    if targets:
        assert "model.multi_modal_projector.linear_1" in editor.target_layers
    assert all(torch.equal(before[n], p) for n, p in llava64.state_dict().items())   # every round undone
    expected = hand_rounds(llava64, processor, data, editor.config, editor.target_layers)
    for name, rounds in expected.items():
        assert torch.equal(editor.scores[name].to(rounds.dtype), rounds), name
    per_round = math.ceil(0.004 * sum(s.numel() for s in expected.values()))
    assert sum(len(idx) for idx in editor.delta.values()) == 3 * per_round


def test_slice_measures_by_hand(processor, monkeypatch):
    data = make_pairs(4, seed=7)   # unsafe captions: the safe one + "with a <unsafe word> thing"
    unsafe = ["a photo of a cat with a bloody thing", "a photo of a dog here", "a knife", "a photo, dangerous dog"]
    safe = ["a photo of a cat", "a photo of a dog", "a photo", "a photo of a tree here"]
    editor = UWMEditor(tiny_llava(processor, seed=2), processor, iterative())
    seen = []

    def fake_generate(model, processor_, pictures, **kwargs):   # each measure: unsafe images, then safe ones
        seen.append(list(pictures))
        assert model is editor.model and kwargs["prompt"] == captioning.DEFAULT_PROMPT
        return unsafe if len(seen) % 2 else safe

    monkeypatch.setattr(captioning, "generate_captions", fake_generate)
    words = unsafe_words(data)
    assert words == {"with", "thing", "bloody", "violent", "dead", "dangerous"}   # not "knife": no pair uses it
    measures = slice_measures(editor, data, words)
    assert seen == [list(data["unsafe_image"]), list(data["safe_image"])]
    assert measures["free_of_unsafe_words"] == pytest.approx(100 * 2 / 4)          # captions 1 and 2
    expected = caption_evaluation.text_metrics(safe, data["safe_text"], meteor=False)["rougeL"]
    assert measures["rougeL"] == pytest.approx(expected)
    state = editor.method.start_measuring(editor, data)
    goal, cost, _ = editor.method.measure(editor, data, state)
    assert cost == 0 and goal == measures["free_of_unsafe_words"]   # the same captions: nothing lost


def test_copies_of_an_image_are_one_item_of_the_caption_slice(processor):
    from hf_uwm.methods.caption_iterative import _distinct_image_rows

    data = make_pairs(4, seed=9)
    doubled = concatenate_datasets([data, data.select([1, 2])])
    assert _distinct_image_rows(doubled) == [0, 1, 2, 3]


def test_the_trajectory_measures_the_held_out_slice_of_the_model_edited_so_far(processor):
    from hf_uwm.methods.stopping import holdout_rows

    model, data = tiny_llava(processor, seed=5), make_pairs(5, seed=9)
    cfg = UWMConfig(method="caption_iterative", rounds=3, round_density=0.01, curvature_probes=2, batch_size=2,
                    holdout=0.4, goal=None, knowledge_budget=None)
    editor = UWMEditor(model, processor, cfg).calibrate(data, progress=False)
    holdout = data.select(holdout_rows(len(data), 0.4, cfg.seed)[1])
    assert [step.round for step in editor.trajectory] == [0, 1, 2, 3] and len(holdout) == 2
    words = unsafe_words(holdout)
    base = slice_measures(editor, holdout, words)
    for step in editor.trajectory:
        edit = editor.with_settings(rounds=step.round) if step.round else None
        if edit:
            edit.apply()
        measures = slice_measures(editor, holdout, words)
        if edit:
            edit.revert()
        lost = base["rougeL"] - measures["rougeL"]
        assert step.measures == pytest.approx({**measures, "rougeL_lost": lost, "rougeL_lost_resolution": 100 / 2,
                                               "cost_resolution": 100 / 2})   # one caption of the two
        assert step.goal == pytest.approx(measures["free_of_unsafe_words"])
        assert step.cost == pytest.approx(lost)
    assert editor.trajectory[-1].flipped == sum(len(i) for i in editor.delta.values()) > 0


# --- resuming and processes ----------------------------------------------------------------------
class Killed(Exception):
    pass


def test_a_killed_run_resumes_at_its_last_round_with_the_same_result(tmp_path, monkeypatch, processor, data):
    model = tiny_llava(processor, seed=4)
    cfg = iterative(rounds=3, round_density=0.002, curvature_probes=2, batch_size=2)
    reference = UWMEditor(model, processor, cfg).calibrate(data, progress=False)
    rounds_run, original = [], CaptionIterative.round_scores

    def dying(self, editor, run, round_index):
        rounds_run.append(round_index)
        if len(rounds_run) == 2:
            raise Killed
        return original(self, editor, run, round_index)

    monkeypatch.setattr(CaptionIterative, "round_scores", dying)
    before = state_of(model)
    with pytest.raises(Killed):
        UWMEditor(model, processor, cfg).calibrate(data, progress=False, checkpoint_dir=tmp_path)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    resumed = UWMEditor(model, processor, cfg).calibrate(data, progress=False, checkpoint_dir=tmp_path)
    assert rounds_run == [1, 2, 2, 3]   # restarted at the killed round
    assert all(torch.equal(resumed.scores[n], reference.scores[n]) for n in reference.scores)
    assert all(torch.equal(resumed.delta[n], reference.delta[n]) for n in reference.delta)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path, processor):
    from safetensors import safe_open

    config = iterative(rounds=2, round_density=0.002, curvature_probes=2, batch_size=2)
    root = str(Path(__file__).resolve().parents[1])   # this checkout's hf_uwm, wherever the venv points
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(SCRIPT), str(tmp_path / "run"), config.to_json_string()]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    single = UWMEditor(tiny_llava(processor, seed=6).to(torch.float64), processor, config)
    single.calibrate(make_pairs(5, seed=6), progress=False)   # the script's model and pairs
    for rank in (0, 1):
        with safe_open(tmp_path / f"run.rank{rank}.safetensors", framework="pt") as f:
            assert f.metadata()["processes"] == "2"
            for name in single.scores:
                assert torch.equal(f.get_tensor(f"score/{name}"), single.scores[name])
                assert torch.equal(f.get_tensor(f"delta/{name}"), single.delta[name])


def test_refuses_a_model_without_captions():
    with pytest.raises(ValueError, match="edits llava models, not CLIPModel: use method=.iterative_attribution."):
        UWMEditor(*make_clip(), UWMConfig(method="caption_iterative"))


def test_projector_targets_are_refused_where_they_cannot_work(llava64, processor):
    with pytest.raises(ValueError, match="runs the vision tower alone.*caption_attribution"):
        UWMEditor(llava64, processor, UWMConfig(vision_targets=["projector.linear_1"]))            # UWM: ratio
    with pytest.raises(ValueError, match="no nn.Linear of the multimodal projector.*projector.linear_2"):
        UWMEditor(llava64, processor, iterative(vision_targets=["projector.act"]))
    clip, clip_processor = make_clip()
    with pytest.raises(ValueError, match="only LLaVA has a multimodal projector"):
        UWMEditor(clip, clip_processor, UWMConfig(method="attribution", vision_targets=["projector.linear_1"]))


def test_a_projector_edit_saves_loads_and_applies(llava64, processor, data, tmp_path):
    cfg = UWMConfig(method="caption_attribution", density=0.01, vision_targets=["projector.linear_2"], batch_size=2)
    editor = UWMEditor(llava64, processor, cfg).calibrate(data, progress=False)
    editor.save_pretrained(tmp_path / "delta")
    loaded = UWMEditor.from_pretrained(tmp_path / "delta", model=llava64, processor=processor)
    assert list(loaded.delta) == ["model.multi_modal_projector.linear_2"]
    assert torch.equal(loaded.delta["model.multi_modal_projector.linear_2"],
                       editor.delta["model.multi_modal_projector.linear_2"])
    weight = llava64.model.multi_modal_projector.linear_2.weight
    before = weight.detach().clone()
    with loaded.applied():
        changed = (weight != before).flatten().nonzero().squeeze(1)
        assert torch.equal(changed.sort().values, loaded.delta["model.multi_modal_projector.linear_2"].sort().values)
    assert torch.equal(weight, before)


def test_the_card_says_which_knowledge_terms_were_used():
    method = CaptionIterative()
    new = UWMConfig(method="caption_iterative").to_dict()
    assert method.selection_text(new, None).endswith(
        "1 curvature probe (per item) of every word's log-probability in the safe captions, safe-caption likelihood "
        "weight μ = 12")
    before = {k: v for k, v in new.items() if k not in ("knowledge_curvature", "safe_likelihood_weight")}
    assert method.selection_text(before, None).endswith("of the reference token's log-probability in the safe "
                                                        "captions, safe-caption likelihood weight μ = 0")


@pytest.mark.parametrize("setting, value, words", [
    ("knowledge_curvature", "fisher", "knowledge_curvature must be one of"),
    ("safe_likelihood_weight", -1.0, "safe_likelihood_weight must be a finite number ≥ 0"),
    ("safe_likelihood_weight", math.inf, "safe_likelihood_weight must be a finite number ≥ 0")])
def test_bad_knowledge_settings_are_refused_with_how_to_fix(setting, value, words):
    with pytest.raises(ValueError, match=words):
        UWMConfig(method="caption_iterative", **{setting: value})


def test_a_caption_longer_than_the_vocabulary_probes_is_refused(llava64, processor, monkeypatch):
    import hf_uwm.methods.caption_iterative as module

    monkeypatch.setattr(module, "MAX_CAPTION_TOKENS", 2)
    editor = UWMEditor(llava64, processor, iterative(batch_size=2))
    run = Calibration(make_pairs(2, seed=1), _OneProcess, editor.family, 2, progress=False)
    with pytest.raises(ValueError, match="runs past 2 tokens: shorten it"):
        margin_and_fisher(editor, run, 1)
