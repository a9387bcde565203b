"""UWM, the paper's method: forward hooks on target `nn.Linear` layers feed float64 running sums of
the statistics' outer products, one tower at a time; the scores are selected per layer (τ or density).

The statistics are pure tensor functions (below `RunningScores`). Per item we only ever hold vectors
(n, σ over the input features; a over the outputs). The score of a layer is a sum of outer products,
`S = Σ_b left_bᵀ right_b`, accumulated in float64, so no (out, in) tensor per item is ever built.
Three variants are registered: "ratio" (the paper's), "unsafe" and "difference".
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..distributed import all_reduce_
from ..hints import hint
from ..settings import is_number, setting
from .base import Method, SelectionSettings, register_method
from .calibration import Calibration, read_checkpoint, save_checkpoint

TOKEN_NORMS = ("l2", "rms")


@dataclass
class UWMSettings(SelectionSettings):
    """UWM's statistics: per-token norm `token_norm` ("l2", or "rms" = l2/√T), the |W| magnitude prior
    per tower, and the ε of the ratios; selection as any one-pass method."""

    token_norm: str = setting("l2", "per-token norm of the layer inputs (rms: l2/√T)", choices=TOKEN_NORMS)
    text_prior: bool = setting(True, "multiply the text tower's scores by the magnitude prior |W|")
    vision_prior: bool = setting(False, "multiply the vision tower's scores by the magnitude prior |W|")
    eps: float = setting(1e-8, "the ε of the ratios")

    def __post_init__(self):
        super().__post_init__()
        self.check("token_norm", self.token_norm in TOKEN_NORMS, f"token_norm must be one of {TOKEN_NORMS}")
        for name in ("text_prior", "vision_prior"):
            self.check(name, isinstance(getattr(self, name), bool), "must be True or False")
        self.check("eps", is_number(self.eps) and 0 < self.eps < 1e-2, "eps must be a small positive number")


class UWMStatistics(Method):
    """A UWM statistic; the registered variants below differ in `name` only."""

    settings_class = UWMSettings
    resumable = True
    leaves_weights_untouched = True
    score_settings = ("method", "token_norm", "eps", "text_targets", "vision_targets", "text_prior", "vision_prior")
    text_only_pairs = True   # the text statistics read no image; the vision ones read the pairs that have images

    def check_text_only(self, editor, count: int, total: int):
        if count == total and "vision" in editor.towers:
            raise ValueError(f"All {total} calibration pairs are text-only (no images), so UWM has no image to take "
                             "the vision tower's statistics from: give image pairs too, or edit the text tower alone "
                             f"({hint('vision_targets=[]', '--towers text')}).")

    def calibrate(self, editor, run: Calibration) -> dict[str, torch.Tensor]:
        return {name: s for tower in editor.towers
                for name, s in self._tower_scores(editor, tower, run if tower == "text" else run.with_images()).items()}

    def _tower_scores(self, editor, tower: str, run: Calibration) -> dict[str, torch.Tensor]:
        cfg, layers, family = editor.config, editor.layers[tower], editor.family
        running = RunningScores(layers, cfg.method, cfg.token_norm, cfg.eps)
        settings = {k: getattr(cfg, k) for k in ("method", "token_norm", "eps", "batch_size", f"{tower}_targets")}
        path, key = run.checkpoint(tower, editor.fingerprint, settings)
        first = running.load(path, key)
        n_batches = len(run.batch_bounds())
        with running.hooked():
            for i, rows, inputs in run.batches(run.preprocess(tower), f"UWM {tower} statistics", first):
                with run.autocast():
                    running.observe(lambda x: family.run_tower(tower, x), family.to_device(inputs), rows)
                if path and ((i + 1) % run.checkpoint_every == 0 or i + 1 == n_batches):
                    running.save(path, key, i + 1)
        running.all_reduce()
        return {name: finalize_scores_(running.sums.pop(name), running.n_pairs, cfg.method, layer.weight,
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


class UWMRatio(UWMStatistics):
    name = "ratio"
    title = "UWM"
    help = ("UWM as published (reproduces the paper): per layer, the weights whose input signal is larger for "
            "unsafe than for safe inputs, up to the share --tau of the score mass; also LLaVA's vision tower")
    card_text = ("**Unsafe Weights Manipulation (UWM)**: on pairs of safe and unsafe inputs, each weight of the "
                 "targeted layers is scored by how much more of its input signal comes from unsafe than from safe "
                 "inputs (the ratio of the two statistics, times |W| where the prior is on)")


class UWMUnsafe(UWMStatistics):
    name = "unsafe"
    title = "UWM (unsafe statistic)"
    help = "UWM variant: the unsafe inputs' signal alone"
    card_text = ("a UWM variant: each weight of the targeted layers is scored by its input signal on unsafe inputs "
                 "alone (no division by the safe statistic)")


class UWMDifference(UWMStatistics):
    name = "difference"
    title = "UWM (difference statistic)"
    help = "UWM variant: unsafe minus safe inputs' signal"
    card_text = ("a UWM variant: each weight of the targeted layers is scored by its input signal on unsafe inputs "
                 "minus that on safe inputs")


for _variant in (UWMRatio, UWMUnsafe, UWMDifference):
    register_method(_variant())


# --- the statistics, as pure tensor functions ----------------------------------------------------
SCORE_VARIANTS = ("ratio", "unsafe", "difference")


def token_statistics(x: torch.Tensor, mask: torch.Tensor | None, token_norm: str = "l2"):
    """Per-item, per-feature norm and unbiased std over the item's valid tokens.

    x: (B, T, in) layer inputs; mask: (B, T), 1 for valid tokens, or None (all valid).
    Returns n (B, in), sigma (B, in), in float64 when x is float64 and float32 otherwise.
    """
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    valid = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if mask is None else mask.to(x.dtype)
    valid = valid.unsqueeze(1)                                 # (B, 1, T)
    tokens = valid.sum(-1)                                     # (B, 1)
    # Token sums as batched matmuls: on CPU, torch.var_mean over dim 1 took 2-25x as long.
    # Two passes, not E[x²]-E[x]², because |mean| >> std is common.
    mean = torch.bmm(valid, x).squeeze(1) / tokens             # (B, in)
    centred = (x - mean.unsqueeze(1)).square_()                # (B, T, in)
    squares = torch.bmm(valid, centred).squeeze(1)             # Σ (x - mean)²: (B, in)
    var = squares / (tokens - 1).clamp(min=1)
    # Σx² = Σ(x - mean)² + T·mean²: non-negative terms, so no cancellation.
    norm = (squares + tokens * mean.square()).sqrt()
    if token_norm == "rms":
        norm = norm / tokens.sqrt()
    return norm, var.sqrt()


def output_saliency(norm: torch.Tensor, abs_weight: torch.Tensor) -> torch.Tensor:
    """a_i = mean_j n_j |W_ij|.  norm: (B, in), abs_weight: (out, in) -> (B, out)."""
    return norm @ abs_weight.T / abs_weight.shape[1]


def pair_factors(score: str, safe, unsafe, abs_weight: torch.Tensor, eps: float):
    """The (sign, left (B, out), right (B, in)) terms whose outer products sum to this batch's S.

    safe, unsafe: (n, sigma) pairs from `token_statistics`, row b of each being pair b.
    """
    (n_s, sd_s), (n_u, sd_u) = safe, unsafe
    a_s, a_u = output_saliency(n_s, abs_weight), output_saliency(n_u, abs_weight)
    if score == "ratio":
        # ρ_ij = (aᵘ_i / aˢ_i) · (nᵘ_j/(σᵘ_j+ε)) · ((σˢ_j+ε)/nˢ_j): the m_j of φ cancel.
        r = a_u / a_s.clamp(min=eps)
        q = (n_u / (sd_u + eps)) * ((sd_s + eps) / n_s.clamp(min=eps))
        return [(1.0, r, q)]
    col_mean = abs_weight.mean(0)                              # m_j: (in,)
    unsafe_term = (1.0, a_u, n_u * col_mean / (sd_u + eps))    # φᵘ = aᵘ_i · cᵘ_j/(σᵘ_j+ε)
    if score == "unsafe":
        return [unsafe_term]
    if score == "difference":
        return [unsafe_term, (-1.0, a_s, n_s * col_mean / (sd_s + eps))]
    raise ValueError(f"Unknown score variant {score!r}; expected one of {SCORE_VARIANTS}.")


def finalize_scores_(sums: torch.Tensor, n_pairs: int, score: str, weight: torch.Tensor, prior: bool):
    """S = sums / N, clamped at 0 for 'difference', times |W| when the magnitude prior is on.

    In place: the running sums become the scores, so no second (out, in) float64 tensor is made.
    """
    scores = sums.div_(n_pairs)
    if score == "difference":
        scores.clamp_(min=0)
    if prior:
        scores.mul_(weight.detach()).abs_()                    # = S·|W|, as S ≥ 0
    return scores
