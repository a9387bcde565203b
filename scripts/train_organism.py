"""Train the bundled model organism: a small CLIP on the procedural world of `hf_uwm.organism`.

    python scripts/train_organism.py                 # the bundled model, ~15 min on 2 CPU cores
    python scripts/train_organism.py --world 3       # the bundled world-3 model `organism-hard`
    python scripts/train_organism.py --evaluate-only # re-print the numbers of the saved model

Deterministic from --seed: fixed data, seeded initialisation and batch order. Bitwise equality
across machines or thread counts is not promised (float reductions depend on them), so run it
with the default 2 threads to reproduce the shipped weights.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import time
from pathlib import Path

import numpy as np
import torch

from hf_uwm import organism
from hf_uwm.formatting import interval

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")  # ids 0-3: EOS must not be 2, see `build_model`
MAX_LENGTH = 24
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2, choices=organism.WORLDS,
                        help="2: the bundled `organism`; 3: `organism-hard` (unseen concepts, paraphrases, look-alikes)")
    parser.add_argument("--output", default=None,
                        help="where to save the model (default: the bundled folder of --world)")
    parser.add_argument("--examples", type=int, default=60_000, help="training images (one caption each)")
    parser.add_argument("--epochs", type=float, default=6, help="passes over the training images")
    parser.add_argument("--unsafe-fraction", type=float, default=0.35)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--group", type=int, default=16, help="batch runs sharing colour and background")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-pairs", type=int, default=1000, help="test quadruples for the final report")
    parser.add_argument("--evaluate-only", action="store_true", help="skip training; report on --output")
    args = parser.parse_args()
    args.output = args.output or organism.organism_folder(args.world)
    return args


# --- data ---------------------------------------------------------------------------------------

def training_data(n: int, seed: int, unsafe_fraction: float, workers: int, world: int = 2):
    """n (image, caption) pairs and each scene's (colour, background) key; a fraction are unsafe renders.

    Captions vary the prefix, sometimes drop the colour or the background and sometimes end with a
    full stop, so that short zero-shot prompts ("a photo of a cat.") are in distribution. Every
    example has its own seed, so the result does not depend on `workers`.
    """
    chunks = [(start, min(n, start + 2000), seed, unsafe_fraction, world) for start in range(0, n, 2000)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        parts = pool.map(_render_chunk, chunks)
    images, captions, keys = (np.concatenate([p[0] for p in parts]), [c for p in parts for c in p[1]],
                              np.concatenate([p[2] for p in parts]))
    return images, captions, keys


def _render_chunk(chunk):
    start, stop, seed, unsafe_fraction, world = chunk
    images, captions, keys = [], [], []
    for i in range(start, stop):
        rng = np.random.default_rng([seed, 1000, i])
        scene = organism.training_scene(i, seed, world)
        unsafe = bool(rng.random() < unsafe_fraction)
        images.append(np.asarray(organism.render(scene, unsafe)))
        keys.append(list(organism.COLOURS).index(scene.colour) * len(organism.BACKGROUNDS)
                    + list(organism.BACKGROUNDS).index(scene.background))
        caption = scene.caption(unsafe, prefix=organism.PREFIXES[rng.integers(len(organism.PREFIXES))],
                                colour=bool(rng.random() > 0.4), background=bool(rng.random() > 0.4))
        captions.append(caption + "." * int(rng.random() < 0.5))
    return np.stack(images), captions, np.asarray(keys)


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """What CLIPImageProcessor does to a 32x32 image (rescale, normalise), in one tensor operation."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def build_tokenizer(captions):
    """A word-level tokenizer over the world's words: lowercase, split on spaces and punctuation."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    words = {w for c in captions for w, _ in split.pre_tokenize_str(c.lower())}
    vocab = {w: i for i, w in enumerate(list(SPECIALS) + sorted(words))}  # unseen words map to <unk>
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=MAX_LENGTH)


def build_processor(tokenizer):
    from transformers import CLIPImageProcessor, CLIPProcessor

    images = CLIPImageProcessor(size={"shortest_edge": organism.SIZE},
                                crop_size={"height": organism.SIZE, "width": organism.SIZE},
                                image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def build_model(tokenizer):
    from transformers import CLIPConfig, CLIPModel

    tower = dict(hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4)
    # CLIP pools text at the first eos_token_id; with eos_token_id == 2 it would take argmax(input_ids).
    text = dict(tower, vocab_size=len(tokenizer), max_position_embeddings=MAX_LENGTH,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    vision = dict(tower, image_size=organism.SIZE, patch_size=8)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=96))


# --- training -----------------------------------------------------------------------------------

def cosine_with_warmup(optimizer, total_steps: int, warmup: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def hard_negative_batches(keys: torch.Tensor, batch_size: int, group: int, generator) -> torch.Tensor:
    """One epoch of batches (rows of indices) made of `group`-long runs of examples sharing a key.

    The key is the scene's colour and background: in-batch negatives that share them differ from
    the positive by noun and unsafe element, which is what the organism must learn (random batches
    are separable by colour and background alone, and shapes were not learnt within the budget).
    """
    order = torch.randperm(len(keys), generator=generator)
    order = order[torch.argsort(keys[order], stable=True)]  # grouped by key, random within a key
    runs = order[: len(order) // group * group].view(-1, group)
    runs = runs[torch.randperm(len(runs), generator=generator)]
    per_batch = batch_size // group
    return runs[: len(runs) // per_batch * per_batch].reshape(-1, per_batch * group)


def train(model, pixels, tokens, keys, args):
    batches_per_epoch = len(pixels) // args.batch_size
    total = int(args.epochs * batches_per_epoch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    schedule = cosine_with_warmup(optimizer, total, warmup=max(1, total // 20))
    order = torch.Generator().manual_seed(args.seed)
    model.train()
    start, step, losses = time.time(), 0, []
    while step < total:
        for batch in hard_negative_batches(keys, args.batch_size, args.group, order):
            length = int(tokens["attention_mask"][batch].sum(1).max())  # pad to the batch's longest caption only
            out = model(pixel_values=pixels[batch], input_ids=tokens["input_ids"][batch, :length],
                        attention_mask=tokens["attention_mask"][batch, :length], return_loss=True)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(out.loss.item())
            step += 1
            if step % 20 == 0 or step == total:
                print(f"step {step}/{total}  loss {np.mean(losses[-20:]):.4f}  "
                      f"logit scale {model.logit_scale.exp().item():.1f}  {time.time() - start:.0f}s", flush=True)
            if step == total:
                break
    return model.eval()


def check_processor_matches(processor, images: np.ndarray, pixels: torch.Tensor):
    """The saved processor must turn images into exactly what the model was trained on."""
    from PIL import Image

    processed = processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")["pixel_values"]
    if not torch.allclose(processed, pixels, atol=1e-5):
        raise RuntimeError("CLIPImageProcessor output differs from the training preprocessing.")


# --- report -------------------------------------------------------------------------------------

def evaluate(model, processor, eval_pairs: int, seed: int, world: int = 2):
    """Zero-shot accuracy over the safe classes and SafeGround on test quadruples (SPEC §4)."""
    from hf_uwm.evaluation import ZeroShotTask, evaluate_model

    images, labels, class_names = organism.zero_shot_task(70 * len(organism.NOUNS), seed, world=world)
    dataset = organism.make_pairs(eval_pairs, seed, split="test", world=world)
    return evaluate_model(model, processor, dataset, zero_shot=ZeroShotTask(images, labels, class_names),
                          progress=False)


WORLD3_INTRO = [
    "# hf_uwm model organism of world 3 (`organism-hard`)",
    "",
    "A small `transformers.CLIPModel` trained from scratch on world 3 of `hf_uwm.organism`: world 2's",
    f"{len(organism.NOUNS)} object classes and splits, with {len(organism.CONCEPTS_HARD)} unsafe concepts "
    f"({', '.join(organism.CONCEPTS_HARD)}),",
    "synonyms for the shared unsafe words, safe look-alikes (red paint, a toy pistol, a wooden spatula, a lit",
    "candle, a coiled rope, a balloon, an ice cube) in safe renders, and unsafe renders without the shared",
    "darkening/splatter cues. It was trained on every concept and both synonym halves; the demo calibrates",
    f"on the train split, which never holds the held-out concepts ({', '.join(organism.HELD_OUT)}) nor the",
    "held-out synonyms. It is a test organism, not a useful vision model. Its world is recorded in `training.json`.",
    "",
]


def write_readme(folder: Path, training: dict, report: str | None, eval_pairs: int):
    intro = WORLD3_INTRO if training.get("world", 2) == 3 else [
        "# hf_uwm model organism (world 2)",
        "",
        "A small `transformers.CLIPModel` trained from scratch on the procedural world of",
        f"`hf_uwm.organism`: {len(organism.NOUNS)} safe object classes drawn as rimmed glyphs on 32x32",
        "backgrounds, each scene also rendered unsafe (blood over the object; a knife, gun or syringe",
        "beside it; a skull instead of it) with",
        "shared cues (dark-red splatter, dark jagged shapes, darkening) and shared caption words",
        "(bloody, dead, violent, dangerous). It learns unsafe associations for UWM to remove; it is a",
        "test organism, not a useful vision model.",
        "",
    ]
    lines = intro + [
        "- Both towers: hidden 96, MLP 384, 3 layers, 4 heads; images 32x32, patch 8; projection 96.",
        "- Word-level tokenizer (`<pad>`=0, `<unk>`=1, `<bos>`=2, `<eos>`=3), max length 24.",
        f"- Training: {training['examples']} procedural images ({training['unsafe_fraction']:.0%} unsafe renders), "
        f"{training['epochs']:g} epochs,",
        f"  batch {training['batch_size']}, AdamW lr {training['lr']:g} (weight decay 0.1), 5% warmup then cosine, "
        f"seed {training['seed']}, {training['threads']} CPU threads",
        "  (all settings in `training.json`). Captions vary their prefix and sometimes drop the colour or the",
        f"  background; batches are made of runs of {training['group']} scenes sharing colour and background, so",
        "  that in-batch negatives differ by noun and unsafe element.",
        f"- Regenerate: `python scripts/train_organism.py --world {training.get('world', 2)}` "
        "(deterministic from `--seed`); it took "
        f"{training['wall_s'] / 60:.1f} min on 2 shared CPU cores.",
        "",
        "Load it with `AutoModel.from_pretrained(folder)` and `AutoProcessor.from_pretrained(folder)`,",
        f"or `hf_uwm.organism.load_organism(world={training.get('world', 2)})`.",
    ]
    if report:
        lines += ["", f"Measured on {eval_pairs} test quadruples and "
                  f"{70 * len(organism.NOUNS)} zero-shot test images (held-out noun/colour/background combos):",
                  "", "```", report, "```"]
    (folder / "README.md").write_text("\n".join(lines) + "\n")


def format_report(report) -> str:
    keys = ("P_s^t", "P_u^t", "P_s^v", "P_u^v", "PS", "PU", "GS")
    lines = [f"zero-shot  {report.zero_shot:5.1f}   ({len(organism.NOUNS)} safe classes)"]
    for key in keys:
        bounds = report.intervals.get(key, (float("nan"),) * 2)
        lines.append(f"{key:10s} {report.safeground[key]:5.1f}   95% CI {interval(bounds)}")
    return "\n".join(lines)


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    folder = Path(args.output)
    if not args.evaluate_only:
        wall_s = build_and_train(folder, args)
        settings = {k: v for k, v in vars(args).items() if k not in ("output", "evaluate_only", "eval_pairs")}
        (folder / "training.json").write_text(json.dumps({**settings, "wall_s": round(wall_s)}, indent=2) + "\n")
        # written before evaluating too, so the folder is complete even if the evaluation fails
        write_readme(folder, json.loads((folder / "training.json").read_text()), None, args.eval_pairs)
    from transformers import AutoModel, AutoProcessor

    model, processor = AutoModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
    report = format_report(evaluate(model, processor, args.eval_pairs, args.seed, args.world))
    print(report)
    write_readme(folder, json.loads((folder / "training.json").read_text()), report, args.eval_pairs)


def build_and_train(folder: Path, args) -> float:
    """Generate the data, train, save model and processor to `folder`; return the wall time in seconds."""
    start = time.time()
    images, captions, keys = training_data(args.examples, args.seed, args.unsafe_fraction, workers=args.threads,
                                           world=args.world)
    print(f"data: {len(images)} images in {time.time() - start:.0f}s", flush=True)
    tokenizer = build_tokenizer(captions)
    processor = build_processor(tokenizer)
    tokens = tokenizer(captions, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    pixels = pixel_values(images)
    check_processor_matches(processor.image_processor, images[:8], pixels[:8])
    model = build_model(tokenizer)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"vocabulary {len(tokenizer)}", flush=True)
    train(model, pixels, tokens, torch.from_numpy(keys), args)
    wall_s = time.time() - start
    print(f"training wall time: {wall_s / 60:.1f} min", flush=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return wall_s


if __name__ == "__main__":
    main()
