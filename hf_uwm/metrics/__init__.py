"""Evaluation modules shipped with hf_uwm, loadable with `evaluate.load`."""

from pathlib import Path

from .install import install_safeground

__all__ = ["install_safeground", "safeground_path"]


def safeground_path() -> str:
    """The installed SafeGround module folder: `evaluate.load(safeground_path())` works offline."""
    return str(Path(__file__).parent / "safeground")
