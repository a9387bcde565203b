"""Captioning with LLaVA: chat-formatted prompts, batched greedy captions, teacher-forced log-likelihoods.

The model operations that evaluation (`hf_uwm.caption_evaluation`) and the caption methods
(`hf_uwm.methods.caption_attribution`, `caption_iterative`) build on; nothing here judges or scores
a caption.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from .errors import UnsupportedModelError

DEFAULT_PROMPT = "Describe the image."


# --- generation ---------------------------------------------------------------------------------

@contextmanager
def padding_side(tokenizer, side: str):
    """Pad on `side` (generation pads on the left); the tokenizer's own setting is restored afterwards."""
    before = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = before


def _chat(processor, prompt: str, caption: str | None = None) -> str:
    """The chat-formatted prompt (ending with the assistant's turn opening), or prompt and caption."""
    if not getattr(processor, "chat_template", None):
        raise ValueError("The processor has no chat template: pass a LLaVA processor saved with one "
                         "(processor.chat_template), e.g. AutoProcessor.from_pretrained('llava-hf/llava-1.5-7b-hf').")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    if caption is None:
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    conversation.append({"role": "assistant", "content": [{"type": "text", "text": caption}]})
    return processor.apply_chat_template(conversation)


def _to_model(inputs, model) -> dict:
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}


@torch.no_grad()
def generate_captions(model, processor, images, prompt: str | Sequence[str] = DEFAULT_PROMPT, *,
                      max_new_tokens: int = 32, batch_size: int = 16, progress: bool = True,
                      **generate_kwargs) -> list[str]:
    """One caption per image from a `LlavaForConditionalGeneration` and its processor.

    The prompt (one for all images, or one per image) goes through the processor's chat template;
    batches are left-padded, decoding is greedy unless `generate_kwargs` say otherwise, and only the
    generated tokens are decoded. Batched captions equal one-by-one captions.
    """
    if not callable(getattr(model, "generate", None)):
        raise UnsupportedModelError(f"Captioning needs a model that writes text, such as LlavaForConditionalGeneration; "
                        f"{type(model).__name__} does not. Measure a CLIP or SigLIP with `hf-uwm eval` "
                        "(hf_uwm.evaluation.evaluate_model) instead.")
    images = list(images)
    prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(images):
        raise ValueError(f"Got {len(prompts)} prompts for {len(images)} images: pass one prompt, or one per image.")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    tokenizer = processor.tokenizer
    settings = {"do_sample": False, "max_new_tokens": max_new_tokens,
                "pad_token_id": tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id,
                **generate_kwargs}
    captions = []
    with padding_side(tokenizer, "left"):
        for start in tqdm(range(0, len(images), batch_size), desc="captions", disable=not progress):
            batch_images = [im.convert("RGB") for im in images[start:start + batch_size]]
            texts = [_chat(processor, p) for p in prompts[start:start + batch_size]]
            inputs = _to_model(processor(images=batch_images, text=texts, padding=True, return_tensors="pt"), model)
            output = model.generate(**inputs, **settings)                  # (B, prompt + new)
            new_tokens = output[:, inputs["input_ids"].shape[1]:]           # (B, new)
            captions += [c.strip() for c in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return captions


def caption_inputs(processor, images, captions: Sequence[str], prompt: str = DEFAULT_PROMPT) -> dict:
    """CPU inputs for teacher-forcing `captions` on `images` (right-padded), with `caption_start`:
    the position of each caption's first token (after the chat-formatted prompt)."""
    images, captions = [im.convert("RGB") for im in images], list(captions)
    if len(images) != len(captions):
        raise ValueError(f"Got {len(captions)} captions for {len(images)} images: pass one caption per image.")
    with padding_side(processor.tokenizer, "right"):
        prompt_length = len(processor(images=images[:1], text=[_chat(processor, prompt)])["input_ids"][0])
        inputs = dict(processor(images=images, text=[_chat(processor, prompt, c) for c in captions],
                                padding=True, return_tensors="pt"))
    inputs["caption_start"] = torch.full((len(captions),), prompt_length)
    return inputs


def log_likelihood(model, inputs: dict) -> torch.Tensor:
    """(B,) the summed log-probabilities of each caption's tokens (end-of-turn tokens included) given
    its image and prompt, from `caption_inputs` output. Differentiable."""
    return token_log_likelihoods(model, inputs).sum(-1)


def token_log_likelihoods(model, inputs: dict) -> torch.Tensor:
    """(B, L - 1) log p of token t + 1 at position t for the caption's tokens, 0 elsewhere (prompt,
    padding), from `caption_inputs` output. Right padding only appends, so a caption's position t
    is the same in any batch. Differentiable."""
    return next_token_log_probs(model, inputs)[1]


def next_token_log_probs(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log_probs, token_log_likelihoods, caption) from `caption_inputs` output: the (B, L - 1, vocab)
    log-softmax at every position (float32 or finer), the (B, L - 1) log p of the token that follows
    each caption position (0 elsewhere), and the (B, L - 1) mask of the positions that predict a
    caption token. Differentiable."""
    inputs = _to_model(inputs, model)
    start = inputs.pop("caption_start")                                            # (B,)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]                     # (B, L) right-padded
    positions = torch.arange(1, ids.shape[1], device=ids.device)                   # token t predicted at t - 1
    caption = mask[:, 1:].bool() & (positions[None, :] >= start[:, None])         # (B, L - 1)
    logits = model(**inputs).logits[:, :-1]                                        # (B, L - 1, vocab)
    log_probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    return log_probs, log_probs.gather(-1, ids[:, 1:, None]).squeeze(-1) * caption, caption


def caption_log_likelihood(model, processor, images, captions: Sequence[str],
                           prompt: str = DEFAULT_PROMPT) -> torch.Tensor:
    """(B,) log p(caption | image, prompt), teacher-forced through the chat template. Differentiable."""
    return log_likelihood(model, caption_inputs(processor, images, captions, prompt))
