"""A delta exported as a peft SHiRA adapter: loaded by peft it is the same edit as `apply()`, bit for bit."""

import copy
import json
import sys

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from conftest import make_clip, make_llava, make_siglip
from hf_uwm import UWMConfig, UWMEditor
from hf_uwm.cli import main
from hf_uwm.delta import ADAPTER_CONFIG_NAME, ADAPTER_FILES, ADAPTER_WEIGHTS_NAME, CONFIG_NAME, DELTA_NAME, read_delta
from hf_uwm.peft_adapter import PREFIX, shira_rank

peft = pytest.importorskip("peft")
FAMILIES = {"clip": make_clip, "siglip": make_siglip, "llava": make_llava}


def frozen(make):
    """A tiny model as peft leaves it: no parameter requires grad (nn.MultiheadAttention, in SigLIP's
    pooling head, runs another kernel when one does, a few ulps apart, whatever the weights)."""
    model, processor = make()
    return model.requires_grad_(False), processor


def random_edit(model, processor, alpha=-1.0):
    return UWMEditor(copy.deepcopy(model), processor, UWMConfig(method="random", alpha=alpha)).calibrate()


def outputs(model, family: str) -> list[torch.Tensor]:
    """Text and image features (CLIP, SigLIP), or logits and vision-tower states (LLaVA) of fixed inputs."""
    generator, size = torch.Generator().manual_seed(0), model.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size, generator=generator)
    with torch.no_grad():
        if family == "llava":
            ids = torch.tensor([[1, 2] + [127] * 16 + [3, 4]] * 2)  # 16 image tokens: (32 / 8)² patches
            out = model(input_ids=ids, pixel_values=pixels)
            hidden = out.image_hidden_states
            return [out.logits, *(hidden if isinstance(hidden, (list, tuple)) else [hidden])]
        ids = torch.randint(0, min(400, model.config.text_config.vocab_size), (2, 7), generator=generator)
        text, image = model.get_text_features(input_ids=ids), model.get_image_features(pixel_values=pixels)
        return [o if isinstance(o, torch.Tensor) else o.pooler_output for o in (text, image)]


def peft_model(model, folder):
    return peft.PeftModel.from_pretrained(copy.deepcopy(model), folder)


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("alpha", [-1.0, 0.0])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_peft_loads_exactly_the_edit_that_apply_makes(family, alpha, tmp_path):
    model, processor = frozen(FAMILIES[family])
    editor = random_edit(model, processor, alpha)
    folder = editor.save_pretrained(tmp_path / "d", peft=True)
    with editor.applied() as edited:
        expected, weights = outputs(edited, family), copy.deepcopy(edited.state_dict())
    assert not same(expected, outputs(model, family))  # the edit changes the outputs
    loaded = peft_model(model, folder)
    assert same(outputs(loaded, family), expected)
    merged = loaded.merge_and_unload()
    assert same(outputs(merged, family), expected)
    assert all(torch.equal(weights[name], value) for name, value in merged.state_dict().items())


@pytest.mark.parametrize("alpha", [0.5, 3.0, -3.0, 2.0, -0.3, 0.7, 1.7, -5.1])
def test_other_alphas_round_within_the_stated_bound(alpha, tmp_path):
    """W + fl((α − 1)·W) against fl(α·W): |difference| ≤ (3|α| + 2|α − 1|)(1 + 3u)·u·|W|; exact when α − 1 is
    ± a power of two (then (α − 1)·W is exact and the sum rounds once, as α·W does)."""
    model, processor = frozen(make_clip)
    editor = random_edit(model, processor, alpha)
    folder = editor.save_pretrained(tmp_path / "d", peft=True)
    merged = peft_model(model, folder).merge_and_unload().state_dict()
    u = torch.finfo(torch.float32).eps / 2
    bound = (3 * abs(alpha) + 2 * abs(alpha - 1)) * (1 + 3 * u) * u
    exact = alpha in (0.5, 3.0, -3.0, 2.0)
    with editor.applied() as edited:
        for name, layer in editor.target_layers.items():
            base = model.get_submodule(name).weight
            difference = (merged[f"{name}.weight"] - layer.weight).abs()
            assert bool((difference <= bound * base.abs()).all())
            assert not exact or bool((difference == 0).all())


def test_indices_list_the_selection_first_then_distinct_padding_at_zero(tmp_path):
    model, processor = frozen(make_clip)
    editor = random_edit(model, processor)
    folder = editor.save_pretrained(tmp_path / "d", peft=True)
    tensors, config = load_file(folder / ADAPTER_WEIGHTS_NAME), json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    r = config["r"]
    assert config["peft_type"] == "SHIRA" and config["target_modules"] == sorted(editor.delta)
    assert r == shira_rank(editor.record()) and r >= 1
    for name, idx in editor.delta.items():
        weight, (out_features, in_features) = model.get_submodule(name).weight, model.get_submodule(name).weight.shape
        rows, cols = tensors[f"{PREFIX}{name}.shira_indices"].long()
        values = tensors[f"{PREFIX}{name}.shira_weight"]
        flat = rows * in_features + cols
        assert flat.numel() == r * (out_features + in_features) == values.numel()
        assert flat.unique().numel() == flat.numel()  # peft's sparse sum would add a repeated position twice
        assert torch.equal(flat[:idx.numel()], idx)
        assert torch.equal(values[:idx.numel()], -2 * weight.view(-1)[idx])
        assert bool((values[idx.numel():] == 0).all())
    # r is the smallest that fits: one less leaves the largest selection without room.
    assert any(info["selected"] > (r - 1) * sum(info["shape"]) for info in editor.record()["layers"].values())


@pytest.mark.parametrize("corruption", ["index", "value", "sign"])
def test_a_wrong_index_value_or_sign_in_the_adapter_gives_another_model(corruption, tmp_path):
    """The comparisons above can fail: a single wrong entry changes peft's outputs."""
    model, processor = frozen(make_clip)
    editor = random_edit(model, processor)
    folder = editor.save_pretrained(tmp_path / "d", peft=True)
    with editor.applied() as edited:
        expected = outputs(edited, "clip")
    path = folder / ADAPTER_WEIGHTS_NAME
    tensors = load_file(path)
    name = f"{PREFIX}{next(iter(editor.delta))}"
    if corruption == "index":
        tensors[f"{name}.shira_indices"][1, 0] += 1 if tensors[f"{name}.shira_indices"][1, 0] == 0 else -1
    elif corruption == "value":
        tensors[f"{name}.shira_weight"][0] *= 0.5
    else:
        tensors[f"{name}.shira_weight"] = -tensors[f"{name}.shira_weight"]
    save_file(tensors, path)
    assert not same(outputs(peft_model(model, folder), "clip"), expected)


def test_the_adapter_alone_reads_back_as_the_same_delta(tmp_path):
    model, processor = frozen(make_clip)
    editor = random_edit(model, processor)
    folder = editor.save_pretrained(tmp_path / "d", peft=True)
    (folder / CONFIG_NAME).unlink()
    (folder / DELTA_NAME).unlink()
    record, indices = read_delta(folder)
    assert record == editor.record() and indices.keys() == editor.delta.keys()
    assert all(torch.equal(indices[n], editor.delta[n]) for n in indices)
    again = UWMEditor.from_pretrained(folder, model=copy.deepcopy(model), processor=processor)
    with editor.applied() as edited, again.applied() as reloaded:
        assert same(outputs(reloaded, "clip"), outputs(edited, "clip"))


def test_an_adapter_that_hf_uwm_did_not_write_is_refused_clearly(tmp_path):
    model, processor = frozen(make_clip)
    lora = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["fc2"], r=2))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="peft LORA adapter that hf_uwm did not write.*PeftModel.from_pretrained"):
        UWMEditor.from_pretrained(tmp_path / "lora", model=model, processor=processor)
    shira = peft.get_peft_model(copy.deepcopy(model), peft.ShiraConfig(target_modules=["fc2"], r=1))
    shira.save_pretrained(tmp_path / "shira")
    with pytest.raises(ValueError, match="peft SHIRA adapter that hf_uwm did not write"):
        read_delta(tmp_path / "shira")


def test_an_applied_edit_exports_the_same_adapter(tmp_path):
    model, processor = frozen(make_clip)
    editor = random_edit(model, processor)
    before = editor.save_pretrained(tmp_path / "before", peft=True)
    with editor.applied():
        during = editor.save_pretrained(tmp_path / "during", peft=True)
    assert all((before / f).read_bytes() == (during / f).read_bytes() for f in ADAPTER_FILES)


def test_a_selection_no_single_rank_can_hold_is_refused_without_leaving_files(tmp_path):
    model, processor = frozen(make_clip)
    editor = random_edit(model, processor)
    # Every weight of a 32×48 fc2: r = ⌈1536 / 80⌉ = 20, and 20 · (32 + 32) exceeds a 32×32 out_proj.
    name = "vision_model.encoder.layers.0.mlp.fc2"
    assert "text_model.encoder.layers.0.self_attn.out_proj" in editor.delta
    editor.delta[name] = torch.arange(model.get_submodule(name).weight.numel())
    with pytest.raises(ValueError, match="cannot be a peft SHiRA adapter"):
        editor.save_pretrained(tmp_path / "d", peft=True)
    assert list(tmp_path.iterdir()) == []


def test_without_peft_the_error_names_the_extra(tmp_path, monkeypatch):
    model, processor = frozen(make_clip)
    editor = random_edit(model, processor)
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(ImportError, match=r'pip install "hf_uwm\[peft\]"'):
        editor.save_pretrained(tmp_path / "d", peft=True)
    assert not (tmp_path / "d").exists()


def test_overwriting_without_peft_removes_the_stale_adapter(tmp_path):
    model, processor = frozen(make_clip)
    editor = random_edit(model, processor)
    folder = editor.save_pretrained(tmp_path / "d", peft=True)
    (folder / CONFIG_NAME).unlink()  # a folder holding only an adapter is not replaced unasked either
    (folder / DELTA_NAME).unlink()
    with pytest.raises(FileExistsError, match="already holds a delta"):
        editor.save_pretrained(folder)
    editor.save_pretrained(folder, overwrite=True)
    assert not any((folder / f).exists() for f in ADAPTER_FILES)


def test_card_shows_both_ways_to_load_and_the_peft_metadata(tmp_path):
    model, processor = frozen(make_clip)
    editor = random_edit(model, processor)
    editor.base_model = "org/clip-base"
    card = ModelCard((editor.save_pretrained(tmp_path / "d", peft=True) / "README.md").read_text())
    assert card.data.library_name == "peft" and card.data.base_model == "org/clip-base"
    assert card.data.base_model_relation == "adapter" and {"hf_uwm", "peft", "shira", "clip"} <= set(card.data.tags)
    assert "UWMEditor.from_pretrained(" in card.text and "PeftModel.from_pretrained(base, " in card.text
    assert 'CLIPModel.from_pretrained("org/clip-base")' in card.text
    assert "`model.load_adapter(...)` does not load SHiRA adapters" in card.text and "bit for bit" in card.text
    plain = ModelCard((editor.save_pretrained(tmp_path / "plain") / "README.md").read_text())
    assert plain.data.library_name == "hf_uwm" and "PeftModel" not in plain.text and "peft" not in plain.data.tags


def test_cli_export_writes_a_folder_that_loads_both_ways(tmp_path, capsys):
    editor = UWMEditor.from_pretrained("organism", UWMConfig(method="random"))
    editor.calibrate().save_pretrained(tmp_path / "delta")
    assert main(["export", str(tmp_path / "delta"), str(tmp_path / "out"), "--peft"]) == 0
    assert "peft adapter" in capsys.readouterr().out
    folder = tmp_path / "out"
    assert ModelCard.load(folder / "README.md").data.library_name == "peft"
    assert 'from_pretrained("path/to/organism_model")' in (folder / "README.md").read_text()
    base = editor.model.requires_grad_(False)
    with editor.applied() as edited:
        expected = outputs(edited, "clip")
    assert same(outputs(peft_model(base, folder), "clip"), expected)
    again = UWMEditor.from_pretrained(folder)
    assert all(torch.equal(again.delta[n], editor.delta[n]) for n in editor.delta)
    assert main(["export", "organism", str(tmp_path / "model"), "--peft"]) == 1
    assert "is a model, not a delta" in capsys.readouterr().err
