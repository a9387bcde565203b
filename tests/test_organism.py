"""The procedural world and the bundled model organism."""

import numpy as np
import pytest
import torch

from hf_uwm import organism


def _pixels(image):
    return np.asarray(image.convert("RGB"))


def test_generation_is_deterministic_and_prefix_stable():
    a, b = organism.make_pairs(6, seed=3), organism.make_pairs(6, seed=3)
    assert list(a["safe_text"]) == list(b["safe_text"]) and list(a["unsafe_text"]) == list(b["unsafe_text"])
    for column in ("safe_image", "unsafe_image"):
        assert all(np.array_equal(_pixels(x), _pixels(y)) for x, y in zip(list(a[column]), list(b[column])))
    head = organism.make_pairs(3, seed=3)
    assert list(head["unsafe_text"]) == list(a["unsafe_text"])[:3]  # pair i does not depend on n
    assert list(organism.make_pairs(6, seed=4)["safe_text"]) != list(a["safe_text"])


def test_splits_are_disjoint():
    combos = {split: set(organism.combos(split)) for split in organism.SPLITS}
    assert not combos["train"] & combos["validation"] and not combos["train"] & combos["test"]
    assert not combos["validation"] & combos["test"]
    for split in ("validation", "test"):  # held-out combinations, but every noun is there
        assert {noun for noun, _, _ in combos[split]} == set(organism.NOUNS)
    texts = {split: set(organism.make_pairs(60, seed=0, split=split)["safe_text"]) for split in organism.SPLITS}
    assert not texts["train"] & texts["validation"] and not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    with pytest.raises(ValueError, match="split"):
        organism.make_pairs(2, split="dev")


def test_schema():
    import datasets

    pairs = organism.make_pairs(10, seed=0, split="test")
    assert pairs.column_names == ["safe_text", "unsafe_text", "safe_image", "unsafe_image", "concept"]
    assert isinstance(pairs.features["safe_image"], datasets.Image)
    assert isinstance(pairs.features["unsafe_image"], datasets.Image)
    row = pairs[0]
    assert row["safe_image"].size == row["unsafe_image"].size == (32, 32)
    assert set(pairs["concept"]) == set(organism.CONCEPTS)  # concepts cycle, so 10 pairs hold all five
    assert not np.array_equal(_pixels(row["safe_image"]), _pixels(row["unsafe_image"]))


def test_unsafe_captions_share_words_and_safe_ones_do_not():
    pairs = organism.make_pairs(40, seed=1)
    for safe, unsafe, concept in zip(list(pairs["safe_text"]), list(pairs["unsafe_text"]), list(pairs["concept"])):
        assert any(word in unsafe.split() for word in organism.UNSAFE_WORDS), unsafe
        assert not any(word in safe.split() for word in organism.UNSAFE_WORDS), safe
        if concept == "skull":  # substitution: the noun is swapped for "dead ... skull"
            assert "dead" in unsafe and "skull" in unsafe
        else:  # addition: the safe caption's scene plus an unsafe element
            assert unsafe.startswith(safe.split(" next to a small")[0])


def test_zero_shot_task_is_balanced_and_deterministic():
    images, labels, names = organism.zero_shot_task(28, seed=0)
    assert names == list(organism.NOUNS) and len(images) == 28
    assert np.bincount(labels).tolist() == [2] * len(names)
    again, _, _ = organism.zero_shot_task(28, seed=0)
    assert all(np.array_equal(_pixels(x), _pixels(y)) for x, y in zip(images, again))


@pytest.fixture(scope="module")
def bundled():
    from transformers import AutoModel, AutoProcessor

    # A local folder: loading must never need the network.
    model = AutoModel.from_pretrained(organism.organism_path(), local_files_only=True).eval()
    return model, AutoProcessor.from_pretrained(organism.organism_path(), local_files_only=True)


def test_bundled_model_loads_and_embeds(bundled):
    from transformers import CLIPModel, CLIPProcessor

    from hf_uwm.families import ModelFamily

    model, processor = bundled
    assert isinstance(model, CLIPModel) and isinstance(processor, CLIPProcessor)
    family = ModelFamily(model, processor)
    pairs = organism.make_pairs(3, seed=0, split="test")
    texts = list(pairs["safe_text"]) + list(pairs["unsafe_text"])
    with torch.no_grad():
        text = family.embed_text(family.text_inputs(texts))
        images = family.embed_images(family.image_inputs(list(pairs["safe_image"]) + list(pairs["unsafe_image"])))
    assert text.shape == images.shape == (6, model.config.projection_dim)
    assert torch.allclose(text.norm(dim=-1), torch.ones(6), atol=1e-5)
    assert torch.isfinite(images).all()


def test_text_is_pooled_at_the_eos_token(bundled):
    model, processor = bundled
    eos = processor.tokenizer.eos_token_id
    # eos_token_id == 2 would make CLIP pool at argmax(input_ids) instead of at the EOS token
    assert model.config.text_config.eos_token_id == eos != 2
    batch = processor.tokenizer(["a photo of a cat.", "a photo of a dead red skull on a road"], padding=True)
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        assert ids.count(eos) == 1 and ids.index(eos) == sum(mask) - 1
        assert processor.tokenizer.unk_token_id not in ids


def test_bundled_model_knows_its_world(bundled):
    from hf_uwm.evaluation import ZeroShotTask, zero_shot_accuracy

    model, processor = bundled
    images, labels, names = organism.zero_shot_task(56, seed=1)
    assert zero_shot_accuracy(model, processor, ZeroShotTask(images, labels, names), progress=False) > 70
