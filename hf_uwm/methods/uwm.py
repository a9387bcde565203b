"""UWM: forward hooks on target `nn.Linear` layers feed float64 running sums of the
statistics' outer products, one tower at a time; the scores are selected per layer (τ or density)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..scoring import finalize_scores_, pair_factors, token_statistics
from .base import Calibration, Method, all_reduce_, read_checkpoint, save_checkpoint


class UWMStatistics(Method):
    """score = "ratio" (the paper's), "unsafe" or "difference"."""

    resumable = True
    leaves_weights_untouched = True
    score_settings = ("score", "token_norm", "eps", "text_targets", "vision_targets", "text_prior", "vision_prior")

    def scores(self, editor, run: Calibration) -> dict[str, torch.Tensor]:
        return {name: s for tower in editor.towers for name, s in self._tower_scores(editor, tower, run).items()}

    def _tower_scores(self, editor, tower: str, run: Calibration) -> dict[str, torch.Tensor]:
        cfg, layers, adapter = editor.config, editor.layers[tower], editor.adapter
        running = RunningScores(layers, cfg.score, cfg.token_norm, cfg.eps)
        settings = {k: getattr(cfg, k) for k in ("score", "token_norm", "eps", "batch_size", f"{tower}_targets")}
        path, key = run.checkpoint(tower, editor.fingerprint, settings)
        first = running.load(path, key)
        n_batches = len(run.batch_bounds())
        with running.hooked():
            for i, rows, inputs in run.batches(run.preprocess(tower), f"UWM {tower} statistics", first):
                with run.autocast():
                    running.observe(lambda x: adapter.run_tower(tower, x), adapter.to_device(inputs), rows)
                if path and ((i + 1) % run.checkpoint_every == 0 or i + 1 == n_batches):
                    running.save(path, key, i + 1)
        running.all_reduce()
        return {name: finalize_scores_(running.sums.pop(name), running.n_pairs, cfg.score, layer.weight,
                                       cfg.prior(tower))
                for name, layer in layers.items()}


class RunningScores:
    """Σ_b leftᵀ right over calibration pairs for a set of layers of one tower.

    Each batch is one forward of [safe items; unsafe items] (2B rows): the hook splits the rows,
    reduces each item to vectors over its valid tokens and adds B outer products per layer.
    """

    def __init__(self, layers: dict[str, nn.Linear], score: str, token_norm: str, eps: float):
        self.layers, self.score, self.token_norm, self.eps = layers, score, token_norm, eps
        self.sums = {name: torch.zeros(layer.weight.shape, dtype=torch.float64, device=layer.weight.device)
                     for name, layer in layers.items()}
        self.n_pairs = 0
        self._abs_weight = {name: layer.weight.detach().abs().float() for name, layer in layers.items()}
        self._mask: torch.Tensor | None = None
        self._rows: list[int] = []
        self._last: tuple | None = None          # (input, its version, n, sigma) of the last hook
        self._finite: list[tuple[str, torch.Tensor]] = []   # (layer, (B,) rows all finite) of this batch

    def _statistics(self, x: torch.Tensor):
        """token_statistics of a layer input, computed once for layers fed the same tensor (q, k, v)."""
        if self._last is None or self._last[0] is not x or self._last[1] != x._version:
            tokens = x.unsqueeze(1) if x.dim() == 2 else x      # (2B, T, in)
            self._last = (x, x._version, *token_statistics(tokens, self._mask, self.token_norm))
        return self._last[2:]

    def _hook(self, name: str):
        def hook(module, args, output):
            # The forward may run under autocast; the statistics' matmuls must not.
            with torch.autocast(args[0].device.type, enabled=False):
                self._observe_layer(name, args[0])
        return hook

    def _observe_layer(self, name: str, x: torch.Tensor):
        n, sd = self._statistics(x)                            # (2B, in) each
        half = n.shape[0] // 2
        abs_weight = self._abs_weight[name].to(n.dtype)
        terms = pair_factors(self.score, (n[:half], sd[:half]), (n[half:], sd[half:]), abs_weight, self.eps)
        for sign, left, right in terms:
            # Flags stay on the device: reading one per layer would stall a GPU once per layer.
            self._finite.append((name, torch.isfinite(left).all(1) & torch.isfinite(right).all(1)))
            self.sums[name].addmm_(left.T.to(torch.float64), right.to(torch.float64), alpha=sign)

    def _check_finite(self):
        """One read to the host per batch; names the first layer (forward order) and pair that failed."""
        if not self._finite:
            return
        device = self._finite[0][1].device                           # layers may sit on several GPUs
        finite = torch.stack([flags.to(device) for _, flags in self._finite])    # (terms, B)
        if bool(finite.all()):
            return
        term, item = (~finite).nonzero()[0].tolist()                 # row-major: earliest layer first
        raise FloatingPointError(
            f"Non-finite statistic in layer {self._finite[term][0]!r} for calibration pair {self._rows[item]} "
            "(a NaN/inf activation): check that image and text inputs are valid, or calibrate in float32 "
            "instead of float16."
        )

    @contextmanager
    def hooked(self):
        handles = [layer.register_forward_hook(self._hook(name)) for name, layer in self.layers.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def observe(self, run_forward, inputs: dict, rows: list[int]):
        """One forward over 2·len(rows) items (safe rows first); `rows` name the pairs in errors."""
        self._mask, self._rows = inputs.get("attention_mask"), rows
        try:
            with torch.no_grad():
                run_forward(inputs)
            self._check_finite()
        finally:
            self._last, self._finite = None, []                 # frees the batch's activations
        self.n_pairs += len(rows)

    # --- distributed and resumable use --------------------------------------------------------
    def all_reduce(self):
        """Sum the running sums and pair counts of every process (one collective per layer)."""
        count = torch.tensor([self.n_pairs], dtype=torch.float64, device=next(iter(self.sums.values())).device)
        all_reduce_([*self.sums.values(), count])
        self.n_pairs = int(count.item())

    def save(self, path: Path, key: str, next_batch: int):
        save_checkpoint(path, key, self.sums, n_pairs=self.n_pairs, next_batch=next_batch)

    def load(self, path: Path | None, key: str) -> int:
        """Restore sums saved by `save` with the same key; returns the first batch still to run."""
        saved = read_checkpoint(path, key)
        if saved is None:
            return 0
        tensors, meta = saved
        for name, total in self.sums.items():
            total.copy_(tensors.pop(name))
        self.n_pairs = int(meta["n_pairs"])
        return int(meta["next_batch"])
