"""UWMEditor: invariances, apply/revert, delta files, model families and bad input."""

import json

import pytest
import torch

from conftest import make_clip, make_llava, make_pairs, make_siglip
from hf_uwm import UWMConfig, UWMEditor
from hf_uwm.delta import CONFIG_NAME, DELTA_NAME
from hf_uwm.loading import load_model


def weights(editor):
    return {n: l.weight.detach().clone() for n, l in editor.target_layers.items()}


def assert_scores_close(a, b, rtol=1e-10):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=0)


@pytest.fixture(scope="module")
def clip64():
    return make_clip(dtype=torch.float64)


@pytest.fixture(scope="module")
def data():
    return make_pairs(7, seed=4)


# --- invariances -----------------------------------------------------------------------------------
def test_scores_do_not_depend_on_batch_size(clip64, data):
    runs = [UWMEditor(*clip64, UWMConfig(batch_size=b)).calibrate(data, progress=False).scores for b in (1, 3, 7)]
    assert_scores_close(runs[0], runs[1])
    assert_scores_close(runs[0], runs[2])


def test_pair_order_does_not_change_scores(clip64, data):
    a = UWMEditor(*clip64, UWMConfig(batch_size=3)).calibrate(data, progress=False)
    b = UWMEditor(*clip64, UWMConfig(batch_size=3)).calibrate(data.shuffle(seed=1), progress=False)
    assert_scores_close(a.scores, b.scores)


# --- manipulation ----------------------------------------------------------------------------------
def test_alpha_one_leaves_every_weight_identical(data):
    model, processor = make_clip()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    UWMEditor(model, processor, UWMConfig(alpha=1.0, tau=0.3)).calibrate(data, progress=False).apply()
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


@pytest.mark.parametrize("make", [make_clip, make_siglip], ids=["clip", "siglip"])
def test_apply_scales_selected_weights_and_revert_is_bit_exact(data, make):
    model, processor = make()
    editor = UWMEditor(model, processor, UWMConfig(alpha=-0.7)).calibrate(data, progress=False)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    editor.apply()
    for name, layer in editor.target_layers.items():
        flat, orig = layer.weight.detach().view(-1), before[name + ".weight"].view(-1)
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[editor.delta[name]] = True
        assert torch.equal(flat[mask], orig[mask] * -0.7) and torch.equal(flat[~mask], orig[~mask])
    editor.revert()
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_double_apply_is_refused(data):
    editor = UWMEditor(*make_clip(), UWMConfig()).calibrate(data, progress=False)
    editor.apply()
    with pytest.raises(RuntimeError, match="already applied"):
        editor.apply()


def test_delta_on_a_different_base_is_refused(data, tmp_path):
    UWMEditor(*make_clip(seed=0)).calibrate(data, progress=False).save_pretrained(tmp_path / "d")
    with pytest.raises(ValueError, match="differ from the base model"):  # refused on loading, before any use
        UWMEditor.from_pretrained(tmp_path / "d", model=make_clip(seed=1)[0], processor=make_clip()[1])


def test_delta_loaded_twice_onto_an_edited_model_is_refused(data, tmp_path):
    model, processor = make_clip()
    UWMEditor(model, processor).calibrate(data, progress=False).save_pretrained(tmp_path / "d")
    UWMEditor.from_pretrained(tmp_path / "d", model=model, processor=processor).apply()
    with pytest.raises(ValueError, match="differ from the base model"):
        UWMEditor.from_pretrained(tmp_path / "d", model=model, processor=processor).apply()


def test_save_load_apply_on_a_fresh_copy_gives_identical_weights(data, tmp_path):
    model, processor = make_clip()
    editor = UWMEditor(model, processor, UWMConfig(tau=0.05)).calibrate(data, progress=False)
    editor.save_pretrained(tmp_path / "delta")
    edited = {n: p.clone() for n, p in editor.apply().state_dict().items()}
    fresh = UWMEditor.from_pretrained(tmp_path / "delta", model=make_clip()[0], processor=processor).apply()
    assert all(torch.equal(edited[n], p) for n, p in fresh.state_dict().items())


def test_delta_from_a_model_folder_loads_its_base(data, tmp_path):
    model, processor = make_clip()
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    editor = UWMEditor.from_pretrained(tmp_path / "base", UWMConfig()).calibrate(data, progress=False)
    editor.save_pretrained(tmp_path / "delta")
    record = json.loads((tmp_path / "delta" / CONFIG_NAME).read_text())
    # A path means nothing elsewhere: the record keeps the folder's name only, and loading asks for model=.
    assert record["base_model"] is None and record["base_model_folder"] == "base" and record["config"]["tau"] == 0.02
    assert str(tmp_path) not in (tmp_path / "delta" / CONFIG_NAME).read_text() + (tmp_path / "delta" / "README.md").read_text()
    assert record["counts"] == editor.counts() and sum(record["counts"].values()) > 0
    with pytest.raises(ValueError, match="model=model, processor=processor"):
        UWMEditor.from_pretrained(tmp_path / "delta")
    reloaded = UWMEditor.from_pretrained(tmp_path / "delta", model=load_model(tmp_path / "base")[0], processor=processor)
    assert reloaded.config == editor.config
    assert all(torch.equal(reloaded.delta[n], editor.delta[n]) for n in editor.delta)
    a, b = editor.apply().state_dict(), reloaded.apply().state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_random_control_matches_counts_per_layer(data):
    editor = UWMEditor(*make_clip()).calibrate(data, progress=False)
    control = editor.random_control(seed=3)
    assert {n: i.numel() for n, i in control.delta.items()} == {n: i.numel() for n, i in editor.delta.items()}
    assert any(not torch.equal(control.delta[n], editor.delta[n]) for n in editor.delta)
    assert all(torch.equal(control.delta[n], editor.random_control(seed=3).delta[n]) for n in editor.delta)
    control.apply()
    with pytest.raises(ValueError, match="differ"):  # both edits share the model: one at a time
        editor.apply()


def test_random_draws_of_a_layer_depend_on_that_layer_only(data):
    # Each layer draws from its own generator: same-shaped layers get independent draws, and a
    # layer's draw does not change when the layers before it change size (text out_proj is 32x32,
    # fc1 48x32; the vision fc2 layers come after them, with the same scores and counts).
    model, processor = make_clip()
    small, large = (UWMEditor(model, processor, UWMConfig(text_targets=[t])).calibrate(data, progress=False)
                    for t in ("self_attn.out_proj", "mlp.fc1"))
    vision = list(small.layers["vision"])
    assert all(torch.equal(small.delta[n], large.delta[n]) for n in vision)
    controls = small.random_control(seed=3), large.random_control(seed=3)
    assert all(torch.equal(controls[0].delta[n], controls[1].delta[n]) for n in vision)
    first, second = (set(controls[0].delta[n].tolist()) for n in vision[:2])
    assert not first <= second and not second <= first  # not one permutation cut at two lengths
    random_scores = [UWMEditor(model, processor, UWMConfig(text_targets=[t], method="random")).calibrate().scores
                     for t in ("self_attn.out_proj", "mlp.fc1")]
    assert all(torch.equal(random_scores[0][n], random_scores[1][n]) for n in vision)
    assert not torch.equal(random_scores[0][vision[0]], random_scores[0][vision[1]])


# --- families --------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [make_clip, make_siglip])
def test_default_targets_of_contrastive_models(make):
    editor = UWMEditor(*make())
    assert list(editor.layers["text"]) == [f"text_model.encoder.layers.{i}.self_attn.out_proj" for i in range(3)]
    assert list(editor.layers["vision"]) == [f"vision_model.encoder.layers.{i}.mlp.fc2" for i in range(3)]
    assert editor.config.tau == 0.02


@pytest.mark.parametrize("feature_layer,expected", [(-2, [0, 1]), (-1, [0, 1, 2]), (1, [0]), ([1, -2], [0, 1])])
def test_llava_targets_only_layers_that_reach_the_language_model(feature_layer, expected):
    editor = UWMEditor(*make_llava(vision_feature_layer=feature_layer))
    assert editor.towers == ("vision",) and editor.config.tau == 0.085
    names = list(editor.layers["vision"])
    assert [int(n.split(".layers.")[1].split(".")[0]) for n in names] == expected
    assert all(n.endswith("mlp.fc2") and "vision_tower" in n for n in names)


def test_llava_calibrates_on_images_only(tmp_path):
    # Scores against the literal formula: tests/test_scoring.py. Here: pairs without captions are
    # enough, the delta is the adaptive selection at LLaVA's τ, and it survives a save and reload.
    from hf_uwm.selection import select_adaptive

    model, processor = make_llava()
    editor = UWMEditor(model, processor).calibrate(make_pairs(4, texts=False), progress=False)
    assert list(editor.scores) == list(editor.layers["vision"]) and len(editor.scores) == 2
    for name, scores in editor.scores.items():
        assert torch.equal(editor.delta[name], select_adaptive(scores, 0.085))
    editor.save_pretrained(tmp_path / "d")
    before = weights(editor)
    loaded = UWMEditor.from_pretrained(tmp_path / "d", model=model, processor=processor)
    assert all(torch.equal(loaded.delta[n], editor.delta[n]) for n in editor.delta)
    loaded.apply()
    for name, layer in loaded.target_layers.items():
        changed = (layer.weight.detach() != before[name]).flatten().nonzero().squeeze(1)
        assert torch.equal(changed, editor.delta[name])


def test_text_only_edit_needs_only_text_columns():
    model, processor = make_clip()
    with_images = UWMEditor(model, processor, UWMConfig(vision_targets=[])).calibrate(make_pairs(3), progress=False)
    editor = UWMEditor(model, processor, UWMConfig(vision_targets=[]))
    editor.calibrate(make_pairs(3, images=False), progress=False)
    assert list(editor.scores) == list(editor.layers["text"]) and len(editor.scores) == 3
    assert all(torch.equal(editor.scores[n], with_images.scores[n]) for n in with_images.scores)
    assert all(torch.equal(editor.delta[n], with_images.delta[n]) for n in with_images.delta)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['safe_text', 'unsafe_text'\]"):
        UWMEditor(model, processor, UWMConfig(vision_targets=[])).calibrate(make_pairs(3, texts=False), progress=False)


# --- bad input ---------------------------------------------------------------------------------------
def test_unsupported_model_class_is_a_type_error():
    with pytest.raises(TypeError, match="CLIPModel, SiglipModel, LlavaForConditionalGeneration"):
        UWMEditor(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("field,value", [("tau", 0.0), ("tau", 1.0), ("tau", -0.1), ("alpha", float("nan")),
                                         ("method", "magic"), ("density", 0), ("batch_size", 0),
                                         ("token_norm", "l1"), ("selection", "topk")])
def test_out_of_range_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"UWMConfig.{field}"):
        UWMConfig(**{field: value})


def test_config_round_trips_through_json(tmp_path):
    cfg = UWMConfig(tau=0.05, alpha=0.0, method="difference", text_targets=["mlp.fc1"], text_prior=False)
    (tmp_path / "c.json").write_text(cfg.to_json_string())
    assert UWMConfig.from_json_file(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="Unknown UWMConfig field"):
        UWMConfig.from_dict({"tua": 0.1})


def test_unknown_target_lists_the_available_names():
    with pytest.raises(ValueError, match="available names inside a layer"):
        UWMEditor(*make_clip(), UWMConfig(text_targets=["mlp.fc9"]))


def test_missing_and_empty_columns_are_refused_before_model_work():
    editor = UWMEditor(*make_clip())
    with pytest.raises(ValueError, match=r"All 3 calibration pairs are text-only .*\(vision_targets=\[\]\)"):
        editor.calibrate(make_pairs(3, images=False), progress=False)   # its vision statistics need images
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['safe_text', 'unsafe_text'\]"):
        editor.calibrate(make_pairs(3, texts=False), progress=False)
    bad = make_pairs(3).map(lambda r, i: {"unsafe_text": "" if i == 2 else r["unsafe_text"]}, with_indices=True)
    with pytest.raises(ValueError, match="'unsafe_text', row 2"):
        editor.calibrate(bad, progress=False)
    with pytest.raises(ValueError, match="empty"):
        editor.calibrate(make_pairs(3).select([]), progress=False)
    assert editor.scores == {} and editor.delta == {}


def test_non_finite_statistic_names_layer_and_pair(data):
    model, processor = make_clip()
    editor = UWMEditor(model, processor, UWMConfig(vision_targets=[], batch_size=4))
    with torch.no_grad():
        model.text_model.encoder.layers[1].self_attn.v_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"text_model.encoder.layers.1.self_attn.out_proj.*pair 0"):
        editor.calibrate(data, progress=False)
    assert all(not layer._forward_hooks for layer in editor.target_layers.values())  # hooks removed


@pytest.fixture
def saved(data, tmp_path):
    model, processor = make_clip()
    UWMEditor(model, processor).calibrate(data, progress=False).save_pretrained(tmp_path / "d")
    return tmp_path / "d", model, processor


def test_truncated_delta_file_is_refused(saved):
    folder, model, processor = saved
    raw = (folder / DELTA_NAME).read_bytes()
    (folder / DELTA_NAME).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        UWMEditor.from_pretrained(folder, model=model, processor=processor)


def test_corrupted_indices_are_refused(saved):
    from safetensors.torch import load_file, save_file

    folder, model, processor = saved
    tensors = load_file(folder / DELTA_NAME)
    name = next(iter(tensors))
    tensors[name] = tensors[name].flip(0)
    save_file(tensors, folder / DELTA_NAME)
    with pytest.raises(ValueError, match="sorted, distinct"):
        UWMEditor.from_pretrained(folder, model=model, processor=processor)


def test_corrupted_config_and_missing_config_are_refused(saved, tmp_path):
    folder, model, processor = saved
    (folder / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        UWMEditor.from_pretrained(folder, model=model, processor=processor)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / DELTA_NAME).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="neither a delta folder"):
        UWMEditor.from_pretrained(tmp_path / "empty")


@pytest.mark.parametrize("name", ["nope_dir/", "not a repo"])
def test_a_missing_name_that_is_no_hub_id_is_a_file_not_found_error(name):
    with pytest.raises(FileNotFoundError, match="no folder here and no Hub repo id"):
        UWMEditor.from_pretrained(name)


def test_read_delta_without_config_is_a_file_not_found_error(tmp_path):
    from hf_uwm.delta import read_delta

    with pytest.raises(FileNotFoundError, match="no uwm_config.json"):
        read_delta(tmp_path)


def test_failed_save_leaves_nothing_half_written(data, tmp_path, monkeypatch):
    editor = UWMEditor(*make_clip()).calibrate(data, progress=False)
    editor.save_pretrained(tmp_path / "d")
    before = {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()}
    monkeypatch.setattr("hf_uwm.files.save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        editor.save_pretrained(tmp_path / "d", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_save_refuses_a_folder_holding_other_files(data, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    editor = UWMEditor(*make_clip()).calibrate(data, progress=False)
    with pytest.raises(FileExistsError, match="other files"):
        editor.save_pretrained(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_apply_before_calibrate_says_what_to_do():
    with pytest.raises(ValueError, match="calibrate"):
        UWMEditor(*make_clip()).apply()


# --- score cache (issue 7) ---------------------------------------------------------------------------
def test_reselection_from_cached_scores_equals_a_fresh_calibrate(data, tmp_path):
    model, processor = make_clip()
    editor = UWMEditor(model, processor, UWMConfig(text_targets=["self_attn.out_proj", "mlp.fc1"]))
    editor.calibrate(data, progress=False).save_scores(tmp_path / "scores.safetensors")
    changes = dict(tau=0.1, alpha=0.0, vision_targets=[], text_targets=["mlp.fc1"])
    cached = UWMEditor(model, processor, UWMConfig(text_targets=["self_attn.out_proj", "mlp.fc1"]))
    cached = cached.load_scores(tmp_path / "scores.safetensors").with_settings(**changes)
    fresh = UWMEditor(model, processor, UWMConfig(**changes)).calibrate(data, progress=False)
    assert cached.config == fresh.config
    assert cached.delta.keys() == fresh.delta.keys()
    assert all(torch.equal(cached.delta[n], fresh.delta[n]) for n in fresh.delta)
    fixed = editor.with_settings(selection="fixed", density=0.05)
    fresh_fixed = UWMEditor(model, processor, fixed.config).calibrate(data, progress=False)
    assert all(torch.equal(fixed.delta[n], fresh_fixed.delta[n]) for n in fresh_fixed.delta)


def test_score_cache_refuses_other_settings_or_weights(data, tmp_path):
    model, processor = make_clip()
    UWMEditor(model, processor).calibrate(data, progress=False).save_scores(tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match="other \\['token_norm'\\]"):
        UWMEditor(model, processor, UWMConfig(token_norm="rms")).load_scores(tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match="other model weights"):
        UWMEditor(make_clip(seed=3)[0], processor).load_scores(tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match="calibrate again"):
        UWMEditor(model, processor).load_scores(tmp_path / "s.safetensors").with_settings(score="unsafe")
    with pytest.raises(ValueError, match="No cached scores"):
        UWMEditor(model, processor).load_scores(tmp_path / "s.safetensors").with_settings(text_targets=["mlp.fc1"])


def test_applied_reverts_on_exit_and_on_error_and_leaves_a_callers_edit_applied():
    model, processor = make_clip()
    editor = UWMEditor(model, processor, UWMConfig()).calibrate(make_pairs(), progress=False)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with editor.applied() as edited:
        assert edited is model and editor.is_applied
        assert any(not torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert not editor.is_applied and all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    with pytest.raises(KeyboardInterrupt), editor.applied():
        raise KeyboardInterrupt
    assert not editor.is_applied and all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    editor.apply()
    with editor.applied():
        pass
    assert editor.is_applied   # the caller's edit is the caller's to revert
    editor.revert()
