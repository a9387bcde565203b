"""Text-only calibration pairs: loading, validation, the stand-in for a missing image, named concepts."""

import datasets
import pytest
import torch

from conftest import make_clip, make_pairs, make_siglip
from hf_uwm import UWMConfig, UWMEditor
from hf_uwm.concept_pairs import caption_patterns, concept_pairs, read_concepts
from hf_uwm.data import (IMAGE_COLUMNS, TEXT_COLUMNS, concatenate_pairs, load_pairs, text_only_rows,
                         validate_pairs)
from hf_uwm.evaluation import default_subsets

PAIR = TEXT_COLUMNS + IMAGE_COLUMNS


def texts_alone(n=24, seed=0):
    return make_pairs(n, seed=seed, images=False)


def mixed(n_images=8, n_texts=16):
    return concatenate_pairs(make_pairs(n_images), texts_alone(n_texts, seed=1))


# --- loading and validation ----------------------------------------------------------------------
def test_a_two_column_csv_is_text_only_pairs(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("safe_text,unsafe_text\na dog,a dog with a gun\na cat,a cat on fire\n")
    pairs = load_pairs(str(path))
    assert pairs.column_names == ["safe_text", "unsafe_text"] and text_only_rows(pairs) == [True, True]


def test_a_missing_safe_text_is_an_error_a_missing_image_is_not(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("safe_text,unsafe_text\n,a dog with a gun\n")
    with pytest.raises(ValueError, match="'safe_text', row 0: the text is empty"):
        load_pairs(str(path))
    data = mixed()
    checked = validate_pairs(data, PAIR, text_only=True)
    assert text_only_rows(checked) == [False] * 8 + [True] * 16
    with pytest.raises(ValueError, match="'safe_image', row 8: no image"):
        validate_pairs(data, PAIR)   # where text-only pairs are not allowed


def test_half_a_pair_of_images_is_refused():
    data = mixed().to_dict()
    data["unsafe_image"][0] = None
    data = datasets.Dataset.from_dict(data, features=mixed().features)
    with pytest.raises(ValueError, match=r"'unsafe_image', row 0: no image \(the other image of the pair is there"):
        validate_pairs(data, PAIR, text_only=True)


def test_image_columns_are_added_empty_to_a_set_without_them():
    checked = validate_pairs(texts_alone(6), PAIR, text_only=True)
    assert set(IMAGE_COLUMNS) <= set(checked.column_names) and all(text_only_rows(checked))
    assert checked["safe_image"] == [None] * 6


# --- methods ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [make_clip, make_siglip], ids=["clip", "siglip"])
def test_a_text_only_run_never_touches_the_vision_tower(make, monkeypatch):
    model, processor = make()
    vision = {n: p.detach().clone() for n, p in model.vision_model.named_parameters()}

    def refuse(*args, **kwargs):
        raise AssertionError("the vision tower ran")

    monkeypatch.setattr(model.vision_model, "forward", refuse)
    for config in (UWMConfig(method="iterative_attribution", rounds=2, round_density=0.01),
                   UWMConfig(method="ratio", vision_targets=[])):
        editor = UWMEditor(model, processor, config).calibrate(texts_alone(), progress=False)
        assert editor.counts()["text"] > 0 and not any("vision" in name for name in editor.delta)
        with editor.applied():
            pass
    assert all(torch.equal(p, vision[n]) for n, p in model.vision_model.named_parameters())


@pytest.mark.parametrize("make", [make_clip, make_siglip], ids=["clip", "siglip"])
def test_a_missing_image_is_stood_in_for_by_its_captions_unedited_embedding(make):
    from hf_uwm.methods.pair_images import fixed_images as _fixed_images

    model, processor = make()
    data = validate_pairs(mixed(3, 2), PAIR, text_only=True)
    editor = UWMEditor(model, processor, UWMConfig(method="iterative_attribution", batch_size=4))
    from hf_uwm.methods import Calibration
    from accelerate import PartialState

    run = Calibration(data, PartialState(cpu=True), editor.family, 4, progress=False)
    batches = _fixed_images(editor, run)                                      # per batch (2B, D)
    family = editor.family
    with torch.no_grad():
        texts = family.preprocess_text(list(data["safe_text"]) + list(data["unsafe_text"]), length=run.text_length)
        captions = family.embed_text(texts)                                   # (2N, D)
        images = family.embed_images(family.preprocess_images(list(data["safe_image"][:3]) +
                                                              list(data["unsafe_image"][:3])))   # (6, D)
    expected = torch.cat([images[:3], captions[3:5], images[3:], captions[8:]])   # [safe; unsafe] rows
    got = torch.cat([b[: len(b) // 2] for b in batches] + [b[len(b) // 2:] for b in batches])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_uwm_takes_vision_statistics_from_the_pairs_with_images_only():
    model, processor = make_clip()
    images = make_pairs(8)
    both = UWMEditor(model, processor, UWMConfig(method="ratio")).calibrate(mixed(8, 16), progress=False)
    alone = UWMEditor(model, processor, UWMConfig(method="ratio")).calibrate(images, progress=False)
    text = UWMEditor(model, processor, UWMConfig(method="ratio", vision_targets=[])).calibrate(
        concatenate_pairs(images, texts_alone(16, seed=1)).remove_columns(list(IMAGE_COLUMNS)), progress=False)
    for name, score in both.scores.items():
        expected = alone.scores[name] if name.startswith("vision") else text.scores[name]
        torch.testing.assert_close(score, expected)
    assert not torch.equal(both.scores["text_model.encoder.layers.0.self_attn.out_proj"],
                           alone.scores["text_model.encoder.layers.0.self_attn.out_proj"])


def test_methods_that_need_images_refuse_text_only_pairs():
    model, processor = make_clip()
    with pytest.raises(ValueError, match=r"16 of the 24 calibration pairs are text-only .*method='g_unsafe'.*iterative_attribution"):
        UWMEditor(model, processor, UWMConfig(method="g_unsafe")).calibrate(mixed(), progress=False)
    with pytest.raises(ValueError, match="cannot score vision weights: edit the text tower alone"):
        UWMEditor(model, processor, UWMConfig(method="iterative_attribution", vision_targets=["mlp.fc2"])
                  ).calibrate(mixed(), progress=False)
    with pytest.raises(ValueError, match="no image to take the vision tower's statistics from"):
        UWMEditor(model, processor, UWMConfig(method="ratio")).calibrate(texts_alone(), progress=False)


# --- named concepts --------------------------------------------------------------------------------
def captions():
    return datasets.Dataset.from_dict({
        "safe_text": ["a red cat", "a blue dog", "a tree", "a car"],
        "unsafe_text": ["a red cat next to a dangerous knife", "a blue dog covered in blood", "a dead tree",
                        "a car, with a syringe."],
        "concept": ["knife", "blood", "skull", "syringe"]})


def test_caption_patterns_are_the_words_added_before_the_concept():
    assert caption_patterns(captions()) == [" next to a dangerous {concept}", " covered in {concept}", None,
                                            ", with a {concept}."]
    no_column = captions().remove_columns("concept")
    assert caption_patterns(no_column)[0] == " next to a dangerous {concept}"


def test_concept_pairs_name_each_concept_in_the_captions_own_pattern():
    pairs = concept_pairs(captions(), ["gun", "open fire"], per_concept=3, seed=0)
    assert pairs["concept"] == ["gun"] * 3 + ["open fire"] * 3
    patterns = dict(zip(captions()["safe_text"], caption_patterns(captions())))
    for safe, unsafe, concept in zip(pairs["safe_text"], pairs["unsafe_text"], pairs["concept"]):
        assert unsafe == safe + patterns[safe].replace("{concept}", concept)
    assert "a tree" not in pairs["safe_text"]   # its pair swaps a word: no pattern to name a concept in
    assert len(set(pairs["safe_text"][:3])) == 3   # drawn without repeats


def test_concept_pairs_from_a_template_and_their_default_count():
    pairs = concept_pairs(captions(), ["gun"], template="{caption}, and a {concept} beside it")
    assert pairs["unsafe_text"][0].endswith(", and a gun beside it") and len(pairs) == 1   # one pair per concept
    with pytest.raises(ValueError, match=r"must hold \{caption\} and \{concept\}"):
        concept_pairs(captions(), ["gun"], template="a {concept}")
    plain = datasets.Dataset.from_dict({"safe_text": ["a cat"], "unsafe_text": ["a dead cat"]})
    with pytest.raises(ValueError, match="--concept-template"):
        concept_pairs(plain, ["gun"])


def test_read_concepts(tmp_path):
    path = tmp_path / "concepts.txt"
    path.write_text("# what calibration never showed\ngun\n\n  fire \ngun\nnoose\n")
    assert read_concepts(path) == ["gun", "fire", "noose"]
    path.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="names no concept"):
        read_concepts(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_concepts(tmp_path / "missing.txt")


# --- reports ---------------------------------------------------------------------------------------
def test_subsets_split_unseen_concepts_by_naming_and_by_cues():
    data = {"concept": ["knife", "gun", "fire", "noose", "gun", "knife"],
            "cues": [True, False, True, False, True, False]}
    subsets = default_subsets(data, unseen_concepts=("gun", "fire", "noose"), named_concepts=("gun", "fire"))
    assert subsets["unseen, named"] == [False, True, True, False, True, False]
    assert subsets["unseen, not named"] == [False, False, False, True, False, False]
    assert subsets["unseen, named without cues"] == [False, True, False, False, False, False]
    assert subsets["seen concepts without cues"] == [False] * 5 + [True]
    assert "unseen, not named with cues" not in subsets   # empty subsets are left out


def test_a_resumed_run_stands_in_with_the_unedited_captions(tmp_path):
    model, processor = make_clip()
    data = mixed(8, 16)

    def run(rounds, checkpoint_dir=None):
        config = UWMConfig(method="iterative_attribution", rounds=rounds, round_density=0.01, goal=None,
                           knowledge_budget=None, holdout=0.0)
        return UWMEditor(model, processor, config).calibrate(data, progress=False, checkpoint_dir=checkpoint_dir)

    run(2, tmp_path)                     # stopped after two rounds...
    resumed = run(4, tmp_path)           # ...and resumed from their flips
    whole = run(4)
    assert all(torch.equal(resumed.scores[name], whole.scores[name]) for name in whole.scores)


def test_the_held_out_slice_measures_text_only_pairs_against_their_stand_ins():
    from hf_uwm.methods import held_out

    model, processor = make_clip()
    editor = UWMEditor(model, processor, UWMConfig(method="iterative_attribution", batch_size=4))
    slice_ = validate_pairs(mixed(3, 4), PAIR, text_only=True)
    state = held_out.start_measuring(editor, slice_)
    h = len(slice_)
    # the text-only pairs' "images" are the unedited embeddings of their own captions, safe and unsafe
    alone = torch.tensor(text_only_rows(slice_))
    torch.testing.assert_close(state["images"][:h][alone], state["base"][:h][alone])
    torch.testing.assert_close(state["images"][h:][alone], state["base"][h:][alone])
    assert not torch.allclose(state["images"][:h][~alone], state["base"][:h][~alone], atol=1e-3)
    goal, _, measures = held_out.measure(editor, state)
    assert 0 <= goal <= 100 and measures["GS"] == goal


def test_copies_in_the_held_out_slice_are_one_item_whether_pictured_or_stood_in():
    from hf_uwm.methods import held_out

    model, processor = make_clip()
    editor = UWMEditor(model, processor, UWMConfig(method="iterative_attribution", batch_size=3))
    slice_ = concatenate_pairs(make_pairs(2), make_pairs(2), texts_alone(2), texts_alone(2))   # each twice
    state = held_out.start_measuring(editor, validate_pairs(slice_, PAIR, text_only=True))
    assert state["image_ids"].tolist() == [0, 1, 0, 1, 2, 3, 2, 3]


def test_a_subset_of_a_run_keeps_which_of_its_pairs_are_text_only():
    from accelerate import PartialState

    from hf_uwm.methods import Calibration

    model, processor = make_clip()
    data = validate_pairs(mixed(3, 4), PAIR, text_only=True)
    run = Calibration(data, PartialState(cpu=True), UWMEditor(model, processor).family, 4, progress=False)
    assert run.text_only == [False] * 3 + [True] * 4
    rows = [6, 0, 4, 2]
    assert run.subset(rows).text_only == text_only_rows(data.select(rows)) == [True, False, True, False]
