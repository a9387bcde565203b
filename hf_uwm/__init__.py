"""hf_uwm: Unsafe Weights Manipulation and SafeGround for vision-language models."""

__version__ = "0.1.0"

from .config import UWMConfig  # noqa: E402

__all__ = ["UWMConfig", "UWMEditor", "load_data", "load_model", "load_zero_shot", "__version__"]

# Attributes imported on first use: the editor and the loaders pull in torch and transformers, and
# `import hf_uwm` stays light.
_LAZY = {"UWMEditor": "editor", "load_model": "loading", "load_data": "sources", "load_zero_shot": "sources"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'hf_uwm' has no attribute {name!r}")
