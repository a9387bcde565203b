"""One module per editing method, each behind the `Method` interface that `UWMEditor` calls.

A new method is one new module with a `Method` subclass, registered here under its `score` name
(and that name added to `hf_uwm.config.SCORES`).
"""

from __future__ import annotations

from .attribution import Attribution
from .base import Calibration, Method
from .caption_attribution import CaptionAttribution
from .caption_iterative import CaptionIterative
from .g_safeclip import GSafeCLIP
from .g_unsafe import GUnsafe
from .iterative import IterativeAttribution
from .random import RandomScores
from .uwm import UWMStatistics

METHODS: dict[str, Method] = {
    "ratio": UWMStatistics(),
    "unsafe": UWMStatistics(),
    "difference": UWMStatistics(),
    "attribution": Attribution(),
    "iterative_attribution": IterativeAttribution(),
    "random": RandomScores(),
    "g_unsafe": GUnsafe(),
    "g_safeclip": GSafeCLIP(),
    "caption_attribution": CaptionAttribution(),
    "caption_iterative": CaptionIterative(),
}


def method_for(score: str) -> Method:
    return METHODS[score]


__all__ = ["METHODS", "Calibration", "Method", "method_for"]
