"""One module per editing method, each a `Method` that declares itself and calls `register_method`.

A new method is one new module here (see docs/methods.md) and its import below; a method defined
outside the package registers itself the same way, by calling `register_method` when imported.
"""

from __future__ import annotations

from . import (attribution, caption_attribution, caption_iterative, g_safeclip, g_unsafe,  # noqa: F401  (register)
               iterative, random, uwm)
from .base import Method, SelectionSettings, get_method, method_names, register_method
from .calibration import Calibration

__all__ = ["Calibration", "Method", "SelectionSettings", "get_method", "method_names", "register_method"]
