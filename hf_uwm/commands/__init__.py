"""One module per `hf-uwm` command, as accelerate keeps them: each `register`s its subparser, whose `run`
does the work. `hf_uwm.cli` assembles them in this order."""

from __future__ import annotations

from . import demo, demo_llava, edit, eval, eval_captions, export, install_metric, push_metric, sweep

COMMANDS = (demo, edit, eval, sweep, export, push_metric, install_metric, eval_captions, demo_llava)


def register_all(commands):
    for command in COMMANDS:
        command.register(commands)
