"""A method defined in one file outside hf_uwm (tests/magnitude_method.py) is a method like any other:
the config, `hf-uwm edit --help`, the CLI itself, model cards and sweeps all find it."""

import pytest
import torch

import magnitude_method  # noqa: F401  (registers "magnitude")
from conftest import make_clip, make_pairs
from hf_uwm import UWMConfig, UWMEditor
from hf_uwm.cli import main
from hf_uwm.evaluation import evaluate_model
from hf_uwm.methods import method_names
from hf_uwm.sweep import sweep


def test_the_config_knows_the_method_and_its_own_setting():
    assert "magnitude" in method_names()
    config = UWMConfig(method="magnitude", power=2.0, tau=0.1)
    assert config.power == 2.0 and UWMConfig.from_json_string(config.to_json_string()) == config
    with pytest.raises(ValueError, match="power must be a number > 0"):
        UWMConfig(method="magnitude", power=0)
    with pytest.raises(ValueError, match="power"):
        UWMConfig(method="ratio", power=2.0)   # a setting of another method


def test_edit_help_lists_it_and_edit_runs_it(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    assert "magnitude: toy method: the largest weights by |W|^power" in capsys.readouterr().out
    model, processor = make_clip()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    make_pairs(4).save_to_disk(str(tmp_path / "pairs"))
    assert main(["edit", str(tmp_path / "model"), "--data", str(tmp_path / "pairs"), "--method", "magnitude",
                 "--tau", "0.05", "--output", str(tmp_path / "delta"), "--quiet"]) == 0
    assert "magnitude, τ=0.05" in capsys.readouterr().out


def test_its_card_describes_it_and_the_delta_reloads(tmp_path):
    model, processor = make_clip()
    editor = UWMEditor(model, processor, UWMConfig(method="magnitude", power=2.0, selection="fixed", density=0.01))
    editor.calibrate()
    largest = editor.target_layers[next(iter(editor.delta))].weight.detach().abs().flatten()
    picked = editor.delta[next(iter(editor.delta))]
    assert largest[picked].min() >= largest.topk(len(picked)).values.min()   # the largest |W| indeed
    folder = editor.save_pretrained(tmp_path / "delta")
    card = (folder / "README.md").read_text()
    assert "Magnitude pruning edit of" in card and "scored by |W| to the power `power`" in card
    assert "| `power` | `2.0` |" in card
    loaded = UWMEditor.from_pretrained(folder, model=model, processor=processor)
    assert loaded.config == editor.config and all(torch.equal(loaded.delta[n], editor.delta[n]) for n in editor.delta)


def test_a_sweep_reselects_its_grid_without_calibrating_again():
    model, processor = make_clip()
    editor = UWMEditor(model, processor, UWMConfig(method="magnitude")).calibrate()
    validation = make_pairs(6, seed=3)

    def evaluate(m):
        return evaluate_model(m, processor, validation, bootstrap=0, progress=False)

    rows = sweep(editor, [{"tau": 0.01}, {"tau": 0.05}], evaluate, method="magnitude", progress=False)
    assert [r.method for r in rows] == ["magnitude", "magnitude"] and rows[0].weights < rows[1].weights
