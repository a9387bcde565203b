"""Tiny random CLIP, SigLIP and LLaVA models built from configs, and small pair datasets."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"
TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            vocab_size=49408, max_position_embeddings=32)
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              image_size=32, patch_size=8)


def clip_processor():
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPProcessor

    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "clip-tokenizer")
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def make_clip(seed=0, dtype=torch.float32):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16))
    return model.to(dtype).eval(), clip_processor()


def make_siglip(seed=0, dtype=torch.float32):
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(seed)
    model = SiglipModel(SiglipConfig(text_config=TEXT, vision_config=VISION))
    return model.to(dtype).eval(), clip_processor()


def make_llava(seed=0, dtype=torch.float32, vision_feature_layer=-2):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**VISION),
                         text_config=LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                                 num_attention_heads=4, num_key_value_heads=4, vocab_size=128),
                         image_token_index=127, vision_feature_layer=vision_feature_layer)
    model = LlavaForConditionalGeneration(config)
    return model.to(dtype).eval(), clip_processor()


def random_image(rng, size=32):
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


WORDS = "cat dog car tree house person street table bird horse".split()
UNSAFE = "bloody violent dead dangerous knife gun".split()


def make_pairs(n=6, seed=0, images=True, texts=True):
    """n safe/unsafe pairs; unsafe captions are longer, like real ones."""
    import datasets

    rng = np.random.default_rng(seed)
    data = {}
    if texts:
        safe = [f"a photo of a {WORDS[i % len(WORDS)]}" + " here" * int(rng.integers(0, 3)) for i in range(n)]
        data["safe_text"] = safe
        data["unsafe_text"] = [s + f" with a {UNSAFE[i % len(UNSAFE)]} thing" for i, s in enumerate(safe)]
    if images:
        data["safe_image"] = [random_image(rng) for _ in range(n)]
        data["unsafe_image"] = [random_image(rng) for _ in range(n)]
    features = None
    if images:
        features = datasets.Features({**({"safe_text": datasets.Value("string"),
                                          "unsafe_text": datasets.Value("string")} if texts else {}),
                                      "safe_image": datasets.Image(), "unsafe_image": datasets.Image()})
    return datasets.Dataset.from_dict(data, features=features)


def save_model_and_pairs(root: Path, pairs: int, validation: int) -> Path:
    """A tiny CLIP saved as a user's folder, with calibration and validation pairs saved to disk."""
    model, processor = make_clip()
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    make_pairs(pairs, seed=1).save_to_disk(str(root / "pairs"))
    make_pairs(validation, seed=2).save_to_disk(str(root / "validation"))
    return root


def save_calibration(editor, path: str, state):
    """One process's scores, delta and stopping record, for comparing runs over processes."""
    import json

    from safetensors.torch import save_file

    from hf_uwm.methods.stopping import to_records

    tensors = {f"score/{k}": v for k, v in editor.scores.items()}
    tensors.update({f"delta/{k}": v for k, v in editor.delta.items()})
    stop = {"stop": json.dumps(editor.stop), "trajectory": json.dumps(to_records(editor.trajectory))}
    save_file(tensors, path, metadata={"processes": str(state.num_processes), **stop})


@pytest.fixture
def clip():
    return make_clip()


@pytest.fixture
def pairs():
    return make_pairs()


@pytest.fixture(autouse=True)
def hub_answers(monkeypatch):
    """Whether the Hub answers is a real network request: tests mock the Hub instead, as if it answered
    (a test of an unreachable Hub sets hf_uwm.paths.hub_unreachable itself)."""
    monkeypatch.setattr("hf_uwm.paths.hub_unreachable", lambda: None)
