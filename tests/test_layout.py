"""The designed layout: card templates at the top of the checkout, shipped in the wheel, found from both."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from hf_uwm.paths import HUB_CARDS, hub_card_path

ROOT = Path(__file__).resolve().parents[1]
METRIC_CARD = "hf_uwm/metrics/safeground/README.md"  # the evaluate module's own card: it travels with the module


def test_card_templates_are_found_in_the_checkout():
    for name in HUB_CARDS:
        assert hub_card_path(name) == ROOT / "hub_cards" / name
    with pytest.raises(ValueError, match="choose one of model_card.md, dataset_card.md"):
        hub_card_path("README.md")


def test_the_dataset_card_says_what_a_pair_set_holds_and_how_to_load_it():
    from hf_uwm.data import dataset_card
    from hf_uwm.organism import make_pairs

    card = dataset_card(make_pairs(4), "me/organism-pairs", description="Pairs of the organism world.",
                        source="Rendered by hf_uwm.organism.", split="train")
    assert card.data.tags == ["hf_uwm", "safety", "safeground", "image"] and card.data.license == "other"
    text = str(card)
    assert "quadruples (Ts, Tu, Is, Iu)" in text and "4 rows (split `train`)" in text
    assert "| `unsafe_image` | the same image made unsafe |" in text and "4 concepts:" in text
    assert 'load_pairs("me/organism-pairs", split="train")' in text and "{{" not in text
    texts = make_pairs(2).remove_columns(["safe_image", "unsafe_image", "concept"])
    assert "**text pairs**" in str(dataset_card(texts, "me/t", description="", source=""))
    with pytest.raises(ValueError, match="none of the pair columns"):
        dataset_card(texts.remove_columns(["safe_text", "unsafe_text"]), "me/x", description="", source="")


def test_the_wheel_ships_the_cards_and_an_install_finds_them(tmp_path):
    source = tmp_path / "source"   # a copy, so that the build leaves nothing in the checkout
    for name in ("hub_cards", "hf_uwm"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("hf_uwm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    cards = [n for n in names if n.endswith(tuple(f"share/hf_uwm/hub_cards/{c}" for c in HUB_CARDS))]
    assert len(cards) == len(HUB_CARDS) and METRIC_CARD in names, cards
    prefix = tmp_path / "prefix"
    # --ignore-installed: install beside, never uninstall, the hf_uwm this interpreter already has
    subprocess.run([sys.executable, "-m", "pip", "install", str(wheel), "--no-deps", "--no-index", "--ignore-installed",
                    "-q", "--prefix", str(prefix)], check=True, cwd=tmp_path)
    site = next(prefix.glob("lib/python*/site-packages"))
    found = subprocess.run([sys.executable, "-c", "import hf_uwm.paths as p; print(p.__file__); "
                            "print(*(p.hub_card_path(c) for c in p.HUB_CARDS), sep='\\n')"],
                           cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True,
                           text=True, check=True).stdout.split()
    assert Path(found[0]).is_relative_to(site)   # the installed package, not the checkout
    assert [Path(f) for f in found[1:]] == [prefix / "share" / "hf_uwm" / "hub_cards" / c for c in HUB_CARDS]
