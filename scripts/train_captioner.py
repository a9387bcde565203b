"""Train the bundled organism captioner: a small LLaVA that captions the scenes of `hf_uwm.organism`.

    python scripts/train_captioner.py                  # the bundled model (see training.json for its wall time)
    python scripts/train_captioner.py --evaluate-only  # re-print the numbers of the saved model
    python scripts/train_captioner.py --world 3 --output zoo_cache/captioner-world3   # world 3 (organism-hard)

The vision tower starts from the vision tower of the world's bundled organism CLIP (`organism`, or
`organism-hard` for world 3) and is fine-tuned at a tenth of the learning rate; the projector and
the word-level Llama decoder are trained from scratch. Each training scene gives two examples, its
safe and its unsafe render, each with its own caption, so the captioner learns to name unsafe
elements when they are there. World 3's scenes are those its CLIP was trained on (every concept,
held-out ones too, and both halves of the synonyms), so that the unedited captioner names what its
test split holds. Deterministic from --seed: fixed data, seeded initialisation and batch order
(bitwise equality across machines or thread counts is not promised; run with the default 2 threads
to reproduce the shipped weights).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from hf_uwm import organism, organism_captioner


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=organism_captioner.captioner_path(), help="where to save the model")
    parser.add_argument("--scenes", type=int, default=8_000, help="training scenes (two examples each)")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--vision-lr-scale", type=float, default=0.1, help="vision tower lr = lr x this")
    parser.add_argument("--hidden", type=int, default=96, help="decoder width")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--world", type=int, choices=organism.WORLDS, default=2,
                        help="the organism world (2: the bundled captioner's, 3: organism-hard's)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared machine more threads mostly wait)")
    parser.add_argument("--eval-pairs", type=int, default=300, help="test quadruples for the final report")
    parser.add_argument("--evaluate-only", action="store_true", help="skip training; report on --output")
    parser.add_argument("--no-meteor", action="store_true", help="report without METEOR (it needs nltk's WordNet)")
    return parser.parse_args()


# --- data ---------------------------------------------------------------------------------------

def training_data(n_scenes: int, seed: int, workers: int, world: int = 2):
    """Images (2n, 32, 32, 3) and captions: scene i's safe render at 2i, its unsafe render at 2i + 1."""
    chunks = [(start, min(n_scenes, start + 1000), seed, world) for start in range(0, n_scenes, 1000)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        parts = pool.map(_render_chunk, chunks)
    return np.concatenate([p[0] for p in parts]), [c for p in parts for c in p[1]]


def _render_chunk(chunk):
    start, stop, seed, world = chunk
    images, captions = [], []
    for i in range(start, stop):
        scene = organism.training_scene(i, seed, world)   # world 2: the train split's scene i
        for unsafe in (False, True):
            images.append(np.asarray(organism.render(scene, unsafe)))
            captions.append(scene.caption(unsafe))
    return np.stack(images), captions


def encode(processor, images: np.ndarray, captions: list[str]):
    """(pixel_values, input_ids, attention_mask, labels): the chat-formatted caption is the only target."""
    from PIL import Image

    prompt = processor.apply_chat_template(_conversation(), add_generation_prompt=True)
    texts = [processor.apply_chat_template(_conversation(c)) for c in captions]
    batch = processor(images=[Image.fromarray(im) for im in images], text=texts, padding=True, return_tensors="pt")
    prompt_length = len(processor(images=[Image.fromarray(images[0])], text=[prompt])["input_ids"][0])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :prompt_length] = -100
    return batch["pixel_values"], batch["input_ids"], batch["attention_mask"], labels


def _conversation(caption: str | None = None) -> list[dict]:
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": organism_captioner.PROMPT}]}]
    if caption is not None:
        turns.append({"role": "assistant", "content": [{"type": "text", "text": caption}]})
    return turns


# --- training -----------------------------------------------------------------------------------

def train(model, tensors, args) -> list[float]:
    pixels, ids, mask, labels = tensors
    vision = [p for n, p in model.named_parameters() if "vision_tower" in n]
    others = [p for n, p in model.named_parameters() if "vision_tower" not in n]
    optimizer = torch.optim.AdamW([{"params": others, "lr": args.lr},
                                   {"params": vision, "lr": args.lr * args.vision_lr_scale}], weight_decay=0.01)
    steps_per_epoch = len(ids) // args.batch_size
    total = int(steps_per_epoch * args.epochs)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[args.lr, args.lr * args.vision_lr_scale],
                                                   total_steps=total, pct_start=0.05, anneal_strategy="cos")
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.cat([torch.randperm(len(ids), generator=generator) for _ in range(int(np.ceil(args.epochs)))])
    model.train()
    losses = []
    for step in range(total):
        rows = order[step * args.batch_size:(step + 1) * args.batch_size]
        length = int(mask[rows].sum(1).max())  # right-padded: drop the all-padding tail of the batch
        loss = model(pixel_values=pixels[rows], input_ids=ids[rows, :length], attention_mask=mask[rows, :length],
                     labels=labels[rows, :length]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == total - 1:
            print(f"step {step:5d}/{total}  loss {np.mean(losses[-100:]):.4f}", flush=True)
    return losses


# --- evaluation ---------------------------------------------------------------------------------

def evaluate(folder: Path, eval_pairs: int, seed: int, meteor: bool, world: int) -> dict:
    """Captioning quality on test scenes: text metrics on safe renders, unsafe mentions on unsafe ones."""
    from hf_uwm.caption_evaluation import evaluate_captioning
    from hf_uwm.organism_captioner import exact_organism_judge

    model, processor = _load(folder)
    pairs = organism.make_pairs(eval_pairs, seed=seed, split="test", world=world)
    report = evaluate_captioning(model, processor, pairs, judge=partial(exact_organism_judge, world=world),
                                 meteor=meteor, batch_size=64)
    return report.to_dict()


def _load(folder: Path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def write_readme(folder: Path, training: dict, report: dict | None):
    world = training.get("world", 2)
    scenes, clip, flag = (("world 2's 32x32 glyphs on backgrounds, safe or with an unsafe element: blood, a knife, a "
                           "gun, a syringe, a skull", "the bundled organism CLIP's", "") if world == 2 else
                          ("world 3's: world 2's and fire, a noose, a shard, a bomb, synonyms of the unsafe words and "
                           "safe look-alikes", "the world-3 organism CLIP's (`organism-hard`)", " --world 3"))
    lines = [
        "# hf_uwm organism captioner" + ("" if world == 2 else " (world 3)"),
        "",
        "A small `transformers.LlavaForConditionalGeneration` that captions the procedural scenes of",
        f"`hf_uwm.organism` ({scenes}). It is a test organism for editing LLaVA's vision tower, not a useful",
        "captioner.",
        "",
        f"- Vision tower: {clip} (hidden 96, 3 layers, patch 8), fine-tuned at",
        f"  {training['vision_lr_scale']} x the learning rate; features from layer -2 (LLaVA's default), CLS dropped.",
        f"- Language model: a Llama decoder, hidden {training['hidden']}, {training['layers']} layers, over a "
        "word-level vocabulary of the",
        "  organism's captions (lowercased); prompt `USER: <image> Describe the image. ASSISTANT:`",
        "  (the chat template).",
        f"- Training: {training['scenes']} train-split scenes x (safe, unsafe) renders with their captions, "
        f"{training['epochs']} epochs,",
        f"  batch {training['batch_size']}, AdamW lr {training['lr']}, one-cycle cosine schedule, seed "
        f"{training['seed']}, {training['threads']} torch thread(s)",
        f"  ({training['wall_s'] / 60:.1f} min on a shared, loaded 2-core machine). Regenerate: "
        f"`python scripts/train_captioner.py{flag}`.",
        "",
        "Load it with `LlavaForConditionalGeneration.from_pretrained(folder)` and",
        "`AutoProcessor.from_pretrained(folder)`, `hf_uwm.organism_captioner.load_captioner()`, or the name",
        "`organism-captioner` in `hf-uwm eval-captions` and `UWMEditor.from_pretrained`.",
    ]
    if report:
        lines += ["", f"Measured on {report['n_safe']} test-split scenes (held-out noun/colour/background "
                  "combinations), greedy captions, exact judge (a caption is unsafe when it names an unsafe element):",
                  "", "```", _format(report), "```"]
    (folder / "README.md").write_text("\n".join(lines) + "\n")


def _format(report: dict) -> str:
    from hf_uwm.caption_evaluation import CaptioningReport

    return str(CaptioningReport.from_dict(report))


def main():
    from hf_uwm.caption_evaluation import WORDNET_MISSING, wordnet_available

    args = parse_args()
    if not args.no_meteor and not wordnet_available():  # fail before training, not after
        raise SystemExit(WORDNET_MISSING)
    torch.set_num_threads(args.threads)
    folder = Path(args.output)
    if not args.evaluate_only:
        start = time.perf_counter()
        processor = organism_captioner.build_processor(world=args.world)
        images, captions = training_data(args.scenes, args.seed, workers=args.threads, world=args.world)
        tensors = encode(processor, images, captions)
        print(f"data: {len(captions)} examples in {time.perf_counter() - start:.0f} s", flush=True)
        model = organism_captioner.build_captioner(processor.tokenizer, seed=args.seed, hidden=args.hidden,
                                                   layers=args.layers, world=args.world)
        train(model, tensors, args)
        model.eval()
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        training = {k: getattr(args, k) for k in ("scenes", "epochs", "batch_size", "lr", "vision_lr_scale",
                                                  "hidden", "layers", "seed", "threads", "world")}
        training["wall_s"] = round(time.perf_counter() - start)
        (folder / "training.json").write_text(json.dumps(training, indent=2) + "\n")
        print(f"saved to {folder} after {training['wall_s']} s", flush=True)
    training = json.loads((folder / "training.json").read_text())
    report = evaluate(folder, args.eval_pairs, args.seed, meteor=not args.no_meteor, world=training.get("world", 2))
    print(_format(report))
    write_readme(folder, training, report)


if __name__ == "__main__":
    main()
