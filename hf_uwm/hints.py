"""How an error message says to fix something: in Python terms, or in `hf-uwm` flags on the command line.

Modules word their fixes with `hint(python, flag)`; the CLI runs every command inside
`command_line_hints()`, so one message serves both kinds of user.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager

_COMMAND_LINE = contextvars.ContextVar("hf_uwm_command_line", default=None)  # the flag that names a split


@contextmanager
def command_line_hints(split_flag: str = "--split"):
    """Inside this block, error hints name `hf-uwm` flags instead of Python arguments (`split_flag` for the
    split of the data being read)."""
    token = _COMMAND_LINE.set(split_flag)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


def hint(python: str, flag: str) -> str:
    """`python` in Python, `flag` inside `command_line_hints()`: how to fix something, in the user's terms."""
    return flag if _COMMAND_LINE.get() else python


def split_flag() -> str:
    return _COMMAND_LINE.get() or "--split"

