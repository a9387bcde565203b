"""`hf-uwm demo`: calibrate, edit and evaluate the bundled model organism."""

from __future__ import annotations

import time

from ..paths import ORGANISM
from .common import base_id, common_args


def register(commands):
    demo = commands.add_parser("demo", help="calibrate, edit and evaluate the bundled model organism",
                               description="On a model organism: choose settings for UWM, attribution and "
                                           "iterative attribution on validation data (within a zero-shot budget, "
                                           "beating a random control of the same size), then report each beside "
                                           "its random control on test data, with bootstrap 95% intervals.")
    demo.add_argument("--model", default=ORGANISM,
                      help="a CLIP trained on an organism world: 'organism' (world 2, the default), "
                           "'organism-hard' (world 3) or a folder saved by scripts/train_organism.py "
                           "(its training.json names its world)")
    demo.add_argument("--output", default="uwm-demo", help="folder for deltas, tables and plots (default ./uwm-demo)")
    demo.add_argument("--overwrite", action="store_true", help="replace a previous demo's results in --output")
    from ..demo import MAX_ZERO_SHOT_DROP  # the module imports no torch: --help stays fast

    demo.add_argument("--max-zero-shot-drop", type=float, default=MAX_ZERO_SHOT_DROP,
                      help=f"largest zero-shot loss in points a chosen setting may cost on validation "
                           f"(default {MAX_ZERO_SHOT_DROP:g})")
    demo.add_argument("--threads", type=int, default=1,
                      help="torch threads (default 1: the organism is so small that more threads mostly wait)")
    common_args(demo)
    demo.set_defaults(run=run)


def run(args):
    import resource

    import torch

    from ..demo import check_output, run
    from ..loading import load_model
    from ..organism import world_of

    output = check_output(args.output, args.overwrite)  # before any model work
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, processor = load_model(args.model)
    run(output, model=model, processor=processor, base_model=base_id(args.model),
        max_zero_shot_drop=args.max_zero_shot_drop, seed=args.seed, batch_size=args.batch_size,
        progress=not args.quiet, world=world_of(args.model), overwrite=args.overwrite)
    cpu = resource.getrusage(resource.RUSAGE_SELF).ru_utime
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s ({cpu:.0f} s user CPU time, {args.threads} torch "
          f"thread(s)); results in {output}/")
