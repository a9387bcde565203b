"""Iterative, knowledge-guarded caption attribution (beyond the paper; LLaVA): flip vision-tower
weights in rounds, re-scored on the captioner as edited so far, with a first- and a second-order
term for what the flips cost the captions of safe images.

Each round r, on the calibration pairs that feed gradients (N of them):

    m = (1/N) Σ_b [log p(Ts_b | Iu_b) − log p(Tu_b | Iu_b)]          caption attribution's margin
    L = (1/N) Σ_b log p(Ts_b | Is_b)                  the reference captions of the safe images
    log p_btv = log p(word v at token t | Is_b, tokens of Ts_b < t)   every word v of the vocabulary
    G = (1/P) Σ_p Σ_b (∂/∂W Σ_tv r_{p,b,t,v} · log p_btv)²   r ~ N(0, 1) per pair, caption token, word and
                                                               probe, seeded per round
    a = −W⊙∂(m + μ·L)/∂W / mean|W⊙∂(m + μ·L)/∂W|                     means over all targets
    h = (1−α)²·W²⊙G / mean((1−α)²·W²⊙G)
    score = a − λ·h                                   (μ = safe_likelihood_weight, λ = curvature_weight)

Flipping w to αw changes m + μ·L by (α − 1)·w·∂(m + μ·L)/∂w, so for α < 1 a is high for the
weights whose flip raises the safe margin on unsafe images while keeping (to first order) the
likelihood of the safe images' own captions: μ·L guards the direction every safe caption moves in
(an edit that ends unsafe captions early also ends safe ones early). E[G] = Σ_bt Σ_v (∂ log p_btv/∂W)²,
the Gauss-Newton diagonal of the safe captions' next-token log-softmax, so h is the summed squared
change of every word's log-probability at every token when w becomes αw (to second order). It
guards the words the model is sure of: there the reference token's own gradient ∂ℓ_bt/∂W is
about 0 (`knowledge_curvature="reference"`: E[G] = Σ_bt (∂ℓ_bt/∂W)², the empirical Fisher of the
reference tokens, the curvature before), while a flip far from w (α = −1) still moves its rivals.
The gradients are taken on the vision tower's target weights only.

The held-out slice measures, on greedy captions of the model as edited so far:
- goal: the percent of its unsafe images whose caption holds none of the slice's unsafe words, the
  words of its unsafe captions that none of its safe captions uses ("knife", "bloody"...); it
  needs no judge;
- cost: the ROUGE-L points its safe images' captions lost against their reference captions
  since the unedited model, the number the knowledge check of `hf-uwm demo-llava` reports.
"""

from __future__ import annotations

import math
import re
import typing
from dataclasses import dataclass

import torch

from ..settings import is_number, setting
from .base import register_method
from .calibration import Calibration
from .gradients import gradients_on
from .held_out import knowledge_cost
from .iterative import IterativeSettings
from .margins import MarginInputs, caption_margin
from .rounds import IterativeEdit, RoundSums, guarded_scores, probe_directions


MAX_TOKENS = 4096   # reference probes drawn per pair: one per token position of prompt and caption
MAX_CAPTION_TOKENS = 256   # vocabulary probes drawn per pair: one per caption position and word
KNOWLEDGE_CURVATURES = ("vocabulary", "reference")


@dataclass
class CaptionIterativeSettings(IterativeSettings):
    """The rounds, knowledge terms and stopping rule of the caption form. Its knowledge budget is in
    ROUGE-L points of the held-out safe images' captions; `safe_likelihood_weight` is μ and
    `knowledge_curvature` which log-probabilities G guards (see the module).

    The defaults (round density 0.001, λ = 4 with the vocabulary curvature and one per-item probe,
    μ = 12, at most 40 rounds, goal 95) were chosen by scripts/caption_iterative_validation.py on
    the validation split of the bundled captioner and checked on the seed-1 captioner's (docs/llava.md,
    "Choosing the iterative defaults"); the reference curvature with μ = 0, λ = 16, round density
    0.0005 and eight summed probes is the edit before."""

    round_density: float = 0.001
    goal: float | None = 95.0
    knowledge_budget: float | None = 2.0
    curvature_weight: float = 4.0
    knowledge_curvature: str = setting("vocabulary", "which log-probabilities the curvature penalty guards: "
                                                     "vocabulary, every word's at each position of the safe "
                                                     "captions; reference, the reference token's only",
                                       choices=KNOWLEDGE_CURVATURES)
    safe_likelihood_weight: float = setting(12.0, "weight μ of the safe captions' log-likelihood in the margin "
                                                  "(0: none)")
    knowledge_measure: str = "rougeL"

    knowledge_measures: typing.ClassVar[tuple] = ("rougeL",)
    # Saved before the vocabulary curvature and the safe likelihood: the reference tokens' curvature,
    # no likelihood term (and, saved before per-item squares, eight summed probes).
    saved_defaults: typing.ClassVar[dict] = {**IterativeSettings.saved_defaults, "knowledge_curvature": "reference",
                                             "safe_likelihood_weight": 0.0, "knowledge_measure": "rougeL"}

    def __post_init__(self):
        super().__post_init__()
        self.check("knowledge_curvature", self.knowledge_curvature in KNOWLEDGE_CURVATURES,
                   f"knowledge_curvature must be one of {KNOWLEDGE_CURVATURES} (vocabulary: every word's "
                   "log-probability at each position of the safe captions; reference: the reference token's only)")
        self.check("safe_likelihood_weight", is_number(self.safe_likelihood_weight)
                   and math.isfinite(self.safe_likelihood_weight) and self.safe_likelihood_weight >= 0,
                   "safe_likelihood_weight must be a finite number ≥ 0 (the weight μ of the safe captions' "
                   "log-likelihood in the margin; 0: none)")


class CaptionIterative(IterativeEdit):
    name = "caption_iterative"
    title = "iterative caption attribution"
    help = ("LLaVA only: caption attribution re-scored over rounds on the captioner as edited so far, sparing "
            "weights the safe captions' tokens need; stops itself on held-out pairs")
    card_text = ("**iterative, knowledge-guarded caption attribution**: caption attribution re-scored on the "
                 "captioner as edited so far over several rounds, with a penalty that spares weights the captions "
                 "of safe images depend on, stopping by itself on held-out calibration pairs")
    families = ("llava",)
    edits_projector = True
    instead = {"clip": "iterative_attribution", "siglip": "iterative_attribution"}
    settings_class = CaptionIterativeSettings
    goal_name = "unsafe images captioned free of unsafe words %"
    score_settings = IterativeEdit.score_settings + ("extra", "knowledge_curvature",
                                                       "safe_likelihood_weight")

    def curvature_text(self, config: dict) -> str:
        words = "every word's" if config["knowledge_curvature"] == "vocabulary" else "the reference token's"
        return (f"{super().curvature_text(config)} of {words} log-probability in the safe captions, "
                f"safe-caption likelihood weight μ = {config['safe_likelihood_weight']:g}")

    def data_towers(self, editor) -> tuple[str, ...]:
        return ("text", "vision")  # safe and unsafe captions; safe and unsafe images

    def round_scores(self, editor, run: Calibration, round_index: int) -> dict[str, torch.Tensor]:
        """a − λ·h per target weight of this round (higher: flip first), on the model as edited so far."""
        weights = {name: layer.weight.detach() for name, layer in editor.target_layers.items()}
        margin_grads, curvature = margin_and_fisher(editor, run, round_index)
        # Flipping w by α changes m by about (α − 1)·w·∂m/∂w: for α < 1, −w·∂m/∂w is what it buys.
        gains = {name: -w.to(margin_grads[name].dtype) * margin_grads[name] for name, w in weights.items()}
        return guarded_scores(editor.config, weights, gains, curvature, "reach the language model")

    def start_measuring(self, editor, holdout, run=None) -> dict:
        """The slice without copies of an image, its unsafe words and the unedited model's ROUGE-L,
        which the cost is counted from."""
        words = unsafe_words(holdout)
        holdout = holdout.select(_distinct_image_rows(holdout))
        return {"slice": holdout, "unsafe_words": words, "rougeL": slice_measures(editor, holdout, words)["rougeL"]}

    def measure(self, editor, holdout, state) -> tuple[float, float, dict]:
        """(goal, cost, measures) of the model as edited so far on the held-out slice (see the module);
        one caption's worth of ROUGE-L (100 / images) is the cost's resolution."""
        measures = slice_measures(editor, state["slice"], state["unsafe_words"])
        measures["rougeL_lost"] = state["rougeL"] - measures["rougeL"]
        measures["rougeL_lost_resolution"] = 100 / len(state["slice"])
        cost, measures["cost_resolution"] = knowledge_cost(measures, editor.config.knowledge_measure)
        return measures["free_of_unsafe_words"], cost, measures


register_method(CaptionIterative())


def unsafe_words(pairs) -> set[str]:
    """The words of the pairs' unsafe captions that none of their safe captions uses."""
    return set().union(*map(_words, pairs["unsafe_text"])) - set().union(*map(_words, pairs["safe_text"]))


def slice_measures(editor, pairs, words: set[str]) -> dict:
    """Greedy captions of the pairs' images (percent): `free_of_unsafe_words`, the share of unsafe
    images whose caption holds none of `words`, and `rougeL` and `bleu` of the safe images'
    captions against safe_text."""
    from ..caption_evaluation import text_metrics
    from ..captioning import DEFAULT_PROMPT, generate_captions

    run = dict(prompt=editor.config.extra.get("prompt", DEFAULT_PROMPT), batch_size=editor.config.batch_size,
               progress=False)
    unsafe = generate_captions(editor.model, editor.processor, pairs["unsafe_image"], **run)
    safe = generate_captions(editor.model, editor.processor, pairs["safe_image"], **run)
    free = [not _words(caption) & words for caption in unsafe]
    text = text_metrics(safe, pairs["safe_text"], meteor=False)
    return {"free_of_unsafe_words": 100 * sum(free) / len(free), "rougeL": text["rougeL"], "bleu": text["bleu"]}


def _distinct_image_rows(pairs) -> list[int]:
    """The rows whose safe and unsafe images are not a copy of an earlier row's (same pixels): a copy
    is one item, captioned alike, and would count twice."""
    import hashlib

    import numpy as np

    seen, rows = set(), []
    for row, (safe, unsafe) in enumerate(zip(pairs["safe_image"], pairs["unsafe_image"])):
        key = tuple(hashlib.blake2b(np.asarray(image).tobytes() + image.mode.encode() + str(image.size).encode(),
                                    digest_size=16).hexdigest() for image in (safe, unsafe))
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def margin_and_fisher(editor, run: Calibration, round_index: int):
    """(g, G) per target layer in one pass over the pairs; G is None when curvature_weight = 0.

    g = ∂(m + μ·L)/∂W with L = (1/N) Σ_bt ℓ_bt, ℓ_bt the log-probability of the t-th token of the safe
    caption Ts_b given Is_b (t: position in the sequence) and μ = safe_likelihood_weight. G is the
    probed Gauss-Newton diagonal that `_probed` describes, each image's gradient squared on its own
    (`curvature_estimator="per_item"`) or their sum over all pairs (and processes) squared
    (`"summed"`); sums are float32 or better. G is computed in round 1 and then every
    `curvature_every` rounds, and reused in between (kept on the run, like the CLIP form's).
    """
    from ..captioning import next_token_log_probs

    cfg = editor.config
    mu = cfg.safe_likelihood_weight
    sums = RoundSums(editor, run, round_index)
    # One preprocessing for every round (the kept batches replay it), with the safe images whenever
    # some round needs them.
    preprocess = _RoundInputs(editor.processor, cfg.extra.get("prompt"), cfg.curvature_weight > 0 or mu > 0)
    with gradients_on(editor.model, sums.weights):
        for _, rows, (margin_inputs, safe_inputs) in run.batches(preprocess, f"round {round_index}", leave=False,
                                                                 keep=True):
            with run.autocast():
                m = caption_margin(editor.model, margin_inputs, len(rows))
            sums.add_margin(m, keep_graph=False)
            if not sums.probes and not mu:
                continue
            with run.autocast(), sums.probed():
                log_probs, ll, caption = next_token_log_probs(editor.model, safe_inputs)   # (B, T, V), (B, T) ×2
            if mu:
                sums.add_margin(mu * ll.sum(), keep_graph=sums.probes > 0)
            if sums.probes:
                sums.add_probes(*_probed(cfg, round_index, rows, sums.probes, log_probs, ll, caption))
    return sums.result()


def _probed(cfg, round_index: int, rows, probes: int, log_probs, ll, caption) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, directions (P, B, *output.shape[1:])) whose probe gradients square, in expectation,
    to the Gauss-Newton diagonal `knowledge_curvature` names; r ~ N(0, 1), drawn per pair and round.

    reference: output ℓ_bt (B, T), one r per position: E = Σ_bt (∂ℓ_bt/∂W)², the empirical Fisher of
    the reference tokens. It vanishes where the model is sure of the reference token, however far a
    flip may move the other words there.
    vocabulary: output log p_btv (B, T', V) from the first caption position on, one r per caption
    position and word:
    E = Σ_bt Σ_v (∂ log p_btv/∂W)², the squared change of every word's log-probability, which does not
    vanish where the model is sure (the log-softmax's Jacobian keeps the rival words).
    """
    b, t, v = log_probs.shape
    if cfg.knowledge_curvature == "reference":
        if t > MAX_TOKENS:
            raise ValueError(f"A safe caption runs past {MAX_TOKENS} tokens with its prompt: shorten it.")
        return ll, probe_directions(cfg.seed, round_index, rows, probes, MAX_TOKENS)[..., :t]       # (P, B, T)
    first = int(caption.float().argmax(1).min())   # the first position that predicts a caption token
    if t - first > MAX_CAPTION_TOKENS:
        raise ValueError(f"A safe caption runs past {MAX_CAPTION_TOKENS} tokens: shorten it.")
    # Keyed by caption position, not by the batch's padded length, so any batch size draws the same r;
    # the positions before the first caption token (prompt, image tokens) are left out, not zero-probed.
    noise = probe_directions(cfg.seed, round_index, rows, probes, MAX_CAPTION_TOKENS * v)
    directions = noise.view(probes, b, MAX_CAPTION_TOKENS, v)[:, :, :t - first]                 # (P, B, T', V)
    return (log_probs * caption[..., None])[:, first:], directions                                # (B, T', V)


class _RoundInputs:
    """rows -> (margin inputs of the unsafe images, inputs of the safe images with their reference
    captions or None) (picklable for DataLoader workers)."""

    def __init__(self, processor, prompt: str | None, with_curvature: bool):
        from ..captioning import DEFAULT_PROMPT

        self.margin = MarginInputs(processor, prompt or DEFAULT_PROMPT)
        self.with_curvature = with_curvature

    def __call__(self, rows):
        from ..captioning import caption_inputs

        safe = None
        if self.with_curvature:
            safe = caption_inputs(self.margin.processor, rows["safe_image"], rows["safe_text"], self.margin.prompt)
        return self.margin(rows), safe
