"""What the research runs share: their command line (models, an output folder, torch threads)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def parse_models(description: str, out: str, more=None) -> tuple[argparse.Namespace, Path]:
    """(arguments, output folder made): MODEL... --out OUT --threads N, and what `more(parser)` adds."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--out", default=out)
    parser.add_argument("--threads", type=int, default=1)
    if more is not None:
        more(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    return args, folder
