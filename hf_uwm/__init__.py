"""hf_uwm: Unsafe Weights Manipulation and SafeGround for vision-language models."""

__version__ = "0.1.0"

from .config import UWMConfig  # noqa: E402

__all__ = ["UWMConfig", "UWMEditor", "__version__"]


def __getattr__(name):
    # The editor pulls in transformers; keep `import hf_uwm` light.
    if name == "UWMEditor":
        from .editor import UWMEditor

        return UWMEditor
    raise AttributeError(f"module 'hf_uwm' has no attribute {name!r}")
