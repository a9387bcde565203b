"""How every table, card and log writes a number with its bootstrap 95% interval: "12.3 [10.1, 14.6]"."""

from __future__ import annotations


def interval(bounds, digits: int = 1) -> str:
    """An interval alone: "[10.1, 14.6]"."""
    low, high = bounds
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def with_interval(value: float, bounds=None, digits: int = 1) -> str:
    """A value and, when there is one, its interval: "12.3 [10.1, 14.6]", or "12.3" without bounds."""
    return f"{value:.{digits}f}" + (f" {interval(bounds, digits)}" if bounds else "")
