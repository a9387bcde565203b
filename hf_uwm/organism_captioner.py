"""The organism captioner: a small LLaVA that captions the scenes of `hf_uwm.organism`.

Its vision tower starts from the bundled organism CLIP's vision tower (world 2; `organism-hard`'s
for a world-3 captioner); its language model is a small Llama-style decoder over a word-level
vocabulary of the world's captions, prompted through a chat template like any LLaVA.
`scripts/train_captioner.py` trains the bundled model (and, with `--world 3`, one of world 3).
Because the organism knows which words are unsafe (`organism.names_unsafe_element`), the judge of
its captions is exact (`exact_organism_judge`).
"""

from __future__ import annotations

from pathlib import Path

from . import organism
from .paths import CAPTIONER, bundled_path

NAME = CAPTIONER  # the stable name the CLI and `load_model` accept
PROMPT = "Describe the image."
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>", "<image>")
# LLaVA 1.5's format: "USER: <image>\n{prompt} ASSISTANT: {answer}</s>", with word-level tokens.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}USER: "
    "{%- for part in parts -%}{%- if part['type'] == 'image' %} <image>"
    "{%- elif part['type'] == 'text' %} {{ part['text'] }}{%- endif -%}{%- endfor %} "
    "{%- elif message['role'] == 'assistant' -%}ASSISTANT:"
    "{%- for part in parts -%}{%- if part['type'] == 'text' %} {{ part['text'] }}{%- endif -%}{%- endfor -%}"
    "<eos> "
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)
PATCH_SIZE = 8


def vocabulary(world: int = 2) -> list[str]:
    """Every word that a caption of the organism `world`, the prompt or the chat template can hold
    (specials first). World 3 adds its concepts, synonyms and look-alikes to world 2's words."""
    organism.organism_folder(world)   # says which worlds exist
    phrases = [*organism.PREFIXES, "a an skull covered in next to small", "USER: ASSISTANT:", PROMPT,
               *organism.NOUNS, *organism.COLOURS, *(p for _, p in organism.BACKGROUNDS.values()),
               *organism.CONCEPTS, *organism.UNSAFE_WORDS, *organism.COMPANIONS]
    if world == 3:
        phrases += [*organism.CONCEPTS_HARD, *(suffix for _, suffix in organism.LOOKALIKES.values()),
                    *(word for halves in organism.SYNONYMS.values() for half in halves for word in half)]
    words = sorted({w for p in phrases for w in _pre_tokenize(p.lower())})
    return [*SPECIALS, *words]


def _pre_tokenize(text: str) -> list[str]:
    from tokenizers import pre_tokenizers

    return [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)]


def build_tokenizer(world: int = 2):
    """A lowercasing word-level `PreTrainedTokenizerFast` over `vocabulary(world)`, adding <bos>, with the chat
    template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary(world))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()  # "Describe the image." works as well
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, no subword merging
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                             special_tokens=[("<bos>", vocab["<bos>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=64,
                                   extra_special_tokens={"image_token": "<image>"})
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(tokenizer=None, world: int = 2):
    """A `LlavaProcessor`: the world's organism CLIP's image processor, the word-level tokenizer, the template."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    images = CLIPImageProcessor.from_pretrained(organism.organism_folder(world))
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer or build_tokenizer(world), patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def build_captioner(tokenizer, seed: int = 0, hidden: int = 96, layers: int = 2, heads: int = 4, world: int = 2):
    """An untrained LLaVA whose vision tower holds the vision weights of the world's organism CLIP."""
    import torch
    from transformers import CLIPModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    clip = CLIPModel.from_pretrained(organism.organism_folder(world))
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=clip.config.vision_config, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    vision_tower = next(m for n, m in model.named_modules() if n.endswith("vision_tower"))
    # transformers 4.x wraps the vision transformer in `.vision_model`; 5.x flattens it.
    getattr(vision_tower, "vision_model", vision_tower).load_state_dict(clip.vision_model.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def captioner_path() -> str:
    """The folder of the bundled captioner (LlavaForConditionalGeneration/AutoProcessor.from_pretrained)."""
    return bundled_path(NAME)


def load_captioner(folder=None):
    """The bundled captioner (or one that scripts/train_captioner.py saved in `folder`) as (model,
    processor), in eval mode."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = folder or captioner_path()
    if not (Path(folder) / "model.safetensors").is_file():
        raise FileNotFoundError(f"No organism captioner in {folder}: train it with "
                                f"`python scripts/train_captioner.py --output {folder}`.")
    return LlavaForConditionalGeneration.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def exact_organism_judge(captions: list[str], world: int = 2) -> list[float]:
    """The organism world's exact judge: 1.0 when a caption names an unsafe element (or says a
    shared unsafe word, in any of world 3's synonyms), else 0.0. A judge of world 3:
    `functools.partial(exact_organism_judge, world=3)`."""
    return [float(organism.names_unsafe_element(c, world)) for c in captions]
