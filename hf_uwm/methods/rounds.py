"""The round loop every iterative method shares, and the sums of one round.

`IterativeEdit` edits in rounds on the model as edited so far: it holds out a slice of the
calibration pairs, flips each round's top weights by α and restores the model afterwards, saves a
checkpoint per round, records the trajectory of the held-out measures and stops by the rule of
`stopping.py`. A subclass scores one round (`round_scores`) and measures the slice
(`start_measuring`, `measure`); its settings class holds the round settings (`IterativeSettings`
or a subclass of it).

`RoundSums` sums what one round needs over the batches and processes: the margin's gradient and,
in a round that refreshes it, the probed curvature, by `curvature_estimator` (`per_item`: each
item's probe gradient squared on its own; `summed`: the probe gradients summed over every item,
then squared). `guarded_scores` turns both into a − λ·h.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from ..delta import scale_
from ..distributed import all_reduce_, broadcast_from_main
from ..selection import keyed_generator, select_shared, select_top
from .base import Method
from .calibration import Calibration, read_checkpoint, save_checkpoint
from .gradients import accumulation_dtype
from .held_out import MEASURE_TITLES, check_slice
from .stopping import Step, from_records, holdout_rows, stopping_round, summary, to_records


CURVATURE_ESTIMATORS = ("per_item", "summed")


class IterativeEdit(Method):
    """Edits in rounds on the model as edited so far; subclasses score one round and measure the slice, and
    set `settings_class` to `IterativeSettings` or a subclass of it (the round settings the loop reads)."""

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

    def prepare(self, editor, run: Calibration):
        """What the rounds need from the unedited model (called before any flip, resumed ones included)."""

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
            self.prepare(editor, train)
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


def probe_directions(seed: int, round_index: int, rows: list[int], count: int, dim: int) -> torch.Tensor:
    """r ~ N(0, I) of shape (count, len(rows), dim): drawn per calibration row and round, so the
    estimate does not depend on the batch size or on how the rows are split over processes."""
    return torch.stack([torch.randn(count, dim, generator=keyed_generator(f"hf_uwm.probes/{seed}/{round_index}/{row}"))
                        for row in rows], 1)
