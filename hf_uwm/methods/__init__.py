"""One module per editing method, each a `Method` that declares itself and calls `register_method`.

A new method is one new module here (see docs/methods.md) and its import below; a method defined
outside the package registers itself the same way, by calling `register_method` when imported, or
through the entry-point group `hf_uwm.methods` of an installed package (loaded on first use).
"""

from __future__ import annotations

from . import (attribution, caption_attribution, caption_iterative, g_safeclip, g_unsafe,  # noqa: F401  (register)
               iterative, random, uwm)
from .base import (DEFAULT_METHOD, ENTRY_POINT_GROUP, RECOMMENDED_METHOD, Method, SelectionSettings, get_method,
                   method_names, register_method)
from .calibration import Calibration

__all__ = ["DEFAULT_METHOD", "ENTRY_POINT_GROUP", "RECOMMENDED_METHOD", "Calibration", "Method", "SelectionSettings",
           "get_method", "method_names", "register_method"]
