"""Benchmark: UWM calibration against a plain forward and a literal implementation of SPEC §2.

Random-weight CLIPs at ViT-B/32 or ViT-L/14 size are built from configs (no download). For the same
N pairs and batch size the script measures, each phase in a fresh process so peak memory is its own:

  (a) forward   a plain forward of the targeted towers over the same pairs and batches, no hooks,
                texts tokenised with the tokenizer's padding=True (to each batch's longest)
  (b) calibrate UWMEditor.calibrate
  (c) literal   per item and per weight φ materialised as a (B, out, in) tensor per layer per batch,
                sums moved to the CPU (the style of the official code)

Inputs are PIL images and captions, preprocessed in every phase by `--workers` DataLoader workers
(use several on a GPU, so that preprocessing does not set the pace). The phases run in turn, `--repeats`
times (a b c a b c ...), so that drifts of a shared machine hit all of them alike; the table gives
the median wall time and the largest peak memory of each, and the ratios b/a and c/b.

    python benchmarks/bench_calibration.py --size b32 --pairs 64 --batch 16
    python benchmarks/bench_calibration.py --size l14 --pairs 1024 --batch 128 --device cuda --dtype bf16 --workers 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time

from pathlib import Path

import numpy as np
import torch

SIZES = {
    "b32": dict(text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
                vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            image_size=224, patch_size=32), projection_dim=512),
    "l14": dict(text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
                vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=224, patch_size=14), projection_dim=768),
}
TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "clip-tokenizer"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(size: str, device: str):
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    spec = SIZES[size]
    torch.manual_seed(0)
    config = CLIPConfig(text_config={**spec["text"], "vocab_size": 49408, "max_position_embeddings": 77},
                        vision_config=spec["vision"], projection_dim=spec["projection_dim"])
    model = CLIPModel(config).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)  # the real CLIP BPE tokenizer, shipped for tests
    images = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    return model, CLIPProcessor(image_processor=images, tokenizer=tokenizer)


WORDS = ("a photo of the man woman dog cat car street table red blue green small large old young near next "
         "to with on in under holding running sitting standing park room city").split()


def make_data(n: int):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    caption = lambda k: " ".join(rng.choice(WORDS, k))  # noqa: E731
    safe = [caption(int(rng.integers(8, 16))) for _ in range(n)]
    image = lambda: Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))  # noqa: E731
    return datasets.Dataset.from_dict(
        {"safe_text": safe, "unsafe_text": [s + " " + caption(6) for s in safe],
         "safe_image": [image() for _ in range(n)], "unsafe_image": [image() for _ in range(n)]},
        features=datasets.Features({"safe_text": datasets.Value("string"), "unsafe_text": datasets.Value("string"),
                                    "safe_image": datasets.Image(), "unsafe_image": datasets.Image()}))


def batches(editor, dataset, batch: int, tower: str, workers: int, plain: bool = False):
    """Device inputs of [safe; unsafe] items, preprocessed in DataLoader workers as calibrate does
    (`plain`: texts tokenised as a plain forward would, padded to each batch's longest)."""
    from accelerate import PartialState

    from hf_uwm.methods import Calibration

    run = Calibration(dataset, PartialState(cpu=editor.family.device.type == "cpu"), editor.family, batch,
                      progress=False, num_workers=workers)
    preprocess = _PlainTexts(editor.processor.tokenizer) if plain and tower == "text" else run.preprocess(tower)
    for _, _, inputs in run.batches(preprocess, tower):
        yield editor.family.to_device(inputs)


class _PlainTexts:
    """rows -> [safe; unsafe] texts, tokenizer(..., padding=True) (picklable for DataLoader workers)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, rows):
        tokens = self.tokenizer(rows["safe_text"] + rows["unsafe_text"], padding=True, truncation=True,
                                return_tensors="pt")
        return {k: tokens[k] for k in ("input_ids", "attention_mask")}


def plain_forward(editor, dataset, batch, autocast, workers=0):
    with torch.no_grad():
        for tower in editor.towers:
            for inputs in batches(editor, dataset, batch, tower, workers, plain=True):
                with autocast:
                    editor.family.run_tower(tower, inputs)


def literal(editor, tower_batches, autocast=contextlib.nullcontext(), dtype=torch.float32):
    """φ per item and per weight, as written in SPEC §2, summed on the CPU.

    tower_batches: (tower, device inputs of [safe; unsafe] items) per batch. Returns Σ_b ρᵇ per layer,
    (out, in) float64 on the CPU (the scores before dividing by N and the magnitude prior). `dtype`:
    the precision of the statistics (float64 gives a reference for the same activations).
    """
    from hf_uwm.methods.uwm import token_statistics

    eps, sums, handles, state = editor.config.eps, {}, [], {}

    def hook(name, layer):
        def run(module, args, output):
            n, sd = token_statistics(args[0].to(dtype), state.get("mask"))
            w = layer.weight.detach().abs().to(dtype)                         # (out, in)
            a = n @ w.T / w.shape[1]                                          # (2B, out)
            phi = a[:, :, None] * (n * w.mean(0))[:, None, :] / (sd + eps)[:, None, :]   # (2B, out, in)
            half = phi.shape[0] // 2
            ratio = (phi[half:] / phi[:half]).sum(0).double().cpu()
            sums[name] = sums.get(name, 0) + ratio
        return run

    try:
        for name, layer in editor.target_layers.items():
            handles.append(layer.register_forward_hook(hook(name, layer)))
        with torch.no_grad():
            for tower, inputs in tower_batches:
                state["mask"] = inputs.get("attention_mask")
                with autocast:
                    editor.family.run_tower(tower, inputs)
    finally:
        for h in handles:
            h.remove()
    return sums


def phase(args):
    from hf_uwm import UWMConfig, UWMEditor

    model, processor = build(args.size, args.device)
    dtype = DTYPES[args.dtype]
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    autocast = torch.autocast(args.device, dtype=dtype, enabled=dtype != torch.float32)
    editor = UWMEditor(model, processor, UWMConfig(batch_size=args.batch))
    dataset = make_data(args.pairs)
    plain_forward(editor, dataset.select(range(min(len(dataset), args.batch))), args.batch, autocast)  # warm-up
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if args.phase == "forward":
        plain_forward(editor, dataset, args.batch, autocast, args.workers)
    elif args.phase == "calibrate":
        editor.calibrate(dataset, progress=False, num_workers=args.workers,
                         autocast=None if dtype == torch.float32 else dtype)
    else:
        literal(editor, ((tower, inputs) for tower in editor.towers
                         for inputs in batches(editor, dataset, args.batch, tower, args.workers)), autocast)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(json.dumps({"phase": args.phase, "seconds": seconds, "peak_gib": peak_gib(args.device)}))


def peak_gib(device: str) -> float:
    """Peak GPU memory allocated on a GPU, else this process's peak RSS, in GiB."""
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return peak / 2**30


def interleaved(script: str, flag: str, names: list[str], argv: list[str], repeats: int) -> dict[str, list[dict]]:
    """Each name's phase run `repeats` times, each run in a fresh process (its peak memory is its own)
    and the names taking turns (a b a b ...); a run's result is the JSON of its last stdout line."""
    runs = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            out = subprocess.run([sys.executable, script, flag, name, *argv], capture_output=True, text=True,
                                 check=True).stdout.strip().splitlines()[-1]
            runs[name].append(json.loads(out))
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="b32")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="pairs per batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="forward precision")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers preprocessing inputs, every phase")
    parser.add_argument("--phases", default="forward,calibrate,literal")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each phase, interleaved")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        return phase(args)
    runs = interleaved(__file__, "--phase", args.phases.split(","),
                       [f"--{k}={v}" for k, v in vars(args).items() if k not in ("phase", "phases", "repeats")],
                       args.repeats)
    sec = {k: float(np.median([r["seconds"] for r in v])) for k, v in runs.items()}
    mem = {k: max(r["peak_gib"] for r in v) for k, v in runs.items()}
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{args.size}, {args.pairs} pairs, batch {args.batch}, {args.dtype} forward, {device}, "
          f"median of {args.repeats}")
    print(f"{'phase':<10} {'seconds':>9} {'peak GiB':>9}   all runs (s)")
    for name, v in runs.items():
        print(f"{name:<10} {sec[name]:>9.2f} {mem[name]:>9.2f}   " + " ".join(f"{r['seconds']:.2f}" for r in v))
    if "forward" in sec and "calibrate" in sec:
        print(f"calibrate / forward: time {sec['calibrate'] / sec['forward']:.2f}x, "
              f"peak memory {mem['calibrate'] / mem['forward']:.2f}x")
    if "literal" in sec and "calibrate" in sec:
        print(f"literal / calibrate: time {sec['literal'] / sec['calibrate']:.2f}x, "
              f"peak memory {mem['literal'] / mem['calibrate']:.2f}x")


if __name__ == "__main__":
    main()
