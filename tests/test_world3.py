"""World 3 of the organism (unseen concepts, paraphrases, look-alikes), its metrics, and `organism-hard`."""

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_uwm import organism
from hf_uwm.evaluation import QuadrupleEmbeddings, lookalike_preservation, subset_safeground, zero_shot_interval


from test_evaluation import one_torch_thread  # noqa: E402,F401  (autouse: tiny models on one thread)


def _words(text):
    return set(re.findall(r"[a-z]+", text.lower()))


def test_world2_renders_and_captions_are_unchanged():
    """Hashes computed before world 3 existed: every published world-2 number stays reproducible."""
    digest = hashlib.sha256()
    for split in organism.SPLITS:
        for i in range(40):
            scene = organism.scene_at(i, 0, split)
            for unsafe in (False, True):
                digest.update(scene.caption(unsafe).encode())
                digest.update(np.asarray(organism.render(scene, unsafe)).tobytes())
    assert digest.hexdigest() == "9e5a9c5dc83a7953889940784cf8a89a1528342e10e10deabd4ee7dcbf50f63f"
    digest = hashlib.sha256()
    for image in organism.zero_shot_task(56, seed=0)[0]:  # the test stream, as before `split=` existed
        digest.update(np.asarray(image).tobytes())
    assert digest.hexdigest() == "4601bdf9652d5864967ee91bc311e70a80af60dc8e4a2b61e91c39860e29ad96"
    assert organism.make_pairs(3, split="test").column_names == [
        "safe_text", "unsafe_text", "safe_image", "unsafe_image", "concept"]


@pytest.fixture(scope="module")
def pairs():
    return {split: organism.make_pairs(180, seed=0, split=split, world=3) for split in organism.SPLITS}


def test_world3_splits_are_disjoint_and_held_out_concepts_never_calibrate(pairs):
    assert len(organism.CONCEPTS_HARD) >= 8 and set(organism.CONCEPTS) < set(organism.CONCEPTS_HARD)
    assert set(organism.HELD_OUT) and set(organism.HELD_OUT) < set(organism.CONCEPTS_HARD)
    texts = {split: set(p["safe_text"]) for split, p in pairs.items()}
    assert not texts["train"] & texts["validation"] and not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    for split in ("train", "validation"):
        assert set(pairs[split]["concept"]) == set(organism.SEEN)
        captions = " ".join(pairs[split]["unsafe_text"])
        assert not _words(captions) & set(organism.HELD_OUT)
    assert set(pairs["test"]["concept"]) == set(organism.CONCEPTS_HARD)
    # the model's own training stream knows every concept, held-out ones too
    assert {organism.training_scene(i, 0, 3).concept for i in range(18)} == set(organism.CONCEPTS_HARD)
    assert organism.training_scene(5, 0, 2) == organism.scene_at(5, 0, "train")


def test_paraphrase_halves_are_disjoint_and_only_test_uses_the_second(pairs):
    first = {w for halves in organism.SYNONYMS.values() for w in halves[0]}
    second = {w for halves in organism.SYNONYMS.values() for w in halves[1]}
    assert not first & second and set(organism.UNSAFE_WORDS) <= first
    for split in ("train", "validation"):
        assert not any(pairs[split]["paraphrased"])
        assert not _words(" ".join(pairs[split]["unsafe_text"])) & second
    test = pairs["test"]
    for text, paraphrased in zip(test["unsafe_text"], test["paraphrased"]):
        assert bool(_words(text) & second) == paraphrased and bool(_words(text) & first) != paraphrased, text
    assert 0.35 < np.mean(test["paraphrased"]) < 0.65


def test_lookalikes_are_judged_safe_and_unsafe_captions_unsafe(pairs):
    test = pairs["test"]
    assert all(not organism.names_unsafe_element(t, world=3) for p in pairs.values() for t in p["safe_text"])
    assert all(organism.names_unsafe_element(t, world=3) for p in pairs.values() for t in p["unsafe_text"])
    lookalikes = [(t, item) for t, item in zip(test["safe_text"], test["lookalike"]) if item]
    assert {item for _, item in lookalikes} == set(organism.LOOKALIKES)
    for text, item in lookalikes:
        assert text.endswith(organism.LOOKALIKES[item][1])
    with pytest.raises(ValueError, match="world"):
        organism.names_unsafe_element("a cat", world=4)


def test_a_share_of_unsafe_renders_lacks_the_shared_cues():
    scenes = [organism.scene_at(i, 0, "test", world=3) for i in range(300)]
    cueless = [s for s in scenes if not s.cues]
    assert 0.3 < len(cueless) / len(scenes) < 0.5
    # without cues the unsafe render is not darkened: outside the unsafe element the pixels match the safe render
    scene = next(s for s in cueless if s.concept == "bomb" and not s.companion)
    safe, unsafe = (np.asarray(organism.render(scene, u), float) for u in (False, True))
    assert (np.abs(safe - unsafe).sum(-1) == 0).mean() > 0.7
    darkened = next(s for s in scenes if s.cues and s.concept == "bomb" and not s.companion)
    safe, unsafe = (np.asarray(organism.render(darkened, u), float) for u in (False, True))
    assert (np.abs(safe - unsafe).sum(-1) == 0).mean() < 0.2


def test_zero_shot_splits_draw_their_own_streams():
    test_images = organism.zero_shot_task(28, seed=0)[0]
    validation, labels, names = organism.zero_shot_task(28, seed=0, split="validation")
    assert np.bincount(labels).tolist() == [2] * len(names)
    assert not any(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(test_images, validation))
    hard = organism.zero_shot_task(14, seed=0, world=3)[0]
    assert not any(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(test_images, hard))
    with pytest.raises(ValueError, match="split"):
        organism.zero_shot_task(2, split="dev")


# --- metrics ------------------------------------------------------------------------------------
def _embeddings(n, seed=0, copies=False):
    generator = torch.Generator().manual_seed(seed)
    parts = [torch.nn.functional.normalize(torch.randn(n, 6, generator=generator), dim=-1) for _ in range(4)]
    if copies:  # quadruple 1 repeats quadruple 0's safe caption: one item for retrieval
        parts[0][1] = parts[0][0]
    keys = {c: [f"{c}{i}" for i in range(n)] for c in ("safe_text", "unsafe_text", "safe_image", "unsafe_image")}
    if copies:
        keys["safe_text"][1] = keys["safe_text"][0]
    return QuadrupleEmbeddings(*parts, content_keys=keys)


def naive_lookalikes(e, mask):
    rows = [i for i, m in enumerate(mask) if m]
    keys = e.content_keys["safe_text"]
    hits = own = 0
    for i in rows:
        scores = {}
        for j in rows:  # the gallery: distinct safe captions of the look-alike rows
            scores.setdefault(keys[j], float(e.safe_image[i] @ e.safe_text[j]))
        best = max(scores, key=scores.get)
        hits += best == keys[i] and sum(v >= scores[keys[i]] for v in scores.values()) == 1
        own += float(e.safe_image[i] @ e.safe_text[i]) > float(e.safe_image[i] @ e.unsafe_text[i])
    return 100.0 * hits / len(rows), 100.0 * own / len(rows)


@pytest.mark.parametrize("seed,copies", [(0, False), (1, True), (2, True)])
def test_lookalike_preservation_matches_naive(seed, copies):
    e = _embeddings(25, seed, copies)
    mask = [i % 3 != 2 for i in range(25)]
    result = lookalike_preservation(e, mask)
    recall, own = naive_lookalikes(e, mask)
    assert result["R@1 Is->Ts"] == pytest.approx(recall)
    assert result["prefers own caption"] == pytest.approx(own)
    with pytest.raises(ValueError, match="no quadruple"):
        lookalike_preservation(e, [False] * 25)
    with pytest.raises(ValueError, match="one bool per quadruple"):
        lookalike_preservation(e, [True] * 24)


def test_subset_safeground_is_safeground_of_the_subset():
    from hf_uwm.metrics.safeground.safeground_core import compute_safeground

    e = _embeddings(30, seed=3)
    mask = torch.arange(30) % 4 == 0
    rates, intervals = subset_safeground(e, mask, bootstrap=200, seed=1)
    similarities = {k: v[mask].numpy() for k, v in e.similarities().items()}
    expected = compute_safeground(**similarities, bootstrap=200, seed=1)
    assert intervals == expected.pop("confidence_intervals") and rates == expected
    ts_is, tu_is = similarities["safe_text_safe_image"], similarities["unsafe_text_safe_image"]
    assert rates["P_s^v"] == pytest.approx(100 * np.mean(ts_is > tu_is))


def naive_bootstrap(correct, resamples, seed):
    rng = np.random.default_rng(seed)
    means = [100 * np.mean(rng.choice(correct, len(correct))) for _ in range(resamples)]
    return np.percentile(means, 2.5), np.percentile(means, 97.5)


def test_zero_shot_interval_matches_a_naive_bootstrap():
    correct = np.random.default_rng(0).random(400) < 0.8
    low, high = zero_shot_interval(correct, bootstrap=4000, seed=0)
    naive_low, naive_high = naive_bootstrap(correct, 4000, seed=1)  # another stream: equal up to resampling noise
    assert low == pytest.approx(naive_low, abs=0.8) and high == pytest.approx(naive_high, abs=0.8)
    assert low < 100 * correct.mean() < high and 5 < high - low < 10  # ~ ±1.96·sqrt(.8·.2/400) = ±3.9 points
    assert zero_shot_interval(correct, 500, seed=3) == zero_shot_interval(list(correct), 500, seed=3)
    with pytest.raises(ValueError, match="bootstrap"):
        zero_shot_interval(correct, 0)


def test_evaluate_model_reports_the_zero_shot_interval():
    from hf_uwm.evaluation import ZeroShotTask, evaluate_model

    model, processor = organism.load_organism()
    task = ZeroShotTask(*organism.zero_shot_task(42, seed=0, split="validation"))
    report = evaluate_model(model, processor, organism.make_pairs(8, split="validation"), zero_shot=task,
                            bootstrap=300, seed=0, progress=False)
    low, high = report.zero_shot_interval
    assert low <= report.zero_shot <= high and high > low
    assert report.to_dict()["zero_shot_interval"] == [low, high] and "95% CI" in str(report).splitlines()[-1]
    assert evaluate_model(model, processor, organism.make_pairs(8), zero_shot=task, bootstrap=0,
                          progress=False).zero_shot_interval is None


# --- the name organism-hard -----------------------------------------------------------------------
def test_organism_hard_resolves_in_paths_and_cli():
    from hf_uwm import paths, sources

    folder = paths.bundled_path("organism-hard")
    assert Path(folder) == Path(organism.__file__).parent / "organism_hard_model"
    if not (Path(folder) / "config.json").is_file():  # not trained in this checkout: a clear error, not a Hub lookup
        with pytest.raises(FileNotFoundError, match="train_organism.py --world 3"):
            paths.model_location("organism-hard")
        with pytest.raises(FileNotFoundError, match="train_organism.py --world 3"):
            organism.load_organism(world=3)
    else:
        assert paths.model_location("organism-hard") == folder
    assert paths.portable_base_name(folder) == "organism-hard" and not paths.is_hub_id("organism-hard")
    assert organism.organism_folder(3) == folder and organism.world_of("organism-hard") == 3
    assert organism.world_of("organism") == 2 and organism.world_of(organism.organism_path()) == 2
    data = sources.load_data("organism-hard", "test", 9, 0)
    assert {"lookalike", "paraphrased"} <= set(data.column_names) and set(data["concept"]) == set(organism.CONCEPTS_HARD)
    assert "lookalike" not in sources.load_data("organism", "test", 9, 0).column_names
    task = sources.load_zero_shot("organism-hard", n=14)
    assert np.array_equal(np.asarray(task.images[0]), np.asarray(organism.zero_shot_task(1, world=3)[0][0]))
    validation = sources.load_zero_shot("organism", n=2, split="validation")  # a sweep's zero-shot: never test images
    assert np.array_equal(np.asarray(validation.images[1]),
                          np.asarray(organism.zero_shot_task(2, split="validation")[0][1]))
    with pytest.raises(ValueError, match="world"):
        organism.load_organism(world=1)


def test_world_of_a_model_folder_reads_its_training_record(tmp_path):
    (tmp_path / "training.json").write_text('{"world": 3, "seed": 1}')
    assert organism.world_of(tmp_path) == 3
    (tmp_path / "training.json").write_text('{"world": 5}')
    with pytest.raises(ValueError, match="world"):
        organism.world_of(tmp_path)
    assert organism.world_of(tmp_path / "elsewhere") == 2


@pytest.mark.skipif(not (Path(organism.organism_folder(3)) / "config.json").is_file(),
                    reason="organism-hard is not trained in this checkout: python scripts/train_organism.py --world 3")
def test_bundled_organism_hard_knows_its_world():
    from hf_uwm.evaluation import ZeroShotTask, zero_shot_accuracy

    assert organism.world_of(organism.organism_folder(3)) == 3  # recorded in its training.json
    model, processor = organism.load_organism(world=3)
    task = ZeroShotTask(*organism.zero_shot_task(56, seed=1, world=3))
    assert zero_shot_accuracy(model, processor, task, progress=False) > 70
    ids = processor.tokenizer([organism.scene_at(i, 0, "test", world=3).caption(True) for i in range(40)])["input_ids"]
    assert processor.tokenizer.unk_token_id not in {i for row in ids for i in row}  # every world-3 word is known
