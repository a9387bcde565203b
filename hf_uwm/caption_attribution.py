"""Caption attribution: a gradient-attribution score for LLaVA's vision tower, from captions.

The margin is the captioner's preference, on unsafe images, for the safe caption over the unsafe one,

    m = (1/N) Σ_b [ log p(Ts_b | Iu_b) − log p(Tu_b | Iu_b) ],

differentiated once with gradients on the vision-tower target weights only (the projector and the
language model are frozen). Multiplying weight W_ij by α changes m by about (α − 1)·W_ij·∂m/∂W_ij,
so for α < 1 the weights whose edit raises the safe margin are those with W ⊙ ∂m/∂W < 0; the score
is `A = max(−W ⊙ ∂m/∂W, 0)`, selected like any other score (τ mass share or a fixed density).

This module stands alone (one scorer, one module) and feeds the editor's ordinary selection path:
`calibrate_caption_attribution(editor, pairs)` fills `editor.scores` and selects the delta, which
then applies, reverts, saves and gets a random control like any UWM delta.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .captioning import DEFAULT_PROMPT, caption_log_likelihood
from .statistics import only_requires_grad

COLUMNS = ("safe_text", "unsafe_text", "unsafe_image")


def caption_margin(model, processor, rows: dict, prompt: str = DEFAULT_PROMPT) -> torch.Tensor:
    """Σ_b [log p(safe_text_b | unsafe_image_b) − log p(unsafe_text_b | unsafe_image_b)] over a batch of rows."""
    b = len(rows["unsafe_image"])
    images = list(rows["unsafe_image"]) * 2
    captions = list(rows["safe_text"]) + list(rows["unsafe_text"])
    log_likelihood = caption_log_likelihood(model, processor, images, captions, prompt)   # (2B,)
    return (log_likelihood[:b] - log_likelihood[b:]).sum()


def caption_attribution_scores(model, processor, layers: dict, pairs, *, prompt: str = DEFAULT_PROMPT,
                               batch_size: int = 16, progress: bool = True) -> dict[str, torch.Tensor]:
    """{layer name: max(−W ⊙ ∂m/∂W, 0) as float64} for the caption margin m over `pairs`.

    `layers` maps names to the vision-tower `nn.Linear` targets (e.g. `editor.target_layers`);
    `pairs` has the columns safe_text, unsafe_text and unsafe_image. Gradients already on the
    target weights are put back afterwards.
    """
    from .data import validate_pairs

    pairs = validate_pairs(pairs, COLUMNS)
    n = len(pairs)
    saved = {name: layer.weight.grad for name, layer in layers.items()}
    try:
        with only_requires_grad(model, [layer.weight for layer in layers.values()]):
            for start in tqdm(range(0, n, batch_size), desc="caption attribution", disable=not progress):
                rows = pairs[start:start + batch_size]
                (caption_margin(model, processor, rows, prompt) / n).backward()
            return {name: (-layer.weight.detach() * layer.weight.grad).clamp(min=0).double()
                    for name, layer in layers.items()}
    finally:
        for name, layer in layers.items():
            layer.weight.grad = saved[name]


def calibrate_caption_attribution(editor, pairs, *, prompt: str = DEFAULT_PROMPT, batch_size: int | None = None,
                                  progress: bool = True):
    """Score the editor's vision-tower targets by caption attribution, then select its delta.

    The editor must be a LLaVA editor made with `UWMConfig(score="attribution")`, so that a saved
    delta records how it was made. Returns the editor.
    """
    from .delta import fingerprint

    if editor.adapter.family.name != "llava":
        raise ValueError("Caption attribution edits a LLaVA model's vision tower; for CLIP or SigLIP use "
                         "UWMConfig(score='attribution') with editor.calibrate.")
    if editor.config.score != "attribution":
        raise ValueError(f"Make the editor with UWMConfig(score='attribution', ...) (it has score="
                         f"{editor.config.score!r}), so that the saved delta says how it was selected.")
    if editor.is_applied:
        raise RuntimeError("The edit is applied: call revert() before calibrating again.")
    editor.fingerprint = fingerprint(editor.target_layers)
    editor.scores = caption_attribution_scores(editor.model, editor.processor, editor.target_layers, pairs,
                                               prompt=prompt, batch_size=batch_size or editor.config.batch_size,
                                               progress=progress)
    editor.delta = editor.select()
    return editor
