"""Calibration statistics: forward hooks on target `nn.Linear` layers feeding float64 running sums."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .delta import save_file_atomic
from .scoring import pair_factors, token_statistics
from .selection import layer_generator


class RunningScores:
    """Σ_b leftᵀ right over calibration pairs for a set of layers of one tower (SPEC §2).

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
            self._check_finite(name, left, right)
            self.sums[name].addmm_(left.T.to(torch.float64), right.to(torch.float64), alpha=sign)

    def _check_finite(self, name, left, right):
        bad = ~(torch.isfinite(left).all(1) & torch.isfinite(right).all(1))
        if bad.any():
            row = self._rows[int(bad.nonzero()[0])]
            raise FloatingPointError(
                f"Non-finite statistic in layer {name!r} for calibration pair {row} (a NaN/inf activation): "
                "check that image and text inputs are valid, or calibrate in float32 instead of float16."
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
        finally:
            self._last = None                                   # frees the batch's activations
        self.n_pairs += len(rows)

    # --- distributed and resumable use --------------------------------------------------------
    def all_reduce(self):
        """Sum the running sums and pair counts of every process (one collective per layer)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        for name, total in self.sums.items():
            dist.all_reduce(total)
        count = torch.tensor([self.n_pairs], dtype=torch.float64, device=next(iter(self.sums.values())).device)
        dist.all_reduce(count)
        self.n_pairs = int(count.item())

    def save(self, path: Path, key: str, next_batch: int):
        """Write the sums atomically: a kill at any point leaves the previous checkpoint intact."""
        meta = {"key": key, "n_pairs": str(self.n_pairs), "next_batch": str(next_batch)}
        save_file_atomic(self.sums, path, meta)

    def load(self, path: Path, key: str) -> int:
        """Restore sums saved by `save` with the same key; returns the first batch still to run."""
        if not path.is_file():
            return 0
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != key:
                    raise ValueError(
                        f"The checkpoint {path} was written for other data, model weights or settings; delete it "
                        "or pass another checkpoint_dir to start afresh.")
                for name, total in self.sums.items():
                    total.copy_(f.get_tensor(name))
        except SafetensorError as err:
            raise ValueError(f"The checkpoint {path} is corrupted ({err}); delete it to start afresh.") from None
        self.n_pairs = int(meta["n_pairs"])
        return int(meta["next_batch"])


def checkpoint_key(**parts) -> str:
    """A stable hash of everything that determines the running sums."""
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def random_scores(layers: dict[str, nn.Linear], seed: int) -> dict[str, torch.Tensor]:
    """Uniform random scores per layer, drawn from `layer_generator`."""
    scores = {}
    for i, (name, layer) in enumerate(layers.items()):
        scores[name] = torch.rand(layer.weight.shape, generator=layer_generator(seed, i), dtype=torch.float64)
    return scores


def preference_margin(text_safe, text_unsafe, image_safe, image_unsafe) -> torch.Tensor:
    """Σ_b (s(Tu,Iu) − s(Tu,Is)) + (s(Tu,Iu) − s(Ts,Iu)) over a batch of normalised (B, D) embeddings."""
    s_uu = (text_unsafe * image_unsafe).sum(-1)
    s_us = (text_unsafe * image_safe).sum(-1)
    s_su = (text_safe * image_unsafe).sum(-1)
    return (2 * s_uu - s_us - s_su).sum()


@contextmanager
def only_requires_grad(model: nn.Module, params):
    """Gradients for `params` only; the model's requires_grad flags are restored afterwards."""
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
