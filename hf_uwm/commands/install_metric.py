"""`hf-uwm install-metric`: make evaluate.load("safeground") load the installed metric."""

from __future__ import annotations


def register(commands):
    install = commands.add_parser(
        "install-metric", help='make evaluate.load("safeground") load the installed SafeGround metric, offline too',
        description="Copy the SafeGround metric into evaluate's module cache (HF_MODULES_CACHE, default "
                    "~/.cache/huggingface/modules) as a download of evaluate-metric/safeground, the newest version "
                    "there. evaluate.load('safeground') loads it when the Hub has no official evaluate-metric/"
                    "safeground (which would take precedence) or cannot be reached. Run it again after upgrading "
                    "hf_uwm.")
    install.set_defaults(run=run, quiet=True)


def run(args):
    from ..metrics import install_safeground

    print(f"installed the SafeGround metric in {install_safeground()}\nevaluate.load('safeground') now loads it "
          "(an official evaluate-metric/safeground on the Hub would take precedence)")
