"""Gradio Space for the SafeGround metric: paste the four similarities of each quadruple."""

from pathlib import Path

import evaluate
from evaluate.utils import launch_gradio_widget

module = evaluate.load(str(Path(__file__).parent / "safeground.py"))
launch_gradio_widget(module)
