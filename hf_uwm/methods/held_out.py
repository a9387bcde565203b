"""The held-out slice of the iterative methods: what the stopping rule reads after each round.

Shared by every iterative method: `check_slice` (is the slice large enough to stop by?), the
knowledge measures' titles and `knowledge_cost` (points lost, and what one item of the slice is
worth). The CLIP/SigLIP form's own measures follow: SafeGround, drift and agreement of the slice's
embeddings (`slice_measures`), and zero-shot over a vocabulary of the calibration captions' words
(`vocabulary_measures`); `start_measuring` and `measure` compute them on a model as edited so far.
"""

from __future__ import annotations

import math

import torch

from .calibration import Calibration
from .gradients import cosine
from .pair_images import fixed_images, flat_pairs, safe_image_ids


MIN_HELD_OUT = 4       # below: one pair moves the slice's GS by more than 25 points, no rule can stop by it
COARSE_HELD_OUT = 20   # below: steps of more than 5 points, worth a warning


def check_slice(held: int, pairs: int, cfg):
    """Before any compute: refuse a stopping rule on fewer than `MIN_HELD_OUT` held-out pairs, and warn
    when their GS moves in coarse steps (100/held points) or the goal needs every one of them."""
    from ..data import warn
    from ..hints import hint

    if cfg.goal is None and cfg.knowledge_budget is None:
        return
    off = hint("goal=None, knowledge_budget=None and a number of rounds", "--goal none --knowledge-budget none --rounds N")
    fix = (f"calibrate on at least {math.ceil(COARSE_HELD_OUT / cfg.holdout)} pairs, hold out a larger share, or "
           f"switch the rule off ({off})")
    steps = (f"{held} held-out pairs ({cfg.holdout:g} of {pairs}) move the stopping rule's GS in "
             f"{100 / held:.1f}-point steps")
    if held < MIN_HELD_OUT:
        raise ValueError(f"{steps}, too coarse to stop by: {fix}.")
    if held < COARSE_HELD_OUT:
        warn(f"{steps}, too coarse to mean much: {fix}.")
    elif cfg.goal is not None and cfg.goal < 100 and math.ceil(cfg.goal * held / 100) >= held:
        warn(f"goal {cfg.goal:g} needs every one of the {held} held-out pairs (GS moves in {100 / held:.1f}-point steps): "
             "calibrate on more pairs or set a lower goal.")


def slice_measures(texts: torch.Tensor, images: torch.Tensor, base_texts: torch.Tensor,
                   caption_ids: torch.Tensor | None = None, image_ids: torch.Tensor | None = None) -> dict[str, float]:
    """SafeGround and knowledge measures of the held-out slice, in percent.

    texts, images, base_texts: (2H, D) normalised embeddings of [safe; unsafe] items; base_texts are
    the unedited model's. `drift` is 100·(1 − mean cosine of each safe caption with its unedited
    embedding); `agreement` the percent of distinct safe images whose most similar distinct safe
    caption is the one the unedited model picks (and `agreement_text` the same from the captions'
    side). caption_ids, image_ids (H,): equal for copies (the same model inputs), which count as one
    item: a choice between two copies of one caption is no choice, whatever float rounding says.
    `*_resolution` is one item's worth of each agreement, in points.
    """
    from ..metrics.safeground.safeground_core import compute_safeground

    h = texts.shape[0] // 2
    ts, tu, is_, iu = texts[:h].double(), texts[h:].double(), images[:h].double(), images[h:].double()
    sims = [cosine(a, b).numpy() for a, b in ((ts, is_), (ts, iu), (tu, is_), (tu, iu))]
    measures = compute_safeground(*sims)
    base_ts = base_texts[:h].double()
    measures["drift"] = float(100 * (1 - cosine(ts, base_ts).mean()))
    caption_ids = torch.arange(h) if caption_ids is None else caption_ids
    image_ids = torch.arange(h) if image_ids is None else image_ids
    ts, base_ts, is_ = _distinct(ts, caption_ids), _distinct(base_ts, caption_ids), _distinct(is_, image_ids)
    edited, base = is_ @ ts.T, is_ @ base_ts.T                       # (distinct images, distinct captions)
    measures["agreement"] = float(100 * (edited.argmax(1) == base.argmax(1)).double().mean())
    measures["agreement_text"] = float(100 * (edited.argmax(0) == base.argmax(0)).double().mean())
    measures["agreement_resolution"] = 100 / len(is_)
    measures["agreement_text_resolution"] = 100 / len(ts)
    return measures


MEASURE_TITLES = {"vocabulary": "vocabulary shift (probability moved between the calibration captions' words)",
                  "agreement": "held-out image agreement", "rougeL": "ROUGE-L of the held-out safe images' captions"}
# knowledge_measure -> the slice's measure it reads (`knowledge_cost` counts it as points lost)
KNOWLEDGE_MEASURES = {"vocabulary": "vocabulary_shift", "agreement": "agreement", "rougeL": "rougeL_lost"}
VOCABULARY_TEMPLATE = "a photo of a {}."
VOCABULARY_SIZE = 256   # at most this many prompts embedded per round (one forward, no gradient)
# Words that name nothing an image shows; the others come from the captions themselves.
_FUNCTION_WORDS = frozenset("""a an the of on in at to by with and or is are was were be its it this that these
those for from into onto over under next near beside behind above below up down out off as some one two""".split())


def knowledge_vocabulary(safe_captions, unsafe_captions, size: int = VOCABULARY_SIZE) -> list[str]:
    """The words of what the pairs show, which an edit should keep: the `size` most frequent words
    (lower-cased; ties alphabetical) that more pairs use in both captions than in one only (the scene,
    not what makes it unsafe), less function words and the template words that more than half of the
    safe captions share ("photo"). Sorted, so it never depends on row order."""
    from collections import Counter

    both, one, safe = Counter(), Counter(), Counter()
    for s, u in zip(safe_captions, unsafe_captions):
        s, u = caption_words(s), caption_words(u)
        both.update(s & u)
        one.update(s ^ u)
        safe.update(s)
    n = len(safe_captions)
    words = sorted((w for w in both if both[w] > one[w] and safe[w] <= n / 2 and w not in _FUNCTION_WORDS),
                   key=lambda w: (-both[w], w))[:size]
    if not words:
        raise ValueError("The safe and unsafe captions of the calibration pairs share no word that could name what "
                         "an image shows: the vocabulary knowledge measure needs captions in words (or use "
                         "knowledge_measure='agreement').")
    return sorted(words)


def caption_words(caption: str) -> set[str]:
    import re

    return set(re.findall(r"[^\W\d_]+", caption.lower()))


def vocabulary_measures(images: torch.Tensor, labels: torch.Tensor, words: torch.Tensor, base_words: torch.Tensor,
                        logit_scale: float) -> dict[str, float]:
    """Zero-shot over the vocabulary, edited against unedited, on distinct images (percent).

    images (M, D), words and base_words (V, D) normalised; labels (M, V) bool: the words of each
    image's own safe caption. p, q: the unedited and edited softmax of logit_scale · cosine over the
    words. `vocabulary_mass_lost` = 100 · mean_m Σ_{v in labels_m} (p_mv − q_mv): probability taken
    from an image's own words, a zero-shot accuracy that moves before any top-1 choice does;
    `vocabulary_accuracy_lost`: the points of images whose top word is one of their own lost;
    `vocabulary_shift` = 100 · mean_m TV(p_m, q_m); `vocabulary_agreement` = % of images whose top
    word is unchanged. One image's worth, 100/M, is the resolution of each.
    """
    images, labels = images.double(), labels.double()
    p = torch.softmax(logit_scale * images @ base_words.double().T, dim=1)   # (M, V)
    q = torch.softmax(logit_scale * images @ words.double().T, dim=1)        # (M, V)
    rows = torch.arange(len(images))
    measures = {"vocabulary_mass_lost": float(100 * ((p - q) * labels).sum(1).mean()),
                "vocabulary_accuracy_lost": float(100 * (labels[rows, p.argmax(1)] - labels[rows, q.argmax(1)]).mean()),
                "vocabulary_shift": float(100 * 0.5 * (p - q).abs().sum(1).mean()),
                "vocabulary_agreement": float(100 * (p.argmax(1) == q.argmax(1)).double().mean())}
    return {**measures, **{f"{name}_resolution": 100 / len(images) for name in measures}}


def _vocabulary_state(editor, pairs, slice_image_ids: torch.Tensor | None) -> dict:
    """The vocabulary of `pairs`, its prompts' unedited embeddings, and the distinct safe images it is
    measured on with their words (labels): embedded here, or None with the slice's `slice_image_ids`
    (the slice's images are embedded every round)."""
    family = editor.family
    words = knowledge_vocabulary(pairs["safe_text"], pairs["unsafe_text"])
    state = {"words": family.preprocess_text([VOCABULARY_TEMPLATE.format(w) for w in words]), "word_images": None}
    state["base_words"] = _embed_words(family, state["words"])                                   # (V, D)
    labels = torch.tensor([[w in caption_words(c) for w in words] for c in pairs["safe_text"]])   # (M, V)
    ids = slice_image_ids
    if ids is None:
        run = Calibration(pairs, _AllRows, family, editor.config.batch_size, progress=False)
        if any(run.text_only):
            ids = safe_image_ids(run, _slice_inputs(run, "text"))
            images = flat_pairs(fixed_images(editor, run))[: len(pairs)]                  # (M, D)
        else:
            every = _slice_inputs(run, "vision", safe_only=True)
            ids = _safe_item_ids(every, safe_only=True)
            images = _embed_slice(family, every, "vision", safe_only=True)
        state["word_images"] = _distinct(images, ids)
    # a copy of an image is one image; any caption of it names its words
    state["word_labels"] = torch.zeros(int(ids.max()) + 1, len(words)).index_add_(0, ids, labels.float()) > 0
    state["logit_scale"] = _logit_scale(editor.model)
    return state


def knowledge_cost(measures: dict, knowledge_measure: str) -> tuple[float, float]:
    """(points lost, one item's worth of them) by `knowledge_measure`: a shift or loss counts as it
    is, an agreement from 100."""
    name = KNOWLEDGE_MEASURES[knowledge_measure]
    lost = 100 - measures[name] if name.endswith("agreement") else measures[name]
    return float(lost), float(measures.get(f"{name}_resolution", 0.0))   # none recorded before it existed


def _distinct(rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The first copy of each distinct item: rows (n, D), ids (n,) -> (distinct, D), in order of first copy."""
    from ..evaluation import first_copies

    return rows[first_copies(ids)]


def _safe_item_ids(batches: list, safe_only: bool = False) -> torch.Tensor:
    """(H,) ids of the safe items of per-batch [safe_b; unsafe_b] CPU inputs (or of safe items alone),
    equal for copies."""
    from ..evaluation import content_keys, item_ids

    keys = [key for inputs in batches for key in content_keys(inputs if safe_only else _safe_half(inputs))]
    return item_ids(keys)


def _embed_words(family, inputs: dict) -> torch.Tensor:
    """(V, D) float32 CPU embeddings of the vocabulary's prompts."""
    with torch.no_grad():
        return family.embed_text(family.to_device(inputs)).float().cpu()


def _logit_scale(model) -> float:
    """The model's own softmax temperature (CLIP, SigLIP: exp(logit_scale)); 100 if it has none."""
    scale = getattr(model, "logit_scale", None)
    return float(scale.detach().exp()) if isinstance(scale, torch.Tensor) else 100.0


class _AllRows:
    """One process's view of a slice that every process measures whole (no sharding)."""

    num_processes, process_index, is_main_process = 1, 0, True


def _slice_inputs(run: Calibration, tower: str, safe_only: bool = False) -> list:
    """CPU inputs of [safe; unsafe] items of each batch of the slice (of the safe items alone)."""
    batches = [inputs for _, _, inputs in run.batches(run.preprocess(tower), "held-out pairs", leave=False)]
    return [_safe_half(inputs) for inputs in batches] if safe_only else batches


def _safe_half(inputs: dict) -> dict:
    half = len(next(iter(inputs.values()))) // 2
    return {name: t[:half] for name, t in inputs.items()}


def _embed_slice(family, batches: list, tower: str, safe_only: bool = False) -> torch.Tensor:
    """(2H, D) float32 CPU embeddings of [safe; unsafe] items, from per-batch [safe_b; unsafe_b] inputs
    ((H, D) of the safe items alone, from their inputs alone)."""
    embed = family.embed_text if tower == "text" else family.embed_images
    with torch.no_grad():
        parts = [embed(family.to_device(inputs)).float().cpu() for inputs in batches]        # each (2B, D)
    if safe_only:
        return torch.cat(parts)
    safe = torch.cat([p[: len(p) // 2] for p in parts])
    unsafe = torch.cat([p[len(p) // 2:] for p in parts])
    return torch.cat([safe, unsafe])


def start_measuring(editor, holdout, run: Calibration | None = None) -> dict:
    """Inputs of the slice (kept on the CPU), the unedited model's safe-caption embeddings, the image
    embeddings when no vision weight is edited (they cannot change), and the vocabulary of the
    calibration captions with the images it is measured on (see `vocabulary_measures`)."""
    family = editor.family
    sliced = Calibration(holdout, _AllRows, family, editor.config.batch_size, progress=False)
    state = {"text": _slice_inputs(sliced, "text")}
    state["base"] = _embed_slice(family, state["text"], "text")   # (2H, D)
    state["caption_ids"] = _safe_item_ids(state["text"])
    if any(sliced.text_only):   # then no vision weight is a target (`IterativeAttribution.check_text_only`)
        state["images"] = flat_pairs(fixed_images(editor, sliced))
        state["image_ids"] = safe_image_ids(sliced, state["text"])
    else:
        state["vision"] = _slice_inputs(sliced, "vision")
        state["images"] = None if "vision" in editor.towers else _embed_slice(family, state["vision"], "vision")
        state["image_ids"] = _safe_item_ids(state["vision"])
    # every calibration safe image when the edit cannot move them (their stand-ins where no pair has an
    # image); else the slice's, embedded each round
    pairs = holdout if run is None or "vision" in editor.towers else \
        run.dataset if all(run.text_only) else run.with_images().dataset
    state.update(_vocabulary_state(editor, pairs, state["image_ids"] if pairs is holdout else None))
    return state


def measure(editor, state) -> tuple[float, float, dict]:
    """(GS, knowledge points lost, every measure) of the model as edited so far on the slice `state` holds."""
    family = editor.family
    texts = _embed_slice(family, state["text"], "text")                               # (2H, D)
    images = state["images"]                                                           # (2H, D)
    if images is None:
        images = _embed_slice(family, state["vision"], "vision")
    measures = slice_measures(texts, images, state["base"], state["caption_ids"], state["image_ids"])
    word_images = state["word_images"]
    if word_images is None:
        word_images = _distinct(images[: len(images) // 2], state["image_ids"])
    measures.update(vocabulary_measures(word_images, state["word_labels"], _embed_words(family, state["words"]),
                                        state["base_words"], state["logit_scale"]))
    cost, measures["cost_resolution"] = knowledge_cost(measures, editor.config.knowledge_measure)
    return measures["GS"], cost, measures
