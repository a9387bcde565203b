"""The evaluation pipeline: embeddings, retrieval, zero-shot, SafeGround from a model, report, compare."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_clip, make_llava, make_pairs, make_siglip, random_image

from hf_uwm.families import ModelFamily
from hf_uwm.evaluation import (QuadrupleEmbeddings, ZeroShotTask, compare, embed_quadruples, evaluate_model,
                               retrieval_recalls, zero_shot_accuracy)
from hf_uwm.metrics import safeground_path
from hf_uwm.metrics.safeground.safeground_core import INPUTS, METRICS


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run faster on one thread, and much faster on a busy machine with few cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_embeddings(n, dim=8, seed=0) -> QuadrupleEmbeddings:
    generator = torch.Generator().manual_seed(seed)
    parts = [torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=-1) for _ in range(4)]
    return QuadrupleEmbeddings(*parts)


def naive_recall(queries, gallery, k):
    hits = 0
    for i, query in enumerate(queries.tolist()):
        scores = [sum(q * g for q, g in zip(query, item)) for item in gallery.tolist()]
        top = sorted(range(len(scores)), key=lambda j: -scores[j])[:k]
        hits += i in top  # the safe counterpart of quadruple i sits at gallery index i
    return 100.0 * hits / len(queries)


def test_retrieval_matches_naive_loop():
    e = random_embeddings(30)
    recalls = retrieval_recalls(e)
    for k in (1, 5, 10):
        assert recalls[f"R@{k} Ts->Is"] == pytest.approx(naive_recall(e.safe_text, e.safe_image, k))
        assert recalls[f"R@{k} Is->Ts"] == pytest.approx(naive_recall(e.safe_image, e.safe_text, k))
        assert recalls[f"R@{k} Tu->[Is;Iu]"] == pytest.approx(
            naive_recall(e.unsafe_text, torch.cat([e.safe_image, e.unsafe_image]), k))
        assert recalls[f"R@{k} Iu->[Ts;Tu]"] == pytest.approx(
            naive_recall(e.unsafe_image, torch.cat([e.safe_text, e.unsafe_text]), k))
    assert len(recalls) == 12


def test_retrieval_counts_ties_against_the_hit():
    x, y = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    diagonal = torch.nn.functional.normalize(x + y, dim=0)
    # Ts0 is as close to Is0 as to Is1 (a tie: miss at R@1); Ts1 is closest to Is1.
    e = QuadrupleEmbeddings(safe_text=torch.stack([diagonal, y]), unsafe_text=torch.stack([x, x]),
                            safe_image=torch.stack([x, y]), unsafe_image=torch.stack([-x, -y]))
    recalls = retrieval_recalls(e, ks=(1, 2))
    assert recalls["R@1 Ts->Is"] == 50.0 and recalls["R@2 Ts->Is"] == 100.0
    # Tu = x for both quadruples; gallery [Is0, Is1, Iu0, Iu1] = [x, y, -x, -y]: Is0 ranks first, Is1 ties -y.
    assert recalls["R@1 Tu->[Is;Iu]"] == 50.0 and recalls["R@2 Tu->[Is;Iu]"] == 50.0


def naive_recall_with_copies(queries, query_keys, gallery, gallery_keys, targets, k):
    """Recall@K written out: items with equal keys are one item; ties rank against the hit."""
    distinct = {}                                      # key -> embedding of its first copy
    for key, item in zip(gallery_keys, gallery.tolist()):
        distinct.setdefault(key, item)
    hits = 0
    for i, query in enumerate(queries.tolist()):
        wanted = {gallery_keys[targets[j]] for j in range(len(queries)) if query_keys[j] == query_keys[i]}
        score = {key: sum(q * g for q, g in zip(query, item)) for key, item in distinct.items()}
        best = max(score[key] for key in wanted)
        better = [key for key in distinct if key not in wanted and score[key] >= best]
        hits += len(better) < k
    return 100.0 * hits / len(queries)


def with_copies(n, seed=0):
    """Random embeddings where many items are exact copies of others, with matching keys."""
    e = random_embeddings(n, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    keys = {}
    for column in ("safe_text", "unsafe_text", "safe_image", "unsafe_image"):
        source = torch.randint(0, n // 3, (n,), generator=generator)   # item i is a copy of item source[i]
        getattr(e, column)[:] = getattr(e, column)[source]
        keys[column] = [f"{column.split('_')[1]}-{column}-{j}" for j in source.tolist()]
    keys["unsafe_image"][:4] = keys["safe_image"][:4]                   # an unsafe image that is a safe one
    e.unsafe_image[:4] = e.safe_image[:4]
    e.content_keys = keys
    return e


@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_with_copies_matches_naive_definition(seed):
    e = with_copies(40, seed)
    recalls, keys, targets = retrieval_recalls(e), e.content_keys, list(range(40))
    directions = {"Ts->Is": ("safe_text", ["safe_image"]), "Is->Ts": ("safe_image", ["safe_text"]),
                  "Tu->[Is;Iu]": ("unsafe_text", ["safe_image", "unsafe_image"]),
                  "Iu->[Ts;Tu]": ("unsafe_image", ["safe_text", "unsafe_text"])}
    for direction, (query, gallery) in directions.items():
        gallery_embeddings = torch.cat([getattr(e, c) for c in gallery])
        gallery_keys = [key for c in gallery for key in keys[c]]
        for k in (1, 5, 10):
            expected = naive_recall_with_copies(getattr(e, query), keys[query], gallery_embeddings, gallery_keys,
                                                targets, k)
            assert recalls[f"R@{k} {direction}"] == pytest.approx(expected), (direction, k)


def test_retrieval_copies_and_exact_ties_by_hand():
    x, y, z = torch.eye(3)
    xy = torch.nn.functional.normalize(x + y, dim=0)
    # Safe images: Is0 = x, Is1 = y and Is2 = Is3 = z, two copies of one image. Safe texts: Ts0 and
    # Ts1 are one caption "a" (= xy); Ts2 = Ts3 = z are two copies of caption "b". Unsafe texts are
    # four captions u0..u3 that all embed to y; unsafe images four images v0..v3 that embed to z.
    e = QuadrupleEmbeddings(safe_text=torch.stack([xy, xy, z, z]), unsafe_text=torch.stack([y, y, y, y]),
                            safe_image=torch.stack([x, y, z, z]), unsafe_image=torch.stack([z, z, z, z]),
                            content_keys={"safe_text": ["a", "a", "b", "b"], "unsafe_text": ["u0", "u1", "u2", "u3"],
                                          "safe_image": ["X", "Y", "Z", "Z"], "unsafe_image": ["v0", "v1", "v2", "v3"]})
    r = retrieval_recalls(e, ks=(1, 2, 6, 7))
    # "a" is paired with X and Y, so both are its targets: its exact tie between them is a hit.
    # "b" retrieves Z, a copy of its target: a hit.
    assert r["R@1 Ts->Is"] == 100.0
    # X finds "a" (0.71) first, Y too, and Z finds "b": the copies of "a" and "b" are one item each.
    assert r["R@1 Is->Ts"] == 100.0
    # Tu = y over the distinct gallery X, Y, Z, v0..v3: Y scores 1, the other six tie at 0. u1 hits;
    # the others' targets (X, Z) tie with five other items and sit behind Y: rank 6, a hit at K = 7 only.
    assert r["R@1 Tu->[Is;Iu]"] == r["R@6 Tu->[Is;Iu]"] == 25.0 and r["R@7 Tu->[Is;Iu]"] == 100.0
    # Iu = z over a, b, u0..u3: b scores 1, the rest tie at 0. Quadruples 2 and 3 hit at K = 1;
    # "a" ties with the four unsafe captions behind b: rank 5.
    assert r["R@1 Iu->[Ts;Tu]"] == r["R@2 Iu->[Ts;Tu]"] == 50.0 and r["R@6 Iu->[Ts;Tu]"] == 100.0
    # Without keys every row is its own item: Ts0 ties between Is0 and Is1 and misses (the tie counts
    # against it), and Ts2's target Is2 ties with its copy Is3, a miss too.
    assert retrieval_recalls(dataclasses.replace(e, content_keys=None), ks=(1,))["R@1 Ts->Is"] == 0.0
    with pytest.raises(ValueError, match="one key per item"):
        dataclasses.replace(e, content_keys={"safe_text": ["a"] * 4})


def copied_pairs(copies=2):
    """Pairs whose captions and images repeat, like the organism's test split: each of 4 pairs `copies` times."""
    return make_pairs(4, seed=2).select([i % 4 for i in range(4 * copies)])


@pytest.mark.parametrize("make_model", [make_clip, make_siglip], ids=["clip", "siglip"])
def test_embeddings_and_retrieval_do_not_depend_on_batch_size(make_model):
    model, processor = make_model()
    dataset = make_pairs(9, seed=3)  # captions of several lengths
    runs = [embed_quadruples(model, processor, dataset, batch_size=b, progress=False) for b in (1, 7, 64)]
    for run in runs[1:]:
        for column in ("safe_text", "unsafe_text", "safe_image", "unsafe_image"):
            torch.testing.assert_close(getattr(run, column), getattr(runs[0], column), rtol=0, atol=1e-6)
        assert run.content_keys == runs[0].content_keys
        assert retrieval_recalls(run) == retrieval_recalls(runs[0])
    # How texts are padded, and that it equals the fixed-length padding: tests/test_padding.py.


def test_copies_are_one_item_and_keys_follow_content():
    model, processor = make_clip()
    e = embed_quadruples(model, processor, copied_pairs(3), batch_size=5, progress=False)
    for column in ("safe_text", "unsafe_text", "safe_image", "unsafe_image"):
        keys = e.content_keys[column]
        assert keys == [keys[i % 4] for i in range(12)] and len(set(keys)) == 4
    assert set(e.content_keys["safe_text"]).isdisjoint(e.content_keys["unsafe_text"])
    # Three copies of each quadruple are one quadruple: the recalls of the set without copies.
    assert retrieval_recalls(e) == retrieval_recalls(embed_quadruples(model, processor, copied_pairs(1),
                                                                      progress=False))


def test_organism_retrieval_does_not_depend_on_batch_size():
    from hf_uwm.organism import load_organism
    from hf_uwm.organism import make_pairs as organism_pairs

    model, processor = load_organism()
    dataset = organism_pairs(40, seed=0, split="test")
    assert len(set(dataset["safe_text"])) < 40  # captions repeat: the case that used to flip with the batch
    runs = [embed_quadruples(model, processor, dataset, batch_size=b, progress=False) for b in (1, 7, 64)]
    for run in runs[1:]:
        for column in ("safe_text", "unsafe_text", "safe_image", "unsafe_image"):
            torch.testing.assert_close(getattr(run, column), getattr(runs[0], column), rtol=0, atol=1e-6)
        assert retrieval_recalls(run) == retrieval_recalls(runs[0])


def hand_similarities(model, processor, dataset):
    """The four similarities as plain dot products of whole-column embeddings (one batch per column)."""
    family = ModelFamily(model, processor)
    with torch.no_grad():
        ts, tu = (family.embed_text(family.text_inputs(dataset[c][:])).double() for c in ("safe_text", "unsafe_text"))
        im_s, im_u = (family.embed_images(family.image_inputs(dataset[c][:])).double()
                      for c in ("safe_image", "unsafe_image"))
    pairs = [(ts, im_s), (ts, im_u), (tu, im_s), (tu, im_u)]
    return {name: [float(a[i] @ b[i]) for i in range(len(dataset))] for name, (a, b) in zip(INPUTS, pairs)}


@pytest.mark.parametrize("make_model", [make_clip, make_siglip], ids=["clip", "siglip"])
def test_pipeline_equals_metric_on_hand_similarities(make_model):
    import evaluate

    model, processor = make_model()
    dataset = make_pairs(7, seed=1)
    report = evaluate_model(model, processor, dataset, batch_size=3, bootstrap=200, seed=0, progress=False)
    sims = hand_similarities(model, processor, dataset)
    expected = evaluate.load(safeground_path()).compute(**sims, bootstrap=200, seed=0)
    intervals = expected.pop("confidence_intervals")
    assert report.safeground == expected
    assert report.intervals == intervals
    assert report.n_quadruples == 7 and report.zero_shot is None
    embedded = embed_quadruples(model, processor, dataset, batch_size=5, progress=False)
    for name, values in embedded.similarities().items():
        np.testing.assert_allclose(values.numpy(), sims[name], atol=1e-5)


def naive_zero_shot(model, processor, task):
    """(accuracy in percent, predicted labels), one prompt and one image at a time."""
    def text(prompt):
        tokens = processor.tokenizer([prompt], return_tensors="pt")
        return torch.nn.functional.normalize(model.get_text_features(**tokens).pooler_output[0], dim=0)

    with torch.no_grad():
        classes = []
        for name in task.class_names:
            mean = torch.stack([text(t.format(name)) for t in task.templates]).mean(0)
            classes.append(mean / mean.norm())
        predictions = []
        for image in task.images:
            pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
            embedding = model.get_image_features(pixel_values=pixels).pooler_output[0]
            scores = [float(embedding @ c) for c in classes]
            predictions.append(scores.index(max(scores)))
    correct = sum(p == label for p, label in zip(predictions, task.labels))
    return 100.0 * correct / len(task.images), predictions


def test_zero_shot_matches_naive_argmax():
    model, processor = make_clip(seed=2)
    rng = np.random.default_rng(0)
    images = [random_image(rng) for _ in range(6)]
    task = ZeroShotTask(images, labels=[0, 1, 2] * 2, class_names=["cat", "dog", "knife"],
                        templates=("a photo of a {}.", "art of the {}."))
    naive, predictions = naive_zero_shot(model, processor, task)
    assert zero_shot_accuracy(model, processor, task, batch_size=4, progress=False) == pytest.approx(naive)
    relabelled = ZeroShotTask(images, predictions, task.class_names, task.templates)
    assert zero_shot_accuracy(model, processor, relabelled, progress=False) == 100.0


def test_zero_shot_renormalises_template_means(monkeypatch):
    import hf_uwm.evaluation as evaluation

    # Class "a": templates embed to x and y (mean (0.5, 0.5), length 0.71); class "b": both to
    # (0.6, 0.8). The image (0.8, 0.6) is closer to a's direction (0.99 vs 0.96), but the unnormalised
    # mean of "a" would score 0.7 against b's 0.96 and flip the prediction.
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.6, 0.8]])
    image = torch.tensor([[0.8, 0.6]])

    def fake_embed(family, items, kind, batch_size, bar, text_length=None):
        return (texts, []) if kind == "text" else (image, [])

    monkeypatch.setattr(evaluation, "_embed", fake_embed)
    task = ZeroShotTask([None], [0], ["a", "b"], templates=("{} one", "{} two"))
    assert zero_shot_accuracy(*make_clip(), task, progress=False) == 100.0


def test_zero_shot_task_from_class_label_dataset():
    import datasets

    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    data = datasets.Dataset.from_dict({"image": [random_image(rng) for _ in range(3)], "label": [0, 1, 1]},
                                      features=features)
    task = ZeroShotTask.from_dataset(data)
    assert task.class_names == ["cat", "dog"] and task.labels == [0, 1, 1] and len(task.images) == 3
    with pytest.raises(ValueError, match="ClassLabel"):
        ZeroShotTask.from_dataset(data.cast_column("label", datasets.Value("int64")))


def test_report_with_zero_shot_prints_converts_and_compares():
    from huggingface_hub.repocard_data import model_index_to_eval_results

    model, processor = make_clip()
    dataset = make_pairs(6)
    rng = np.random.default_rng(0)
    task = ZeroShotTask([random_image(rng) for _ in range(4)], [0, 1, 0, 1], ["cat", "dog"])
    before = evaluate_model(model, processor, dataset, zero_shot=task, bootstrap=100, progress=False)
    with torch.no_grad():
        model.text_model.encoder.layers[0].self_attn.out_proj.weight.mul_(-1)
    after = evaluate_model(model, processor, dataset, zero_shot=task, bootstrap=100, progress=False)

    text = str(before)
    assert all(name in text for name in METRICS) and "R@10 Iu->[Ts;Tu]" in text and "95% CI" in text
    assert json.loads(json.dumps(before.to_dict()))["safeground"] == before.safeground
    index = before.to_model_index("tiny-clip", "tiny-pairs", zero_shot_dataset="tiny-zero-shot")
    name, results = model_index_to_eval_results(index)
    assert name == "tiny-clip" and len(results) == 9 + 12 + 1
    assert {r.dataset_type for r in results} == {"tiny-pairs", "tiny-zero-shot"}

    table = compare({"CLIP": before, "CLIP edited": after})
    gs_row = next(line for line in table.splitlines() if line.startswith("GS "))
    assert f"{after.safeground['GS'] - before.safeground['GS']:+.2f}" in gs_row
    assert "zero-shot acc" in table


@pytest.fixture(scope="module")
def tiny_clip():
    return make_clip()


def test_progress_bar_can_be_silenced(capsys, tiny_clip):
    model, processor = tiny_clip
    embed_quadruples(model, processor, make_pairs(2), progress=False)
    assert "Embedding" not in capsys.readouterr().err
    embed_quadruples(model, processor, make_pairs(2), progress=True)
    assert "Embedding quadruples" in capsys.readouterr().err


def test_no_gradients_and_training_mode_restored(tiny_clip):
    model, processor = tiny_clip
    model.train()
    embeddings = embed_quadruples(model, processor, make_pairs(3), progress=False)
    assert not embeddings.safe_text.requires_grad and model.training
    model.eval()


def test_bad_input_raises_before_model_work():
    dataset = make_pairs(3).remove_columns("unsafe_image")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['unsafe_image'\]"):
        evaluate_model(None, None, dataset)  # no model needed to refuse the set
    with pytest.raises(ValueError, match="empty"):
        evaluate_model(None, None, make_pairs(3).select([]))
    with pytest.raises(ValueError, match="non-negative int"):
        evaluate_model(None, None, make_pairs(3), bootstrap=-5)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_model(None, None, make_pairs(3), batch_size=0)
    with pytest.raises(TypeError, match="ZeroShotTask"):
        evaluate_model(None, None, make_pairs(3), zero_shot={"images": []})


def test_bad_zero_shot_tasks_and_models():
    image = random_image(np.random.default_rng(0))
    with pytest.raises(ValueError, match="one label per image"):
        ZeroShotTask([image, image], [0], ["cat"])
    with pytest.raises(ValueError, match="indices into class_names"):
        ZeroShotTask([image], [3], ["cat", "dog"])
    with pytest.raises(ValueError, match="'{}'"):
        ZeroShotTask([image], [0], ["cat"], templates=("a photo of a cat",))
    with pytest.raises(ValueError, match="class_names"):
        ZeroShotTask([image], [0], [])
    model, processor = make_llava()
    with pytest.raises(TypeError, match="text and vision towers"):
        embed_quadruples(model, processor, make_pairs(2), progress=False)


def test_import_needs_neither_evaluate_nor_datasets():
    code = ("import sys, hf_uwm, hf_uwm.evaluation, hf_uwm.metrics; "
            "print(sorted(m for m in ('evaluate', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_embeddings_given_to_evaluate_model_are_not_computed_again(monkeypatch):
    import hf_uwm.evaluation as evaluation

    model, processor = make_clip()
    dataset = make_pairs(6)
    embeddings = embed_quadruples(model, processor, dataset, progress=False)
    reference = evaluate_model(model, processor, dataset, bootstrap=50, progress=False)
    monkeypatch.setattr(evaluation, "embed_quadruples", lambda *a, **k: pytest.fail("embedded again"))
    given = evaluate_model(model, processor, dataset, bootstrap=50, progress=False, embeddings=embeddings)
    assert given.to_dict() == reference.to_dict()


# --- per-concept reports ---------------------------------------------------------------------------
@pytest.mark.parametrize("make_model", [make_clip, make_siglip])
def test_gs_per_concept_equals_gs_over_that_concepts_rows(make_model):
    from hf_uwm.evaluation import default_subsets

    model, processor = make_model()
    data = make_pairs(12, seed=3)
    data = data.add_column("concept", ["blood", "knife", "gun"] * 4)
    data = data.add_column("lookalike", [i % 5 == 0 for i in range(12)])
    report = evaluate_model(model, processor, data, bootstrap=50, progress=False,
                            subsets=default_subsets(data, unseen_concepts=("gun",)))
    assert list(report.subsets) == ["concept blood", "concept gun", "concept knife", "seen concepts",
                                    "unseen concepts"]
    s = hand_similarities(model, processor, data)
    for name, rows in [("concept gun", [2, 5, 8, 11]), ("seen concepts", [i for i in range(12) if i % 3 != 2])]:
        ts_is, ts_iu, tu_is, tu_iu = (s[name] for name in INPUTS)
        gs = [ts_is[i] > ts_iu[i] and tu_is[i] > tu_iu[i] and ts_is[i] > tu_is[i] and ts_iu[i] > tu_iu[i] for i in rows]
        assert report.subsets[name]["GS"] == pytest.approx(100 * sum(gs) / len(rows))
        assert report.subsets[name]["quadruples"] == len(rows)
        low, high = report.subsets[name]["interval"]
        assert low <= report.subsets[name]["GS"] <= high
    assert set(report.lookalikes) == {"R@1 Is->Ts", "prefers own caption"}
    assert json.loads(json.dumps(report.to_dict()))["subsets"]["unseen concepts"]["quadruples"] == 4
    assert "GS concept gun" in compare({"a": report, "b": report})
    # no concept column: no subsets
    assert evaluate_model(model, processor, make_pairs(4), bootstrap=0, progress=False).subsets == {}
