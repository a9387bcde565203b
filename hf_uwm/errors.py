"""The project's own errors: what a user can cause and fix, so that `hf-uwm` reports them in one line.

Each subclasses the built-in error that callers caught before it existed.
"""

from __future__ import annotations


class UnsupportedModelError(TypeError):
    """A model of a kind hf_uwm cannot edit, evaluate or caption with."""


class MissingResourceError(RuntimeError):
    """An optional resource is not installed (a WordNet for METEOR)."""


class PushError(RuntimeError):
    """A push to the Hub failed; no commit was made."""


#: what `hf-uwm` prints as one line: bad input (values, names, paths), the machine's state (files,
#: permissions, the Hub, missing optional packages) and the errors above; anything else is a bug and keeps its
#: traceback
USER_ERRORS = (ValueError, OSError, ImportError, UnsupportedModelError, MissingResourceError, PushError)
