"""The image embeddings of a run whose vision tower is not edited: embedded once, before any flip.

Where a pair is text-only (no images), its images are stood in for by the embeddings of its own
captions by the model as it is (unedited, when called before any flip): CLIP aligns a caption with
the image it describes, which is all a margin asks of an image. On validation this stand-in taught
an edit concepts it never saw as well as image pairs of them did (docs/world3.md).
"""

from __future__ import annotations

import torch

from .calibration import Calibration


def fixed_images(editor, run: Calibration) -> list | None:
    """Per batch, the (2B, D) [safe_b; unsafe_b] image embeddings when no vision weight is edited
    (computed once per run and kept on it); None when images change with the edit."""
    if "vision" in editor.towers:
        return None
    if getattr(run, "image_embeddings", None) is None:
        family = editor.family
        with torch.no_grad(), run.autocast():
            if any(run.text_only):
                run.image_embeddings = [_images_or_captions(family, run, rows, inputs)
                                        for _, rows, inputs in run.batches(run.preprocess("text"), "images", leave=False)]
            else:
                run.image_embeddings = [family.embed_images(family.to_device(inputs))
                                        for _, _, inputs in run.batches(run.preprocess("vision"), "images", leave=False)]
    return run.image_embeddings


def _images_or_captions(family, run: Calibration, rows: list[int], text_inputs: dict) -> torch.Tensor:
    """(2B, D) embeddings of a batch's [safe; unsafe] images, its captions' where a pair has none."""
    embedded = family.embed_text(family.to_device(text_inputs))                        # (2B, D)
    pictured = [i for i, row in enumerate(rows) if not run.text_only[row]]
    if pictured:
        pairs = run.dataset.select([rows[i] for i in pictured])
        images = family.embed_images(family.to_device(family.preprocess_images(
            list(pairs["safe_image"]) + list(pairs["unsafe_image"]))))                    # (2P, D)
        where = torch.tensor(pictured + [len(rows) + i for i in pictured], device=embedded.device)
        embedded = embedded.index_copy(0, where, images.to(embedded.dtype))
    return embedded


def flat_pairs(batches: list) -> torch.Tensor:
    """(2N, D) float32 CPU [safe; unsafe] rows from per-batch (2B, D) [safe_b; unsafe_b] embeddings."""
    halves = [(b[: len(b) // 2], b[len(b) // 2:]) for b in batches]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves]).float().cpu()


def safe_image_ids(run: Calibration, text_batches: list) -> torch.Tensor:
    """(N,) ids of the run's safe images, equal for copies; a text-only pair's is its safe caption's.

    text_batches: the run's per-batch CPU text inputs of [safe_b; unsafe_b] captions."""
    from ..evaluation import content_keys, item_ids

    keys = []
    for (start, stop), texts in zip(run.batch_bounds(), text_batches):
        half = len(next(iter(texts.values()))) // 2
        captions = content_keys({name: t[:half] for name, t in texts.items()})
        pictured = [row for row in range(start, stop) if not run.text_only[row]]
        images = iter(content_keys(run.family.preprocess_images(list(run.dataset.select(pictured)["safe_image"])))
                      if pictured else [])
        keys += [("caption", captions[i]) if run.text_only[row] else ("image", next(images))
                 for i, row in enumerate(range(start, stop))]
    return item_ids(keys)
