"""Iterative, knowledge-guarded attribution (beyond the paper): flip weights in rounds, re-scoring
the model as edited so far, with a second-order penalty for what the flips cost the safe captions.

Each round r, with the margin m = (1/N) Σ_b [2·s(Tu,Iu) − s(Tu,Is) − s(Ts,Iu)] of attribution:

    g = ∂m/∂W                                         one backward over the pairs
    G = (1/P) Σ_p (∂/∂W Σ_b r_{p,b} · T(Ts_b))²       r ~ N(0, I) per caption and probe, seeded per round
    a = W⊙g / mean|W⊙g|,   h = (1−α)²·W²⊙G / mean((1−α)²·W²⊙G)      means over all target weights
    score = a − λ·h

G is a Gauss-Newton diagonal of the normalised safe-caption embeddings T (E[(Σ_k r_k J_k)²] = Σ_k J_k²),
and h the second-order change of T when w becomes αw. The top ⌈δ·n⌉ weights not flipped yet (over
all target layers jointly with a shared budget, else per layer) are multiplied by α; the delta is
the union of the rounds. The scores kept are the round in which each weight was flipped (0: never),
so any number of rounds up to the calibrated one is re-selected without a forward pass.
"""

from __future__ import annotations

import hashlib
import math

import torch
from tqdm.auto import tqdm

from ..selection import select_shared, select_top
from .attribution import preference_margin
from .base import Calibration, Method, all_reduce_, read_checkpoint, save_checkpoint
from .gradients import accumulation_dtype, gradients_on, pair_preprocess


class IterativeAttribution(Method):
    needs_both_towers = True
    resumable = True
    shared_budget_default = True
    score_settings = ("score", "text_targets", "vision_targets", "alpha", "round_density", "curvature_weight",
                      "curvature_probes", "shared_budget", "seed")
    selection_settings = ("rounds",)
    targets_can_shrink = False   # the rounds ranked all target layers together

    def check(self, adapter, config):
        if "text" not in adapter.towers:
            raise ValueError(f"score='iterative_attribution' needs a text tower for its margin and its knowledge "
                             f"curvature; {type(adapter.model).__name__} has none (a captioning objective for "
                             "LLaVA is not implemented): use a UWM score such as 'ratio' on its vision tower.")

    def default_targets(self, adapter, tower: str) -> tuple[str, ...]:
        return ("mlp.fc2",) if tower == "text" else ()

    def select(self, scores: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
        """The weights flipped in rounds 1..config.rounds."""
        calibrated = max(int(s.max()) for s in scores.values())
        if config.rounds > calibrated:
            raise ValueError(f"rounds={config.rounds} but only {calibrated} rounds were calibrated: calibrate again "
                             "with more rounds (a checkpoint_dir lets a run continue where it stopped).")
        return {name: ((s.flatten() > 0) & (s.flatten() <= config.rounds)).nonzero().squeeze(1)
                for name, s in scores.items()}

    def scores(self, editor, run: Calibration) -> dict[str, torch.Tensor]:
        cfg, weights = editor.config, {name: layer.weight for name, layer in editor.target_layers.items()}
        flipped = {name: torch.zeros(w.numel(), dtype=torch.int32, device=w.device) for name, w in weights.items()}
        path, key = run.checkpoint("iterative", editor.fingerprint,
                                   {k: getattr(cfg, k) for k in self.score_settings + ("batch_size",)})
        done = self._resume(path, key, flipped, cfg.rounds)
        originals = {name: w.detach().clone() for name, w in weights.items()}
        try:
            for name, w in weights.items():
                _flip_(w, (flipped[name] > 0).nonzero().squeeze(1), cfg.alpha)
            bar = tqdm(range(done + 1, cfg.rounds + 1), desc="iterative attribution", initial=done,
                       total=cfg.rounds, unit="round", disable=not (run.progress and run.state.is_main_process))
            for r in bar:
                chosen = self._round(editor, run, r, flipped)
                for name, idx in chosen.items():
                    flipped[name][idx] = r
                    _flip_(weights[name], idx, cfg.alpha)
                if path:
                    save_checkpoint(path, key, flipped, rounds_done=r)
                bar.set_postfix(flipped=sum(int((f > 0).sum()) for f in flipped.values()))
        finally:
            with torch.no_grad():
                for name, w in weights.items():
                    w.copy_(originals[name])
        return {name: f.view(weights[name].shape) for name, f in flipped.items()}

    def _resume(self, path, key, flipped: dict[str, torch.Tensor], rounds: int) -> int:
        """Restore the rounds a checkpoint holds (at most `rounds`); returns how many are done."""
        saved = read_checkpoint(path, key)
        if saved is None:
            return 0
        tensors, meta = saved
        done = min(int(meta["rounds_done"]), rounds)
        for name, f in flipped.items():
            restored = tensors[name].to(f.device)
            f.copy_(torch.where(restored <= done, restored, 0))
        return done

    def _round(self, editor, run: Calibration, round_index: int, flipped) -> dict[str, torch.Tensor]:
        """The indices per layer that round `round_index` flips, the same on every process."""
        cfg, weights = editor.config, {name: layer.weight.detach() for name, layer in editor.target_layers.items()}
        margin_grads, curvature = margin_and_curvature(editor, run, round_index)
        n_total = sum(w.numel() for w in weights.values())
        attribution = {name: w.to(margin_grads[name].dtype) * margin_grads[name] for name, w in weights.items()}
        scale = sum(a.abs().sum() for a in attribution.values()) / n_total
        if scale == 0:
            raise ValueError("The margin does not depend on the target weights (∂m/∂W = 0 everywhere): target "
                             "layers that the text or image embeddings pass through.")
        scores = {name: a / scale for name, a in attribution.items()}
        if curvature is not None:
            cost = {name: (1 - cfg.alpha) ** 2 * w.to(curvature[name].dtype).square() * curvature[name]
                    for name, w in weights.items()}
            cost_scale = sum(c.sum() for c in cost.values()) / n_total
            if cost_scale > 0:   # 0 when α = 1 (nothing changes) or the captions ignore the targets
                for name, c in cost.items():
                    scores[name] -= cfg.curvature_weight * c / cost_scale
        for name, s in scores.items():
            s.view(-1)[flipped[name] > 0] = -math.inf
        if cfg.shared_budget:
            count = math.ceil(cfg.round_density * n_total)
            chosen = select_shared(scores, lambda s, name: select_top(s, count, name))
        else:
            chosen = {name: select_top(s, math.ceil(cfg.round_density * s.numel()), name)
                      for name, s in scores.items()}
        return _same_on_every_process(run, chosen)


def margin_and_curvature(editor, run: Calibration, round_index: int):
    """(g, G) per target layer in one pass over the pairs; G is None when curvature_weight = 0.

    g = ∂m/∂W; G = (1/P) Σ_p (∂/∂W Σ_b r_{p,b}·T(Ts_b))². The probe gradients are summed over all
    pairs (and processes) before they are squared; sums are float32 or better.
    """
    cfg, adapter = editor.config, editor.adapter
    weights = [layer.weight for layer in editor.target_layers.values()]
    with_curvature = cfg.curvature_weight > 0
    margin = [torch.zeros_like(w, dtype=accumulation_dtype(w)) for w in weights]
    probes = [[torch.zeros_like(w, dtype=accumulation_dtype(w)) for w in weights]
              for _ in range(cfg.curvature_probes if with_curvature else 0)]
    with gradients_on(editor.model, weights):
        for _, rows, (text_inputs, image_inputs) in run.batches(pair_preprocess(run), f"round {round_index}",
                                                                leave=False, keep=True):
            b, text_inputs = len(rows), adapter.to_device(text_inputs)
            with run.autocast():
                texts = adapter.embed_text(text_inputs)                                   # (2B, D)
                images = adapter.embed_images(adapter.to_device(image_inputs))            # (2B, D)
            m = preference_margin(texts[:b], texts[b:], images[:b], images[b:]) / len(run.dataset)
            for total, grad in zip(margin, torch.autograd.grad(m, weights)):
                total += grad
            if not with_curvature:
                continue
            with run.autocast():   # the safe captions alone: half the rows of `texts`
                safe = adapter.embed_text({k: v[:b] for k, v in text_inputs.items()})     # (B, D)
            directions = probe_directions(cfg.seed, round_index, rows, len(probes), safe.shape[-1])  # (P, B, D)
            for p, totals in enumerate(probes):
                grads = torch.autograd.grad(safe, weights, grad_outputs=directions[p].to(safe),
                                            retain_graph=p + 1 < len(probes))
                for total, grad in zip(totals, grads):
                    total += grad
    all_reduce_(margin + [t for totals in probes for t in totals])
    names = list(editor.target_layers)
    if not with_curvature:
        return dict(zip(names, margin)), None
    curvature = [sum(totals[i].square() for totals in probes) / len(probes) for i in range(len(weights))]
    return dict(zip(names, margin)), dict(zip(names, curvature))


def probe_directions(seed: int, round_index: int, rows: list[int], count: int, dim: int) -> torch.Tensor:
    """r ~ N(0, I) of shape (count, len(rows), dim): drawn per calibration row and round, so the
    estimate does not depend on the batch size or on how the rows are split over processes."""
    def generator(row):
        digest = hashlib.sha256(f"hf_uwm.probes/{seed}/{round_index}/{row}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))

    return torch.stack([torch.randn(count, dim, generator=generator(row)) for row in rows], 1)


def _flip_(weight: torch.Tensor, idx: torch.Tensor, alpha: float):
    with torch.no_grad():
        flat = weight.view(-1)
        flat[idx] = flat[idx] * alpha


def _same_on_every_process(run: Calibration, chosen: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The main process's selection everywhere, so every process edits its model alike."""
    if run.state.num_processes == 1:
        return chosen
    from accelerate.utils import broadcast_object_list

    device = next(iter(chosen.values())).device
    shared = [{name: idx.cpu() for name, idx in chosen.items()}]
    broadcast_object_list(shared)
    return {name: idx.to(device) for name, idx in shared[0].items()}
