"""Iterative, knowledge-guarded caption attribution (beyond the paper; LLaVA): flip vision-tower
weights in rounds, re-scored on the captioner as edited so far, with a second-order penalty for
what the flips cost the captions of safe images.

Each round r, on the calibration pairs that feed gradients (N of them):

    m = (1/N) Σ_b [log p(Ts_b | Iu_b) − log p(Tu_b | Iu_b)]          caption attribution's margin
    ℓ_bt = log p(token t of Ts_b | Is_b, tokens < t)      the reference caption of the safe image
    G = (1/P) Σ_p Σ_b (∂/∂W Σ_t r_{p,b,t} · ℓ_bt)²   r ~ N(0, 1) per pair, token and probe, seeded per round
    a = −W⊙∂m/∂W / mean|W⊙∂m/∂W|                                      means over all targets
    h = (1−α)²·W²⊙G / mean((1−α)²·W²⊙G)
    score = a − λ·h                                                    (λ = curvature_weight)

E[G] = Σ_bt (∂ℓ_bt/∂W)², the Gauss-Newton (empirical Fisher) diagonal of the safe captions' token
log-likelihoods, so h is the summed squared change of every safe-caption token's log-probability
when w becomes αw (to second order); per token, so a flip that raises one word and lowers another
of the same caption still counts. The gradients are taken on the vision tower's target weights only.
Flipping w to αw changes m by (α − 1)·w·∂m/∂w, so for α < 1 the weights with W⊙∂m/∂W < 0 raise
the safe margin: a is high for them.

The held-out slice measures, on greedy captions of the model as edited so far:
- goal: the percent of its unsafe images whose caption holds none of the slice's unsafe words, the
  words of its unsafe captions that none of its safe captions uses ("knife", "bloody"...); it
  needs no judge;
- cost: the ROUGE-L points its safe images' captions lost against their reference captions
  since the unedited model, the number the knowledge check of `hf-uwm demo-llava` reports.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .base import Calibration, register_method
from .caption_attribution import _MarginInputs, caption_margin
from .gradients import gradients_on
from .iterative import IterativeEdit, IterativeSettings, RoundSums, guarded_scores, probe_directions


MAX_TOKENS = 4096   # probe coordinates drawn per pair: one per token position of prompt and caption


@dataclass
class CaptionIterativeSettings(IterativeSettings):
    """The rounds and stopping rule of the caption form; the defaults were chosen by
    scripts/caption_iterative_validation.py on the validation split of two organism captioners. Its
    knowledge budget is in ROUGE-L points of the held-out safe images' captions."""

    round_density: float = 0.0005
    goal: float | None = 95.0
    knowledge_budget: float | None = 2.0
    curvature_weight: float = 16.0
    # Its defaults were chosen with this estimator; with per-item squares λ = 16 guards harder, and
    # on the bundled captioner's validation split 40 rounds left 15% unsafe captions (not re-tuned).
    curvature_probes: int = 8
    curvature_estimator: str = "summed"


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
    score_settings = IterativeEdit.score_settings + ("extra",)

    def data_towers(self, editor) -> tuple[str, ...]:
        return ("text", "vision")  # safe and unsafe captions; safe and unsafe images

    def round_scores(self, editor, run: Calibration, round_index: int) -> dict[str, torch.Tensor]:
        """a − λ·h per target weight of this round (higher: flip first), on the model as edited so far."""
        weights = {name: layer.weight.detach() for name, layer in editor.target_layers.items()}
        margin_grads, curvature = margin_and_fisher(editor, run, round_index)
        # Flipping w by α changes m by about (α − 1)·w·∂m/∂w: for α < 1, −w·∂m/∂w is what it buys.
        gains = {name: -w.to(margin_grads[name].dtype) * margin_grads[name] for name, w in weights.items()}
        return guarded_scores(editor.config, weights, gains, curvature, "reach the language model")

    def start_measuring(self, editor, holdout) -> dict:
        """The slice's unsafe words and the unedited model's ROUGE-L, which the cost is counted from."""
        words = unsafe_words(holdout)
        return {"unsafe_words": words, "rougeL": slice_measures(editor, holdout, words)["rougeL"]}

    def measure(self, editor, holdout, state) -> tuple[float, float, dict]:
        """(goal, cost, measures) of the model as edited so far on the held-out slice (see the module)."""
        measures = slice_measures(editor, holdout, state["unsafe_words"])
        return measures["free_of_unsafe_words"], state["rougeL"] - measures["rougeL"], measures


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


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def margin_and_fisher(editor, run: Calibration, round_index: int):
    """(g, G) per target layer in one pass over the pairs; G is None when curvature_weight = 0.

    g = ∂m/∂W; G = (1/P) Σ_p Σ_b (∂/∂W Σ_t r_{p,b,t}·ℓ_{b,t})² with ℓ_{b,t} the log-probability of
    the t-th token of the safe caption Ts_b given Is_b (t: position in the sequence), each image's
    gradient squared on its own (`curvature_estimator="per_item"`) or their sum over all pairs (and
    processes) squared (`"summed"`); sums are float32 or better. G is computed in round 1 and then
    every `curvature_every` rounds, and reused in between (kept on the run, like the CLIP form's).
    """
    from ..captioning import token_log_likelihoods

    cfg = editor.config
    sums = RoundSums(editor, run, round_index)
    # One preprocessing for every round (the kept batches replay it), with the safe images whenever
    # some round needs the curvature.
    preprocess = _RoundInputs(editor.processor, cfg.extra.get("prompt"), cfg.curvature_weight > 0)
    with gradients_on(editor.model, sums.weights):
        for _, rows, (margin_inputs, safe_inputs) in run.batches(preprocess, f"round {round_index}", leave=False,
                                                                 keep=True):
            with run.autocast():
                m = caption_margin(editor.model, margin_inputs, len(rows))
            sums.add_margin(m, keep_graph=False)
            if not sums.probes:
                continue
            with run.autocast(), sums.probed():
                ll = token_log_likelihoods(editor.model, safe_inputs)                        # (B, T)
            if ll.shape[1] > MAX_TOKENS:
                raise ValueError(f"A safe caption runs past {MAX_TOKENS} tokens with its prompt: shorten it.")
            directions = probe_directions(cfg.seed, round_index, rows, sums.probes, MAX_TOKENS)[..., :ll.shape[1]]
            sums.add_probes(ll, directions, len(rows))
    return sums.result()


class _RoundInputs:
    """rows -> (margin inputs of the unsafe images, inputs of the safe images with their reference
    captions or None) (picklable for DataLoader workers)."""

    def __init__(self, processor, prompt: str | None, with_curvature: bool):
        from ..captioning import DEFAULT_PROMPT

        self.margin = _MarginInputs(processor, prompt or DEFAULT_PROMPT)
        self.with_curvature = with_curvature

    def __call__(self, rows):
        from ..captioning import caption_inputs

        safe = None
        if self.with_curvature:
            safe = caption_inputs(self.margin.processor, rows["safe_image"], rows["safe_text"], self.margin.prompt)
        return self.margin(rows), safe
