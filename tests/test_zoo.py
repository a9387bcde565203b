"""scripts/organism_zoo.py: reuses cached organisms, runs the demo once per organism, caches it, writes the table."""

import importlib.util
import json
from pathlib import Path

import pytest
from test_demo import small  # noqa: F401  (the demo at a reduced size)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def zoo():
    spec = importlib.util.spec_from_file_location("organism_zoo", ROOT / "scripts" / "organism_zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_zoo_reuses_organisms_caches_demos_and_writes_one_table(zoo, small, tmp_path, monkeypatch, capsys):  # noqa: F811
    from hf_uwm import demo
    from hf_uwm.organism import load_organism

    cache = tmp_path / "cache"
    stand_in = cache / "world3-seed1-unsafe0.25"  # the bundled model recorded as a world-3 organism of the cache
    model, processor = load_organism()
    model.save_pretrained(stand_in)
    processor.save_pretrained(stand_in)
    (stand_in / "training.json").write_text(json.dumps({"world": 3, "wall_s": 60, "examples": 100, "epochs": 2,
                                                        "unsafe_fraction": 0.25, "seed": 1, "threads": 1}))
    docs = tmp_path / "zoo.md"
    docs.write_text("# Zoo\n\nkept text\n")
    argv = ["--cache", str(cache), "--only", "organism", "world3-seed1-unsafe0.25", "--markdown", str(docs),
            "--plot", str(tmp_path / "zoo.png")]
    zoo.main(argv)
    text = docs.read_text()
    assert text.startswith("# Zoo\n\nkept text\n") and "whole script" in text
    table = [line for line in text.splitlines() if line.startswith("| organism (world 2)")
             or line.startswith("| world3-seed1")]
    assert len(table) == 2 * len(demo.EDITS)
    hard = [line for line in table if line.startswith("| world3")]
    assert all("–" not in line for line in hard) and all(line.count("–") == 5 for line in table if line not in hard)
    assert (tmp_path / "zoo.png").read_bytes()[:4] == b"\x89PNG"
    assert "world3-seed1-unsafe0.25: training 1.0 min (100 images x 2 epochs, 25% unsafe, seed 1" in capsys.readouterr().out

    def no_demo(*args, **kwargs):
        raise AssertionError("a cached organism's demo was recomputed")

    monkeypatch.setattr(demo, "run", no_demo)
    zoo.main(argv)  # every result from the cache: cheap to rerun for the table
    assert docs.read_text().count("kept text") == 1 and docs.read_text().count("zoo table: generated") == 1
    (cache / "demo-world3-seed1-unsafe0.25" / "organism.sha256").write_text("other weights")  # retrained since
    with pytest.raises(AssertionError, match="recomputed"):
        zoo.main(argv)  # organism (first) comes from the cache; the retrained one is measured again
    with pytest.raises(AssertionError, match="recomputed"):
        zoo.main(argv + ["--rerun", "organism"])
    with pytest.raises(SystemExit):
        zoo.main(argv + ["--rerun", "nobody"])
