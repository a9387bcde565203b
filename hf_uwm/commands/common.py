"""What several commands share: common flags, and turning MODEL_OR_DELTA into an editor or a model."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..paths import ORGANISM_WORLDS, bundled_path


def overwrite_arg(p, flag):
    p.add_argument("--overwrite", action="store_true", help=f"replace a delta already in {flag} (refused otherwise)")


def common_args(p):
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="pairs per batch (default 32)")


def hub_args(p):
    p.add_argument("--revision", help="branch, tag or commit of MODEL on the Hub (default: the main branch)")
    p.add_argument("--token", help="Hugging Face token for gated or private models and data "
                                   "(default: HF_TOKEN or `hf auth login`)")


def threads_arg(p):
    p.add_argument("--threads", type=positive, default=None, help="torch CPU threads (default: torch's)")


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def data_args(p, flag, what, split):
    p.add_argument(flag, required=True, dest="data", metavar="DATA", help=what)
    p.add_argument("--split", default=split, help=f"dataset split (default {split})")
    p.add_argument("--samples", type=positive, default=None,
                   help="use this many pairs, drawn with --seed (default: all rows of a dataset; 512 calibration "
                        "and 1000 evaluation pairs of the organism world)")
    p.add_argument("--columns", default=None, help="column mapping, e.g. safe_text=caption,unsafe_text=nsfw")


def report_args(p, written: str):
    """The flags of a command that evaluates a model or a delta (eval, eval-captions)."""
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% CIs (0: none)")
    p.add_argument("--json", dest="json_path", help=f"also write {written} as JSON here")
    p.add_argument("--base", help="for a delta made on a local model folder: that folder")
    p.add_argument("--random-control", action="store_true",
                   help="for a delta: also evaluate a random control flipping as many weights per layer")


def skip_bad_rows_arg(p):
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="drop rows with empty texts, unreadable images or identical safe and unsafe sides (and say "
                        "which) instead of stopping")


def columns(spec: str | None) -> dict | None:
    """--columns safe_text=caption,unsafe_text=nsfw as a mapping."""
    if not spec:
        return None
    try:
        return dict(item.split("=", 1) for item in spec.split(","))
    except ValueError:
        raise ValueError(f"--columns must look like safe_text=caption,unsafe_text=nsfw; got {spec!r}.") from None


def base_id(name: str) -> str:
    return bundled_path(name) if name in ORGANISM_WORLDS else name


def set_threads(args):
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def is_delta(args) -> bool:
    """Whether MODEL_OR_DELTA is a delta; refuses --random-control for a model (before any work)."""
    from ..delta import resolve_delta_folder

    delta = resolve_delta_folder(args.model, args.revision, token=args.token) is not None
    if args.random_control and not delta:
        raise ValueError("--random-control needs a delta (its size is what the control copies); "
                         f"{args.model} is a model.")
    return delta


def delta_or_model(args, delta: bool):
    """(editor, model, processor) of a delta on its base model (`--base` for a local one), or
    (None, model, processor) of a model."""
    from ..editor import UWMEditor
    from ..loading import load_model

    if not delta:
        return (None, *load_model(args.model, args.revision, token=args.token))
    model, processor = load_model(args.base, token=args.token) if args.base else (None, None)
    editor = UWMEditor.from_pretrained(args.model, model=model, processor=processor, revision=args.revision,
                                       token=args.token)
    return editor, editor.model, editor.processor


def check_json_path(path: str):
    from ..delta import check_writable

    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise FileNotFoundError(f"--json {path}: the folder {Path(path).parent} does not exist.")
    check_writable(folder)
