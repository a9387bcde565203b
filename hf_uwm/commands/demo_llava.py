"""`hf-uwm demo-llava`: UWM and caption attribution on the bundled organism captioner, beside random controls."""

from __future__ import annotations

import time
from pathlib import Path

from .common import common_args


def register(commands):
    demo = commands.add_parser(
        "demo-llava", help="UWM and caption attribution on the bundled organism captioner, beside random controls",
        description="On the bundled LLaVA organism captioner: calibrate UWM and caption attribution on its vision "
                    "tower, choose each setting on validation captions, report test captions beside random controls.")
    demo.add_argument("--output", default="uwm-llava-demo",
                      help="folder for deltas and results (default ./uwm-llava-demo)")
    demo.add_argument("--max-rouge-drop", type=float, default=5.0,
                      help="largest ROUGE-L loss on safe images, in points, a chosen setting may cost (default 5)")
    demo.add_argument("--no-meteor", action="store_true",
                      help="skip METEOR (by default it is computed when a WordNet is installed, and the results "
                           "say plainly when it is not)")
    demo.add_argument("--threads", type=int, default=1,
                      help="torch threads (default 1: the captioner is so small that more threads mostly wait)")
    demo.add_argument("--captioner", help="a captioner folder saved by scripts/train_captioner.py (default: bundled)")
    common_args(demo)
    demo.set_defaults(run=run)


def run(args):
    import torch

    from ..llava_demo import run

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    run(Path(args.output), max_rouge_drop=args.max_rouge_drop, meteor=False if args.no_meteor else None, seed=args.seed,
        batch_size=args.batch_size, progress=not args.quiet, captioner=args.captioner)
    print(f"\nLLaVA demo finished in {time.perf_counter() - start:.0f} s; results in {args.output}/")
