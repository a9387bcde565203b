"""Model families: where the towers and target layers of a CLIP, SigLIP or LLaVA model are, and how to embed text and images.

Layers are found by walking the model (module paths differ across transformers versions), and
target modules are matched with `isinstance(module, nn.Linear)` inside each encoder block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class FamilySpec:
    """What hf_uwm knows of a model family: its name, default target layers and default τ."""

    name: str
    text_targets: tuple[str, ...]
    vision_targets: tuple[str, ...]
    tau: float
    #: texts are padded to the model's fixed length, not to the longest text of the run (see
    #: `ModelFamily.text_length`)
    fixed_text_length: bool = False


FAMILIES = {
    "CLIPModel": FamilySpec("clip", ("self_attn.out_proj",), ("mlp.fc2",), 0.02),
    "SiglipModel": FamilySpec("siglip", ("self_attn.out_proj",), ("mlp.fc2",), 0.02, fixed_text_length=True),
    "LlavaForConditionalGeneration": FamilySpec("llava", (), ("mlp.fc2",), 0.085),
}


#: prefix of a vision target in LLaVA's multimodal projector rather than in the vision tower's layers
PROJECTOR = "projector."


def _family_of(model) -> FamilySpec:
    for cls in type(model).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    raise UnsupportedModelError(
        f"hf_uwm does not support {type(model).__name__}. Supported model classes: "
        f"{', '.join(FAMILIES)} (load CLIP/SigLIP checkpoints with AutoModel, LLaVA with "
        "LlavaForConditionalGeneration)."
    )


def _features(output) -> torch.Tensor:
    # transformers 4.x returns the projected tensor, 5.x a ModelOutput whose pooler_output it is.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ModelFamily:
    """Uniform access to a CLIP, SigLIP or LLaVA model: towers, target layers, inputs, embeddings."""

    def __init__(self, model: nn.Module, processor=None):
        self.spec = _family_of(model)
        self.model = model
        self.processor = processor
        self._names = {id(m): n for n, m in model.named_modules()}

    # --- structure -------------------------------------------------------------------------
    @property
    def towers(self) -> tuple[str, ...]:
        return ("vision",) if self.spec.name == "llava" else ("text", "vision")

    def tower(self, name: str) -> nn.Module:
        if name not in self.towers:
            raise ValueError(f"{type(self.model).__name__} has no {name!r} tower to edit; towers: {self.towers}.")
        if self.spec.name == "llava":
            return next(m for n, m in self.model.named_modules() if n.endswith("vision_tower"))
        return getattr(self.model, f"{name}_model")

    def default_targets(self, tower: str) -> tuple[str, ...]:
        return self.spec.text_targets if tower == "text" else self.spec.vision_targets

    def encoder_layers(self, tower: str) -> nn.ModuleList:
        for name, module in self.tower(tower).named_modules():
            if isinstance(module, nn.ModuleList) and name.endswith("layers"):
                return module
        raise TypeError(f"Could not find the encoder layers of the {tower} tower of {type(self.model).__name__}.")

    def reachable_layers(self, tower: str) -> int:
        """Number of leading encoder layers whose output reaches the model's output."""
        n_layers = len(self.encoder_layers(tower))
        if self.spec.name != "llava":
            return n_layers
        feature_layer = self.model.config.vision_feature_layer
        indices = feature_layer if isinstance(feature_layer, (list, tuple)) else [feature_layer]
        # hidden_states[k] is the output of layer k-1 (hidden_states[0] is the embeddings).
        return max(k % (n_layers + 1) for k in indices)

    def target_layers(self, tower: str, patterns) -> dict[str, nn.Linear]:
        """Full module name -> nn.Linear for every pattern in every reachable encoder block; on LLaVA a
        pattern "projector.NAME" names a layer of the multimodal projector instead."""
        patterns = self.default_targets(tower) if patterns is None else tuple(patterns)
        if not patterns:
            return {}
        layers = self.encoder_layers(tower)
        found: dict[str, nn.Linear] = {}
        for pattern in patterns:
            if pattern.startswith(PROJECTOR):
                module = self._projector_layer(tower, pattern)
                found[self._names[id(module)]] = module
                continue
            hits = []
            for block in list(layers)[: self.reachable_layers(tower)]:
                try:
                    module = block.get_submodule(pattern)
                except AttributeError:
                    continue
                if isinstance(module, nn.Linear):
                    hits.append(module)
            if not hits:
                available = sorted(n for n, m in layers[0].named_modules() if isinstance(m, nn.Linear))
                raise ValueError(
                    f"Target {pattern!r} matches no nn.Linear in the {tower} tower's encoder layers; "
                    f"available names inside a layer: {available}."
                )
            found.update({self._names[id(m)]: m for m in hits})
        return dict(sorted(found.items(), key=lambda kv: _natural_key(kv[0])))

    def _projector_layer(self, tower: str, pattern: str) -> nn.Linear:
        """The nn.Linear `pattern` ("projector.linear_1") names in LLaVA's multimodal projector."""
        projector = next((m for n, m in self.model.named_modules() if n.endswith("multi_modal_projector")), None)
        if projector is None or tower != "vision":
            raise ValueError(f"Target {pattern!r}: only LLaVA has a multimodal projector, and it is a vision target "
                             "(vision_targets=[\"mlp.fc2\", \"projector.linear_1\"]).")
        linears = sorted(PROJECTOR + n for n, m in projector.named_modules() if isinstance(m, nn.Linear))
        try:
            module = projector.get_submodule(pattern[len(PROJECTOR):])
        except AttributeError:
            module = None
        if not isinstance(module, nn.Linear):
            raise ValueError(f"Target {pattern!r} is no nn.Linear of the multimodal projector; its layers: {linears}.")
        return module

    # --- inputs ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _require_processor(self):
        if self.processor is None:
            raise ValueError("This needs a processor: pass processor=AutoProcessor.from_pretrained(<model>).")
        return self.processor

    def _tokenizer(self):
        return getattr(self._require_processor(), "tokenizer", self.processor)

    @property
    def max_text_length(self) -> int:
        """The model's fixed text length (77 for CLIP, 64 for SigLIP): the most positions it embeds."""
        text_config = getattr(self.model.config, "text_config", None)
        return getattr(text_config, "max_position_embeddings", None) or self._tokenizer().model_max_length

    def _tokens(self, texts) -> dict[str, list[list[int]]]:
        """Unpadded token ids (and mask) per text, cut at the model's fixed length."""
        return self._tokenizer()(list(texts), truncation=True, max_length=self.max_text_length)

    def _padded_length(self, tokens) -> int:
        if self.spec.fixed_text_length:
            return self.max_text_length
        return min(self.max_text_length, max(len(ids) for ids in tokens["input_ids"]))

    def text_length(self, texts) -> int:
        """The one length to pad every text of a run to, given all the texts the run embeds together.

        SigLIP: the model's fixed length, as it was trained (it pools the last position, which
        padding to the longest text would make a real token). CLIP: the longest of `texts`; its
        causal mask and end-of-text pooling make the positions after a text's end irrelevant, so
        its embedding equals the fixed-length one up to float rounding. One length for the whole
        run, not per batch: an item's input, hence its embedding, never depends on its batch.
        """
        texts = list(texts)
        limit = self.max_text_length
        # One token past the limit tells a text that is cut from one that fits exactly.
        tokens = self._tokenizer()(texts, truncation=True, max_length=limit + 1)
        cut = sum(len(ids) > limit for ids in tokens["input_ids"])
        if cut:
            from .data import warn

            warn(f"{cut:,} of {len(texts):,} texts are longer than the model's {limit} tokens: only their first "
                 f"{limit} tokens are read (shorten them to keep their ends).")
        return self._padded_length(tokens)

    def preprocess_text(self, texts: list[str], length: int | None = None) -> dict[str, torch.Tensor]:
        """Tokenised texts on the CPU (safe to call in DataLoader workers), padded to `length`.

        Default: `text_length(texts)`, right for texts embedded all at once. A run that tokenises
        its texts batch by batch passes the `text_length` of all of them, so that every batch has
        one length.
        """
        tokens = self._tokens(texts)
        length = self._padded_length(tokens) if length is None else length
        longest = max(len(ids) for ids in tokens["input_ids"])
        if not longest <= length <= self.max_text_length:
            raise ValueError(f"length={length} cannot hold these texts: it must be between their longest "
                             f"({longest} tokens) and the model's {self.max_text_length}; pass "
                             "family.text_length(<every text the run embeds>).")
        batch = self._tokenizer().pad(tokens, padding="max_length", max_length=length, return_tensors="pt")
        return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}

    def preprocess_images(self, images) -> dict[str, torch.Tensor]:
        """Pixel values on the CPU (safe to call in DataLoader workers)."""
        image_processor = getattr(self._require_processor(), "image_processor", self.processor)
        pixels = image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels}

    def to_device(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                for k, v in inputs.items()}

    def text_inputs(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.to_device(self.preprocess_text(texts))

    def image_inputs(self, images) -> dict[str, torch.Tensor]:
        return self.to_device(self.preprocess_images(images))

    def run_tower(self, tower: str, inputs: dict[str, torch.Tensor]):
        """Forward one tower only (the other tower, and LLaVA's language model, never run)."""
        return self.tower(tower)(**inputs)

    # --- embeddings ----------------------------------------------------------------------------
    def embed_text(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, D) L2-normalised projected text embeddings."""
        return nn.functional.normalize(_features(self.model.get_text_features(**inputs)), dim=-1)

    def embed_images(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, D) L2-normalised projected image embeddings."""
        return nn.functional.normalize(_features(self.model.get_image_features(**inputs)), dim=-1)


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]
