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

`IterativeEdit` is the round loop any such method shares: the held-out slice, flipping and
restoring, checkpoints, the trajectory and the stopping rule of `stopping.py`.
"""

from __future__ import annotations

import json
import math
import typing
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..settings import MethodSettings, is_int, is_number, setting
from ..selection import keyed_generator, select_shared, select_top
from .attribution import preference_margin
from .base import (Calibration, Method, all_reduce_, broadcast_from_main, read_checkpoint, register_method,
                   save_checkpoint, scale_)
from .gradients import accumulation_dtype, cosine, gradients_on, pair_preprocess
from .stopping import Step, from_records, holdout_rows, stopping_round, summary, to_records


CURVATURE_ESTIMATORS = ("per_item", "summed")


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


class IterativeEdit(Method):
    """Edits in rounds on the model as edited so far; subclasses score one round and measure the slice."""

    settings_class = IterativeSettings
    #: what the held-out goal measures, for the model card
    goal_name = ""
    resumable = True
    shared_budget_default = True
    selection_settings = ("rounds", "goal", "knowledge_budget")
    targets_can_shrink = False   # the rounds ranked all target layers together
    #: what every round's choice and recorded cost depend on (not goal, knowledge_budget or rounds: they say
    #: when to stop)
    score_settings = ("method", "text_targets", "vision_targets", "alpha", "round_density", "shared_budget", "seed",
                      "holdout", "curvature_weight", "curvature_probes", "curvature_every", "curvature_estimator",
                      "knowledge_measure")

    def round_scores(self, editor, run: Calibration, round_index: int) -> dict[str, torch.Tensor]:
        """Per-weight scores of this round on the model as edited so far (higher: flip first)."""
        raise NotImplementedError

    def start_measuring(self, editor, holdout, run: Calibration | None = None):
        """What `measure` needs from the unedited model (called before any flip); `run` is the whole
        calibration, held-out pairs included."""
        raise NotImplementedError

    def measure(self, editor, holdout, state) -> tuple[float, float, dict]:
        """(goal %, knowledge points lost, other measures) on the held-out pairs, as edited so far."""
        raise NotImplementedError

    # --- selection -----------------------------------------------------------------------------
    def select(self, scores: dict[str, torch.Tensor], config, trajectory=None) -> dict[str, torch.Tensor]:
        """The weights flipped in the rounds that `kept_rounds` keeps."""
        kept, _ = self.kept_rounds(scores, config, trajectory)
        return {name: ((s.flatten() > 0) & (s.flatten() <= kept)).nonzero().squeeze(1) for name, s in scores.items()}

    def kept_rounds(self, scores, config, trajectory) -> tuple[int, str | None]:
        """(rounds kept, why it stopped): by the stopping rule when a trajectory was recorded, else `rounds`.

        `scores` may be empty (a loaded delta): then `rounds` is not checked against the calibration."""
        if trajectory is None:
            calibrated = max((int(s.max()) for s in scores.values()), default=config.rounds)
            if config.rounds > calibrated:
                raise ValueError(f"rounds={config.rounds} but only {calibrated} rounds were calibrated: calibrate "
                                 "again with more rounds (a checkpoint_dir lets a run continue where it stopped).")
            return config.rounds, None
        kept, reason = stopping_round(trajectory, config.goal, config.knowledge_budget, config.rounds)
        if kept == 0:
            raise ValueError(f"The first round already costs {trajectory[1].cost:.2f} points of "
                             f"{MEASURE_TITLES[config.knowledge_measure]}, more than knowledge_budget="
                             f"{config.knowledge_budget}: raise the budget, or lower round_density to edit in smaller "
                             "steps.")
        if reason is None:
            raise ValueError(f"The calibration stopped after round {trajectory[-1].round}, before these settings "
                             f"(rounds={config.rounds}, goal={config.goal}, knowledge_budget="
                             f"{config.knowledge_budget}) would stop: calibrate again with them.")
        return kept, reason

    def selection_text(self, config: dict, stop: dict | None) -> str:
        config = {**self.settings_class.saved_defaults, **config}   # a record saved before newer settings
        rounds = summary(stop["rounds"], stop["reason"], stop["max_rounds"]) if stop else f"{config['rounds']} rounds"
        measure = MEASURE_TITLES[config["knowledge_measure"]]
        rule = (f" (held-out {config['holdout']:g} of the calibration pairs: goal {self.goal_name} ≥ {config['goal']}, "
                f"knowledge budget {config['knowledge_budget']} points of {measure})" if stop and stop.get("reason") else "")
        return (f"iterative, {rounds}{rule}; rounds of {config['round_density']:g} of the target weights "
                f"({'one budget over all layers' if config['shared_budget'] else 'per layer'}), "
                f"curvature weight λ = {config['curvature_weight']:g}, {self.curvature_text(config)}")

    def curvature_text(self, config: dict) -> str:
        """How the curvature was estimated, for the card."""
        probes = config["curvature_probes"]
        per = "per item" if config["curvature_estimator"] == "per_item" else "summed over the pairs"
        return f"{probes} curvature probe{'s' if probes != 1 else ''} ({per})"

    # --- the round loop ------------------------------------------------------------------------
    def calibrate(self, editor, run: Calibration) -> dict[str, torch.Tensor]:
        cfg, weights = editor.config, {name: layer.weight for name, layer in editor.target_layers.items()}
        kept_rows, held_rows = holdout_rows(len(run.dataset), cfg.holdout, cfg.seed)
        check_slice(len(held_rows), len(run.dataset), cfg)
        train = run.subset(kept_rows) if held_rows else run
        holdout = run.dataset.select(held_rows) if held_rows else None
        flipped = {name: torch.zeros(w.numel(), dtype=torch.int32, device=w.device) for name, w in weights.items()}
        path, key = train.checkpoint("iterative", editor.fingerprint,
                                     {k: getattr(cfg, k) for k in self.score_settings + ("batch_size",)})
        done, trajectory = self._resume(path, key, flipped, cfg.rounds, train)
        originals = {name: w.detach().clone() for name, w in weights.items()}
        try:
            state = self.start_measuring(editor, holdout, run) if holdout is not None else None
            if holdout is not None and not trajectory:   # round 0: the unedited model
                trajectory = [self._step(editor, holdout, state, 0, flipped)]
            for name, w in weights.items():
                scale_(w, (flipped[name] > 0).nonzero().squeeze(1), cfg.alpha)
            bar = tqdm(range(done + 1, cfg.rounds + 1), desc="rounds", initial=done, total=cfg.rounds,
                       unit="round", disable=not (run.progress and run.state.is_main_process))
            for r in bar:
                if trajectory and stopping_round(trajectory, cfg.goal, cfg.knowledge_budget, cfg.rounds)[1]:
                    break
                for name, idx in self._choose(editor, train, r, flipped).items():
                    flipped[name][idx] = r
                    scale_(weights[name], idx, cfg.alpha)
                if holdout is not None:
                    trajectory.append(self._step(editor, holdout, state, r, flipped))
                    bar.set_postfix(goal=f"{trajectory[-1].goal:.1f}", cost=f"{trajectory[-1].cost:.2f}")
                if path:
                    kept_state = {f"curvature/{n}": c for n, c in (train.curvature or {}).items()
                                  if cfg.curvature_every > 1}
                    save_checkpoint(path, key, {**flipped, **kept_state}, rounds_done=r,
                                    trajectory=json.dumps(to_records(trajectory)))
        finally:
            with torch.no_grad():
                for name, w in weights.items():
                    w.copy_(originals[name])
        run.trajectory = trajectory
        return {name: f.view(weights[name].shape) for name, f in flipped.items()}

    def _step(self, editor, holdout, state, round_index: int, flipped) -> Step:
        """The slice's measures after `round_index` rounds, the main process's on every process."""
        with torch.no_grad():
            goal, cost, measures = self.measure(editor, holdout, state)
        step = Step(round_index, float(goal), float(cost), sum(int((f > 0).sum()) for f in flipped.values()),
                    measures)
        return broadcast_from_main(step)

    def _resume(self, path, key, flipped: dict[str, torch.Tensor], rounds: int, run: Calibration
                ) -> tuple[int, list | None]:
        """Restore the rounds a checkpoint holds (at most `rounds`); (rounds done, trajectory so far).

        The curvature kept between its refreshes is restored on `run` (a run that stops earlier
        than the checkpoint runs no further round, so it never needs it).
        """
        saved = read_checkpoint(path, key)
        if saved is None:
            return 0, None
        tensors, meta = saved
        done = min(int(meta["rounds_done"]), rounds)
        curvature = {name.split("/", 1)[1]: t for name, t in tensors.items() if name.startswith("curvature/")}
        if curvature:
            run.curvature = {name: t.to(flipped[name].device) for name, t in curvature.items()}
        for name, f in flipped.items():
            restored = tensors[name].to(f.device)   # the round of each weight's flip
            f.copy_(torch.where(restored <= done, restored, 0))
        steps = from_records(json.loads(meta.get("trajectory", "[]"))) or []
        return done, [s for s in steps if s.round <= done] or None

    def _choose(self, editor, run: Calibration, round_index: int, flipped) -> dict[str, torch.Tensor]:
        """The indices per layer that round `round_index` flips, the same on every process."""
        cfg = editor.config
        scores = self.round_scores(editor, run, round_index)
        for name, s in scores.items():
            s.view(-1)[flipped[name] > 0] = -math.inf
        if cfg.shared_budget:
            count = math.ceil(cfg.round_density * sum(s.numel() for s in scores.values()))
            chosen = select_shared(scores, lambda s, name: select_top(s, count, name))
        else:
            chosen = {name: select_top(s, math.ceil(cfg.round_density * s.numel()), name)
                      for name, s in scores.items()}
        return broadcast_from_main(chosen)


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
    needs_both_towers = True

    def default_targets(self, family, tower: str) -> tuple[str, ...]:
        return ("mlp.fc2",) if tower == "text" else ()

    def round_scores(self, editor, run: Calibration, round_index: int) -> dict[str, torch.Tensor]:
        weights = {name: layer.weight.detach() for name, layer in editor.target_layers.items()}
        margin_grads, curvature = margin_and_curvature(editor, run, round_index)
        gains = {name: w.to(margin_grads[name].dtype) * margin_grads[name] for name, w in weights.items()}
        return guarded_scores(editor.config, weights, gains, curvature,
                              "the text or image embeddings pass through")

    # --- the held-out slice ---------------------------------------------------------------------
    def start_measuring(self, editor, holdout, run: Calibration | None = None) -> dict:
        """Inputs of the slice (kept on the CPU), the unedited model's safe-caption embeddings, the image
        embeddings when no vision weight is edited (they cannot change), and the vocabulary of the
        calibration captions with the images it is measured on (see `vocabulary_measures`)."""
        family = editor.family
        sliced = Calibration(holdout, _AllRows, family, editor.config.batch_size, progress=False)
        state = {"text": _slice_inputs(sliced, "text"), "vision": _slice_inputs(sliced, "vision")}
        state["images"] = None if "vision" in editor.towers else _embed_slice(family, state["vision"], "vision")
        state["base"] = _embed_slice(family, state["text"], "text")   # (2H, D)
        state["caption_ids"] = _safe_item_ids(state["text"])
        state["image_ids"] = _safe_item_ids(state["vision"])
        # every calibration safe image when the edit cannot move them; else the slice's, embedded each round
        pairs = run.dataset if run is not None and "vision" not in editor.towers else holdout
        state.update(_vocabulary_state(editor, pairs, state["image_ids"] if pairs is holdout else None))
        return state

    def measure(self, editor, holdout, state) -> tuple[float, float, dict]:
        family = editor.family
        texts = _embed_slice(family, state["text"], "text")                               # (2H, D)
        images = state["images"] if state["images"] is not None else _embed_slice(family, state["vision"],
                                                                                    "vision")  # (2H, D)
        measures = slice_measures(texts, images, state["base"], state["caption_ids"], state["image_ids"])
        word_images = state["word_images"]
        if word_images is None:
            word_images = _distinct(images[: len(images) // 2], state["image_ids"])
        measures.update(vocabulary_measures(word_images, state["word_labels"], _embed_words(family, state["words"]),
                                            state["base_words"], state["logit_scale"]))
        cost, measures["cost_resolution"] = knowledge_cost(measures, editor.config.knowledge_measure)
        return measures["GS"], cost, measures


register_method(IterativeAttribution())


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


def guarded_scores(cfg, weights: dict, gains: dict, curvature: dict | None, reach: str) -> dict[str, torch.Tensor]:
    """a − λ·h per weight: a = gain / mean|gain|, h = (1−α)²·W²⊙G / mean((1−α)²·W²⊙G), means over all
    target weights; `gains` are the first-order shares of the margin that flipping each weight buys.
    `reach` completes the error for a margin that ignores the targets ("target layers that ... ")."""
    n_total = sum(w.numel() for w in weights.values())
    scale = sum(a.abs().sum() for a in gains.values()) / n_total
    if scale == 0:
        raise ValueError(f"The margin does not depend on the target weights (∂m/∂W = 0 everywhere): target layers "
                         f"that {reach}.")
    scores = {name: a / scale for name, a in gains.items()}
    if curvature is not None:
        cost = {name: (1 - cfg.alpha) ** 2 * w.to(curvature[name].dtype).square() * curvature[name]
                for name, w in weights.items()}
        cost_scale = sum(c.sum() for c in cost.values()) / n_total
        if cost_scale > 0:   # 0 when α = 1 (nothing changes) or the knowledge term ignores the targets
            for name, c in cost.items():
                scores[name] -= cfg.curvature_weight * c / cost_scale
    return scores


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
        every = _slice_inputs(Calibration(pairs, _AllRows, family, editor.config.batch_size, progress=False),
                              "vision", safe_only=True)
        ids = _safe_item_ids(every, safe_only=True)
        state["word_images"] = _distinct(_embed_slice(family, every, "vision", safe_only=True), ids)
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
    images = _fixed_images(editor, run)
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


class RoundSums:
    """What one round of an iterative method sums over its batches (and processes): g = ∂m/∂W, and in
    a round that refreshes the curvature the squared per-item probe gradients, averaged at the end.
    Sums are float32 or better; the margin of a batch is divided by the number of pairs here."""

    def __init__(self, editor, run: Calibration, round_index: int):
        cfg = editor.config
        self.run, self.curvature_on = run, cfg.curvature_weight > 0
        self.layers = list(editor.target_layers.values())
        self.weights = [layer.weight for layer in self.layers]
        self.names = list(editor.target_layers)
        fresh = self.curvature_on and (round_index - 1) % cfg.curvature_every == 0
        self.probes = cfg.curvature_probes if fresh else 0
        self.margin = [torch.zeros_like(w, dtype=accumulation_dtype(w)) for w in self.weights]
        self.per_item = cfg.curvature_estimator == "per_item"
        zeros = lambda: [torch.zeros_like(w, dtype=accumulation_dtype(w)) for w in self.weights]  # noqa: E731
        self.squares = zeros() if self.probes and self.per_item else []           # Σ_p Σ_b g_pb²
        self.probe_sums = [zeros() for _ in range(self.probes)] if not self.per_item else []   # Σ_b g_pb
        self._calls: list[list] = [[] for _ in self.layers]   # per layer, (input, output) of each call

    def add_margin(self, batch_margin: torch.Tensor, keep_graph: bool):
        """Add ∂(batch margin / N)/∂W; `keep_graph` when the probes backpropagate through it next."""
        grads = torch.autograd.grad(batch_margin / len(self.run.dataset), self.weights, retain_graph=keep_graph)
        for total, grad in zip(self.margin, grads):
            total += grad

    @contextmanager
    def probed(self):
        """Record the target layers' inputs and outputs in the forward whose output `add_probes` probes
        (nothing in a round that does not refresh the curvature)."""
        def record(index):
            return lambda module, args, output: self._calls[index].append((args[0].detach(), output))

        handles = [layer.register_forward_hook(record(i)) for i, layer in enumerate(self.layers) if self.probes]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def add_probes(self, output: torch.Tensor, directions: torch.Tensor):
        """Add the gradients of directions[p, b] · output_b for every probe p and item b.

        output: (B, ...) from the forward run under `probed()`; directions: (P, *output.shape). One
        backward per probe gives every target layer's output gradients δ; item b's gradient is
        δ_bᵀ x_b with x the layer's inputs. `per_item` squares each item's gradient (only the probes' noise within
        an item remains, so one probe already estimates E well); `summed` squares their sum over
        all items at the end."""
        calls, self._calls = self._calls, [[] for _ in self.layers]
        recorded = [(i, x, y) for i, layer_calls in enumerate(calls) for x, y in layer_calls]
        for i, x, _ in recorded:
            if x.shape[0] != output.shape[0]:
                raise ValueError(f"Target layer {self.names[i]} sees {x.shape[0]} rows for {output.shape[0]} items: "
                                 "the curvature needs target layers that keep one row per item (the batch first).")
        for p in range(self.probes):
            deltas = torch.autograd.grad(output, [y for _, _, y in recorded], grad_outputs=directions[p].to(output),
                                         retain_graph=p + 1 < self.probes, allow_unused=True)
            add = _item_gradient_squares if self.per_item else _summed_gradient
            for i, total in enumerate(self.squares if self.per_item else self.probe_sums[p]):
                pairs = [(x, d) for (j, x, _), d in zip(recorded, deltas) if j == i and d is not None]
                if pairs:
                    total += add(pairs, total.dtype)

    def result(self):
        """(g, G) per layer, summed over processes; G the fresh estimate (kept on the run), the one
        kept since the last refresh, or None when curvature_weight = 0."""
        all_reduce_(self.margin + self.squares + [t for sums in self.probe_sums for t in sums])
        margin = dict(zip(self.names, self.margin))
        if not self.curvature_on:
            return margin, None
        if self.probes:
            squares = self.squares or [sum(sums[i].square() for sums in self.probe_sums)
                                       for i in range(len(self.weights))]
            self.run.curvature = {name: total / self.probes for name, total in zip(self.names, squares)}
        return margin, self.run.curvature


def _flat(delta: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, ..., out), (b, ..., in) -> (b, s, out), (b, s, in): every position of an item."""
    b = x.shape[0]
    return delta.reshape(b, -1, delta.shape[-1]), x.reshape(b, -1, x.shape[-1])


def _summed_gradient(pairs: list, dtype) -> torch.Tensor:
    """Σ_b Σ_calls δ_bᵀ x_b for one layer's calls [(x, δ)]: (out, in), the items' gradients summed."""
    return sum(torch.einsum("bso,bsi->oi", *(t.to(dtype) for t in _flat(d, x))) for x, d in pairs)


def _item_gradient_squares(pairs: list, dtype) -> torch.Tensor:
    """Σ_b (Σ_calls δ_bᵀ x_b)² for one layer's calls [(x, δ)]: (out, in). One item's gradient at a
    time in one buffer: a batched product would write every item's (out, in) gradient to memory and
    read it back to square it, which costs more than the products themselves when items are short."""
    flats = [_flat(d, x) for x, d in pairs]                                # each (b, s, out), (b, s, in)
    d0, x0 = flats[0]
    total = torch.zeros((d0.shape[-1], x0.shape[-1]), dtype=dtype, device=x0.device)
    grad = torch.empty_like(total)
    for item in range(x0.shape[0]):   # converted per item: never all items' inputs at once in `dtype`
        torch.mm(d0[item].T.to(dtype), x0[item].to(dtype), out=grad)       # (out, in)
        for d, x in flats[1:]:
            grad.addmm_(d[item].T.to(dtype), x[item].to(dtype))
        total.addcmul_(grad, grad)
    return total


def _fixed_images(editor, run: Calibration) -> list | None:
    """Per batch, the (2B, D) image embeddings when no vision weight is edited (computed once per
    run and kept on it); None when images change with the edit."""
    if "vision" in editor.towers:
        return None
    if getattr(run, "image_embeddings", None) is None:
        family = editor.family
        with torch.no_grad(), run.autocast():
            run.image_embeddings = [family.embed_images(family.to_device(inputs))
                                    for _, _, inputs in run.batches(run.preprocess("vision"), "images", leave=False)]
    return run.image_embeddings


def probe_directions(seed: int, round_index: int, rows: list[int], count: int, dim: int) -> torch.Tensor:
    """r ~ N(0, I) of shape (count, len(rows), dim): drawn per calibration row and round, so the
    estimate does not depend on the batch size or on how the rows are split over processes."""
    return torch.stack([torch.randn(count, dim, generator=keyed_generator(f"hf_uwm.probes/{seed}/{round_index}/{row}"))
                        for row in rows], 1)
