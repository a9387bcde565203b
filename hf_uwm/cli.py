"""`hf-uwm`: the command line. `hf-uwm demo` runs the whole job on the bundled model organism.

Each command is a module of `hf_uwm.commands`; this one assembles the parser and reports errors: a
user's (bad input, the machine's state) in one line, a bug with its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager

EPILOG = """examples:
  hf-uwm demo                                   # the whole job on the bundled model organism
  hf-uwm demo --model organism-hard             # the same on world 3 (unseen concepts, paraphrases, look-alikes)
  hf-uwm edit organism --data organism --output my-delta
  hf-uwm eval my-delta --data organism --split test
  hf-uwm edit openai/clip-vit-base-patch32 --data me/my-pairs --samples 2048 --output clip-uwm
  hf-uwm sweep organism --data organism --eval organism --tau 0.01 0.02 0.05 --alpha -1 0

DATA is a Hub dataset id, a local dataset folder or data file with the columns safe_text,
unsafe_text, safe_image, unsafe_image (rename others with --columns), or 'organism' for the
procedural world the bundled model was trained on ('organism-hard': world 3). MODEL is a Hub id, a
local folder, or 'organism' / 'organism-hard' (the bundled models). A name that looks like a path
(./x, ~/x, /x, a/b/c, x.csv) is never looked up on the Hub. A single data file is its own split:
--split does not apply to it.
"""


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .errors import USER_ERRORS
    from .hints import command_line_hints

    try:
        with command_line_hints(), _progress_bars(not getattr(args, "quiet", False)), _one_line_warnings(args.command):
            return args.run(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `hf-uwm ... | head` closed the pipe: not an error of the command
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail again
        return 141
    except USER_ERRORS as err:
        print(f"hf-uwm {args.command}: error: {err}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    from .commands import register_all

    parser = argparse.ArgumentParser(prog="hf-uwm", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Unsafe Weights Manipulation (UWM) for CLIP, SigLIP and LLaVA: "
                                                 "make a model prefer safe content without training.",
                                     epilog=EPILOG)
    register_all(parser.add_subparsers(dest="command", metavar="COMMAND"))
    return parser


@contextmanager
def _one_line_warnings(command: str):
    """Warnings read like the errors, without the source line of hf_uwm that raised them."""
    import warnings

    original = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *rest, **kwargs: f"hf-uwm {command}: warning: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = original


@contextmanager
def _progress_bars(enabled: bool):
    """--quiet silences every bar: ours (tqdm, off by argument) and those of `datasets` and `huggingface_hub`."""
    if enabled:
        yield
        return
    import datasets
    import huggingface_hub.utils as hub_utils

    datasets_were_on, hub_was_on = datasets.is_progress_bar_enabled(), not hub_utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        if datasets_were_on:
            datasets.enable_progress_bars()
        if hub_was_on:
            hub_utils.enable_progress_bars()


if __name__ == "__main__":
    sys.exit(main())
