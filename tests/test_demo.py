"""`hf-uwm demo` end to end on the bundled organism, at a reduced size."""

import json

import pytest

from hf_uwm import demo
from hf_uwm.cli import main


@pytest.fixture
def small(monkeypatch):
    for name, value in dict(N_CALIBRATION=24, N_VALIDATION=28, N_TEST=40, N_ZERO_SHOT=28).items():
        monkeypatch.setattr(demo, name, value)
    monkeypatch.setattr(demo, "TAUS", (0.02,))
    monkeypatch.setattr(demo, "DENSITIES", (0.02,))
    monkeypatch.setattr(demo, "METHODS", {n: (c, g[:1], f) for n, (c, g, f) in demo.METHODS.items()})


def test_demo_writes_deltas_tables_and_plots(small, tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path / "out"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "Validation sweep" in out and "Test split" in out and "random (UWM)" in out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["test"]) == {"base", "UWM", "random (UWM)", "UWM rms", "random (UWM rms)",
                                    "attribution", "random (attribution)"}
    for name in ("test_results.png", "validation_pareto.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"
    from hf_uwm import UWMEditor

    for folder in ("uwm", "uwm-rms", "attribution"):
        assert "## Evaluation" in (tmp_path / "out" / folder / "README.md").read_text()
        UWMEditor.from_pretrained(tmp_path / "out" / folder).apply()
