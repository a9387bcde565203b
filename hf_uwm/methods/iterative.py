"""Iterative, knowledge-guarded attribution (beyond the paper): flip weights in rounds, re-scoring
the model as edited so far, with a second-order penalty for what the flips cost the safe captions,
until a held-out slice of the calibration pairs says the edit has gone far enough.

Each round r, with the margin m = (1/N) Σ_b [2·s(Tu,Iu) − s(Tu,Is) − s(Ts,Iu)] of attribution:

    g = ∂m/∂W                                         one backward over the pairs
    G = (1/P) Σ_p Σ_b (∂/∂W r_{p,b} · T(Ts_b))²       r ~ N(0, I) per caption and probe, seeded per round
    a = W⊙g / mean|W⊙g|,   h = (1−α)²·W²⊙G / mean((1−α)²·W²⊙G)      means over all target weights
    score = a − λ·h

G is a Gauss-Newton diagonal of the normalised safe-caption embeddings T (E[(Σ_k r_k J_k)²] = Σ_k J_k²),
and h the second-order change of T when w becomes αw. Each caption's gradient is squared on its own
(`curvature_estimator="per_item"`): one probe's backward then estimates G with less noise than eight
probes whose gradients are summed over all captions before the square (`"summed"`, the estimator
before, kept to reproduce old configs). The top ⌈δ·n⌉ weights not flipped yet (over all target
layers jointly with a shared budget, else per layer) are multiplied by α; the delta is
the union of the rounds. The scores kept are the round in which each weight was flipped (0: never),
so any number of rounds up to the calibrated one is re-selected without a forward pass.

The round loop and the curvature sums are `rounds.py`'s (shared with the caption form), the
held-out slice's measures `held_out.py`'s.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass

import torch

from ..hints import hint
from ..settings import MethodSettings, is_int, is_number, setting
from . import held_out
from .base import register_method
from .calibration import Calibration
from .gradients import gradients_on, pair_preprocess
from .margins import preference_margin
from .pair_images import fixed_images
from .rounds import CURVATURE_ESTIMATORS, IterativeEdit, RoundSums, guarded_scores, probe_directions


@dataclass
class IterativeSettings(MethodSettings):
    """At most `rounds` rounds, each flipping the top `round_density` of the target weights not flipped
    yet, by a − curvature_weight · h (`curvature_probes` random probes per item estimate the curvature
    by `curvature_estimator`, anew every `curvature_every` rounds). A seeded `holdout` share of the
    calibration pairs never feeds a gradient; after each round the edit stops once their goal
    measure reaches `goal` (percent) or keeps the round before the first that costs more than
    `knowledge_budget` points. `goal=None` and `knowledge_budget=None` switch either half off; with
    both off and `holdout=0` every round runs. The defaults of iterative attribution (λ, goal,
    budget) were chosen on validation splits of three organisms (`scripts/stopping_defaults.py`)."""

    rounds: int = setting(40, "the most rounds of re-scoring and flipping (the stopping rule usually ends it "
                              "sooner; a sweep calibrates the most and re-selects fewer)", positive=True, grid=True,
                          calibrate_most=True)
    round_density: float = setting(0.002, "share of all target weights flipped per round", symbol="δ", grid=True)
    goal: float | None = setting(95.0, "stop once the held-out pairs' goal measure reaches this percent",
                                 none="never for the goal", example="a percentage such as 95")
    knowledge_budget: float | None = setting(12.0, "stop before the held-out pairs' knowledge measure loses more "
                                                   "than this many points", none="no budget",
                                             example="a number of points such as 2")
    holdout: float = setting(0.2, "share of the calibration pairs held out of the gradients to measure the "
                                  "stopping rule on")
    curvature_weight: float = setting(4.0, "weight of the knowledge-curvature penalty (0: none)", symbol="λ",
                                      grid=True)
    curvature_probes: int = setting(1, "random probes per item of the knowledge curvature", positive=True)
    curvature_every: int = setting(1, "rounds between two estimates of the knowledge curvature", positive=True)
    curvature_estimator: str = setting("per_item", "per_item: each item's probe gradient squared; summed: the "
                                                   "probe gradients summed over all items, then squared",
                                       choices=CURVATURE_ESTIMATORS)
    knowledge_measure: str = setting("vocabulary", "what the knowledge budget counts: vocabulary, probability moved "
                                                   "between the words of the calibration captions, on their images; "
                                                   "agreement, held-out images matching another held-out caption "
                                                   "best; rougeL, the held-out safe images' captions (LLaVA)",
                                     choices=("vocabulary", "agreement", "rougeL"))

    #: the held-out knowledge measures this form records (`knowledge_measure` picks the one the budget reads)
    knowledge_measures: typing.ClassVar[tuple] = ("vocabulary", "agreement")
    # Saved before per-item squares (which cost one probe's backward where the sum needed eight), and
    # before the vocabulary measure.
    saved_defaults: typing.ClassVar[dict] = {"curvature_estimator": "summed", "curvature_probes": 8,
                                             "knowledge_measure": "agreement"}

    def __post_init__(self):
        check = self.check
        check("rounds", is_int(self.rounds) and self.rounds >= 1, "rounds must be a positive integer")
        check("round_density", is_number(self.round_density) and 0 < self.round_density <= 1,
              "round_density must be a number in (0, 1] (the fraction of target weights flipped per round)")
        check("round_density", not is_int(self.rounds) or self.rounds * self.round_density <= 1,
              f"rounds × round_density = {self.rounds} × {self.round_density} must be at most 1 "
              "(there are no more weights to flip)")
        check("curvature_weight", is_number(self.curvature_weight) and math.isfinite(self.curvature_weight)
              and self.curvature_weight >= 0, "curvature_weight must be a finite number ≥ 0 (0: no penalty)")
        check("goal", self.goal is None or (is_number(self.goal) and 0 < self.goal <= 100),
              "goal must be a percentage in (0, 100] (the held-out measure at which the edit stops) or None")
        check("knowledge_budget", self.knowledge_budget is None or (is_number(self.knowledge_budget)
                                                                    and self.knowledge_budget >= 0),
              "knowledge_budget must be a number of points ≥ 0 (what the held-out knowledge measure may lose) "
              "or None")
        check("holdout", is_number(self.holdout) and 0 <= self.holdout < 1,
              "holdout must be a fraction in [0, 1) of the calibration pairs kept out of the gradients")
        check("holdout", self.holdout > 0 or (self.goal is None and self.knowledge_budget is None),
              "holdout=0 leaves nothing to measure the stopping rule on: set goal=None and "
              "knowledge_budget=None too, or a holdout such as 0.2")
        check("curvature_probes", is_int(self.curvature_probes) and self.curvature_probes >= 1,
              "curvature_probes must be a positive integer (random probes of the knowledge curvature)")
        check("curvature_estimator", self.curvature_estimator in CURVATURE_ESTIMATORS,
              f"curvature_estimator must be one of {CURVATURE_ESTIMATORS} (per_item: each item's probe gradient "
              "squared; summed: the probe gradients summed over all items, then squared)")
        check("knowledge_measure", self.knowledge_measure in self.knowledge_measures,
              f"knowledge_measure must be one of {self.knowledge_measures} (what the knowledge budget is counted in)")
        check("curvature_every", is_int(self.curvature_every) and self.curvature_every >= 1,
              "curvature_every must be a positive integer (rounds between two estimates of the curvature)")


class IterativeAttribution(IterativeEdit):
    """The CLIP/SigLIP form: margin on both towers' embeddings, curvature of the safe-caption embeddings."""

    name = "iterative_attribution"
    title = "iterative attribution"
    help = ("recommended for CLIP/SigLIP: attribution re-scored over rounds on the model as edited so far, sparing "
            "weights the safe captions need; sets its own strength on held-out pairs (--goal, --knowledge-budget, "
            "--holdout, at most --rounds)")
    card_text = ("**iterative, knowledge-guarded attribution**: attribution (W ⊙ ∂m/∂W of the unsafe-over-safe "
                 "preference m) re-scored on the model as edited so far over several rounds, each round taking a "
                 "small share of weights from one budget shared across layers, with a curvature penalty that spares "
                 "weights the model's knowledge of safe captions depends on")
    families = ("clip", "siglip")   # its margin and curvature need the text tower
    instead = {"llava": "caption_iterative"}
    goal_name = "GS"
    settings_class = IterativeSettings
    needs_both_towers = True
    text_only_pairs = True   # a missing image is stood in for by its captions' unedited embeddings (pair_images.py)

    def default_targets(self, family, tower: str) -> tuple[str, ...]:
        return ("mlp.fc2",) if tower == "text" else ()

    def check_text_only(self, editor, count: int, total: int):
        if "vision" in editor.towers:
            alone = hint("vision_targets=[]", "--towers text")
            raise ValueError(f"{count} of the {total} calibration pairs are text-only (no images); their images are "
                             "stood in for by the unedited embeddings of their captions, which cannot score vision "
                             f"weights: edit the text tower alone ({alone}) or give those pairs images.")

    def prepare(self, editor, run: Calibration):
        fixed_images(editor, run)   # before any flip: a stand-in for a missing image is the unedited caption

    def round_scores(self, editor, run: Calibration, round_index: int) -> dict[str, torch.Tensor]:
        weights = {name: layer.weight.detach() for name, layer in editor.target_layers.items()}
        margin_grads, curvature = margin_and_curvature(editor, run, round_index)
        gains = {name: w.to(margin_grads[name].dtype) * margin_grads[name] for name, w in weights.items()}
        return guarded_scores(editor.config, weights, gains, curvature,
                              "the text or image embeddings pass through")

    # --- the held-out slice ---------------------------------------------------------------------
    def start_measuring(self, editor, holdout, run: Calibration | None = None) -> dict:
        return held_out.start_measuring(editor, holdout, run)

    def measure(self, editor, holdout, state) -> tuple[float, float, dict]:
        return held_out.measure(editor, state)


register_method(IterativeAttribution())


def margin_and_curvature(editor, run: Calibration, round_index: int):
    """(g, G) per target layer in one pass over the pairs; G is None when curvature_weight = 0.

    g = ∂m/∂W; G = (1/P) Σ_p Σ_b (∂/∂W r_{p,b}·T(Ts_b))² (per item), or with the sum over all pairs
    (and processes) taken before the square (summed); sums are float32 or better. The safe captions'
    forward serves the margin and the probes. When no vision weight is a target,
    images are embedded once per run. G is computed in round 1 and then every `curvature_every`
    rounds, and reused in between (kept on the run).
    """
    cfg, family = editor.config, editor.family
    sums = RoundSums(editor, run, round_index)
    images = fixed_images(editor, run)
    preprocess = run.preprocess("text") if images is not None else pair_preprocess(run)
    with gradients_on(editor.model, sums.weights):
        for i, rows, inputs in run.batches(preprocess, f"round {round_index}", leave=False, keep=True):
            b = len(rows)
            text_inputs = family.to_device(inputs[0] if images is None else inputs)
            with run.autocast():
                # Safe and unsafe captions go forward apart, so the probes backpropagate through the
                # safe ones only (the padding is fixed per run: an item's embedding is the same).
                with sums.probed():
                    safe = family.embed_text({k: v[:b] for k, v in text_inputs.items()})     # (B, D)
                unsafe = family.embed_text({k: v[b:] for k, v in text_inputs.items()})       # (B, D)
                batch_images = (family.embed_images(family.to_device(inputs[1])) if images is None
                                else images[i])                                               # (2B, D)
            sums.add_margin(preference_margin(safe, unsafe, batch_images[:b], batch_images[b:]),
                            keep_graph=sums.probes > 0)
            if sums.probes:
                sums.add_probes(safe, probe_directions(cfg.seed, round_index, rows, sums.probes, safe.shape[-1]))
    return sums.result()
