"""Model-family adapters: where the towers and target layers are, and how to embed text and images.

Layers are found by walking the model (module paths differ across transformers versions), and
target modules are matched with `isinstance(module, nn.Linear)` inside each encoder block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    name: str
    text_targets: tuple[str, ...]
    vision_targets: tuple[str, ...]
    tau: float


FAMILIES = {
    "CLIPModel": Family("clip", ("self_attn.out_proj",), ("mlp.fc2",), 0.02),
    "SiglipModel": Family("siglip", ("self_attn.out_proj",), ("mlp.fc2",), 0.02),
    "LlavaForConditionalGeneration": Family("llava", (), ("mlp.fc2",), 0.085),
}


def _family_of(model) -> Family:
    for cls in type(model).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    raise TypeError(
        f"hf_uwm does not support {type(model).__name__}. Supported model classes: "
        f"{', '.join(FAMILIES)} (load CLIP/SigLIP checkpoints with AutoModel, LLaVA with "
        "LlavaForConditionalGeneration)."
    )


def _features(output) -> torch.Tensor:
    # transformers 4.x returns the projected tensor, 5.x a ModelOutput whose pooler_output it is.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class Adapter:
    """Uniform access to a CLIP, SigLIP or LLaVA model: towers, target layers, inputs, embeddings."""

    def __init__(self, model: nn.Module, processor=None):
        self.family = _family_of(model)
        self.model = model
        self.processor = processor
        self._names = {id(m): n for n, m in model.named_modules()}

    # --- structure -------------------------------------------------------------------------
    @property
    def towers(self) -> tuple[str, ...]:
        return ("vision",) if self.family.name == "llava" else ("text", "vision")

    def tower(self, name: str) -> nn.Module:
        if name not in self.towers:
            raise ValueError(f"{type(self.model).__name__} has no {name!r} tower to edit; towers: {self.towers}.")
        if self.family.name == "llava":
            return next(m for n, m in self.model.named_modules() if n.endswith("vision_tower"))
        return getattr(self.model, f"{name}_model")

    def default_targets(self, tower: str) -> tuple[str, ...]:
        return self.family.text_targets if tower == "text" else self.family.vision_targets

    def encoder_layers(self, tower: str) -> nn.ModuleList:
        for name, module in self.tower(tower).named_modules():
            if isinstance(module, nn.ModuleList) and name.endswith("layers"):
                return module
        raise TypeError(f"Could not find the encoder layers of the {tower} tower of {type(self.model).__name__}.")

    def reachable_layers(self, tower: str) -> int:
        """Number of leading encoder layers whose output reaches the model's output."""
        n_layers = len(self.encoder_layers(tower))
        if self.family.name != "llava":
            return n_layers
        feature_layer = self.model.config.vision_feature_layer
        indices = feature_layer if isinstance(feature_layer, (list, tuple)) else [feature_layer]
        # hidden_states[k] is the output of layer k-1 (hidden_states[0] is the embeddings).
        return max(k % (n_layers + 1) for k in indices)

    def target_layers(self, tower: str, patterns) -> dict[str, nn.Linear]:
        """Full module name -> nn.Linear for every pattern in every reachable encoder block."""
        patterns = self.default_targets(tower) if patterns is None else tuple(patterns)
        if not patterns:
            return {}
        layers = self.encoder_layers(tower)
        found: dict[str, nn.Linear] = {}
        for pattern in patterns:
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

    def preprocess_text(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenised texts on the CPU (safe to call in DataLoader workers), padded to the model's
        fixed text length as CLIP and SigLIP were trained: SigLIP pools the last position, and a
        fixed shape makes an item's embedding independent of the batch it is in (padding to the
        longest caption changes it by float noise, enough to flip exact ties)."""
        tokenizer = getattr(self._require_processor(), "tokenizer", self.processor)
        text_config = getattr(self.model.config, "text_config", None)
        max_length = getattr(text_config, "max_position_embeddings", None) or tokenizer.model_max_length
        batch = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                          return_tensors="pt")
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
