"""How texts are padded: one length per run (CLIP: its longest text; SigLIP: the model's fixed length).

Every caller pads all the texts of a run to one length, so an item's input never depends on its
batch, and the result equals padding to the model's fixed length up to float rounding.
"""

import warnings

import datasets
import pytest
import torch
from conftest import make_clip, make_pairs, make_siglip

from hf_uwm import UWMConfig, UWMEditor
from hf_uwm.families import ModelFamily
from hf_uwm.evaluation import ZeroShotTask, embed_quadruples, zero_shot_accuracy
from hf_uwm.methods import Calibration

FAMILIES = pytest.mark.parametrize("make_model", [make_clip, make_siglip], ids=["clip", "siglip"])
FIXED = 32   # the tiny models' max_position_embeddings (77 for a real CLIP, 64 for SigLIP)


def texts_of(dataset):
    return list(dataset["safe_text"]) + list(dataset["unsafe_text"])


def longest(processor, texts) -> int:
    """The longest text in tokens, one text at a time."""
    return max(len(processor.tokenizer(t)["input_ids"]) for t in texts)


def fixed_length_embeddings(model, processor, texts) -> torch.Tensor:
    """(N, D) the texts padded to the model's fixed length, as CLIP and SigLIP were trained."""
    tokens = processor.tokenizer(texts, padding="max_length", max_length=FIXED, return_tensors="pt")
    with torch.no_grad():
        return torch.nn.functional.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)


class TextLengths:
    """The sequence length of every batch that reaches the text tower."""

    def __init__(self, model):
        self.seen = []
        self._handle = model.text_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.seen.append(kwargs["input_ids"].shape[1])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()


@FAMILIES
def test_the_rule_per_family(make_model):
    model, processor = make_model()
    family, texts = ModelFamily(model, processor), texts_of(make_pairs(9, seed=3))
    expected = longest(processor, texts) if make_model is make_clip else FIXED
    assert family.text_length(texts) == expected
    assert family.preprocess_text(texts)["input_ids"].shape == (len(texts), expected)
    assert longest(processor, texts) < FIXED   # so that the rule is put to the test


@FAMILIES
def test_embeddings_equal_the_fixed_length_ones(make_model):
    model, processor = make_model()
    dataset = make_pairs(9, seed=3)
    e = embed_quadruples(model, processor, dataset, batch_size=4, progress=False)
    for column in ("safe_text", "unsafe_text"):
        expected = fixed_length_embeddings(model, processor, list(dataset[column]))
        torch.testing.assert_close(getattr(e, column), expected, rtol=0, atol=1e-6)


def test_every_batch_of_a_run_has_the_runs_length():
    model, processor = make_clip()
    dataset = make_pairs(7, seed=4)
    run_length = longest(processor, texts_of(dataset))
    with TextLengths(model) as lengths:
        embed_quadruples(model, processor, dataset, batch_size=1, progress=False)
    assert lengths.seen == [run_length] * 14
    task = ZeroShotTask([make_pairs(1)["safe_image"][0]], [0], ["cat", "dog"])
    prompts = [t.format(c) for c in task.class_names for t in task.templates]
    with TextLengths(model) as lengths:
        zero_shot_accuracy(model, processor, task, batch_size=1, progress=False)
    assert lengths.seen == [longest(processor, prompts)] * len(prompts)
    for score in ("ratio", "g_unsafe"):   # UWM statistics and gradient methods alike
        with TextLengths(model) as lengths:
            UWMEditor(model, processor, UWMConfig(method=score, batch_size=2, vision_targets=[])).calibrate(
                dataset, progress=False)
        assert lengths.seen == [run_length] * 4, score


class _SecondOfTwo:
    num_processes, process_index, is_main_process = 2, 1, False


def test_every_process_pads_to_the_whole_sets_length():
    model, processor = make_clip()
    dataset = make_pairs(6, seed=4)
    long = "a photo of a dog with a very long caption that no other caption of the set comes close to"
    dataset = datasets.Dataset.from_dict({"safe_text": [long] + list(dataset["safe_text"])[1:],
                                          "unsafe_text": list(dataset["unsafe_text"])})
    run = Calibration(dataset, _SecondOfTwo, ModelFamily(model, processor), batch_size=2, progress=False)
    assert run.batch_bounds() == [(4, 6)]   # the long caption is in the other process's shard
    shapes = [inputs["input_ids"].shape for _, _, inputs in run.batches(run.preprocess("text"), "text")]
    length = longest(processor, [long])
    assert shapes == [(4, length)]


@FAMILIES
def test_calibration_scores_equal_those_of_the_fixed_length_and_of_per_batch_padding(make_model):
    # float64 model: the scores of the three paddings agree to 1e-10, while counting a padding
    # token as a real one would change them by far more.
    model, processor = make_model(dtype=torch.float64)
    dataset, cfg = make_pairs(7, seed=4), UWMConfig(vision_targets=[], batch_size=3)
    scores = {"run": UWMEditor(model, processor, cfg).calibrate(dataset, progress=False).scores}
    for name, length in (("fixed", lambda texts: FIXED), ("per batch", lambda texts: None)):
        editor = UWMEditor(model, processor, cfg)
        own = editor.family.preprocess_text
        editor.family.preprocess_text = lambda texts, length=None, rule=length: own(texts, rule(texts))
        scores[name] = editor.calibrate(dataset, progress=False).scores
    for name in ("fixed", "per batch"):
        assert scores[name].keys() == scores["run"].keys()
        for layer, s in scores["run"].items():
            torch.testing.assert_close(scores[name][layer], s, rtol=1e-10, atol=0, msg=f"{name}: {layer}")


def test_copies_are_one_item_whatever_the_padding_length():
    model, processor = make_clip()
    dataset = make_pairs(4, seed=2).select([0, 1, 2, 3, 0, 1])
    longer = datasets.concatenate_datasets([dataset, make_pairs(1, seed=5).map(
        lambda row: {"unsafe_text": row["unsafe_text"] + " and a long tail of words to pad everyone else"})])
    family = ModelFamily(model, processor)
    assert family.text_length(texts_of(longer)) > family.text_length(texts_of(dataset))
    short, long = (embed_quadruples(model, processor, d, progress=False) for d in (dataset, longer))
    for column in ("safe_text", "unsafe_text"):
        keys = short.content_keys[column]
        assert long.content_keys[column][:6] == keys and keys[4:] == keys[:2] and len(set(keys)) == 4


def test_a_length_that_cannot_hold_the_texts_is_refused():
    family = ModelFamily(*make_clip())
    texts = ["a cat", "a photo of a dog on a street"]
    with pytest.raises(ValueError, match="between their longest"):
        family.preprocess_text(texts, family.text_length(texts) - 1)
    with pytest.raises(ValueError, match="model's 32"):
        family.preprocess_text(texts, FIXED + 1)


@FAMILIES
def test_texts_longer_than_the_model_reads_are_reported_once_with_a_count(make_model):
    model, processor = make_model()
    family = ModelFamily(model, processor)
    fits = "a " * (FIXED - 2)  # with its start and end tokens: exactly the model's length, not cut
    texts = ["a dog", fits, "word " * 500, "cat " * 40]
    with pytest.warns(UserWarning, match=rf"^2 of 4 texts are longer than the model's {FIXED} tokens: only their "
                                         rf"first {FIXED} tokens are read") as caught:
        assert family.text_length(texts) == FIXED
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        family.text_length(texts[:2])
