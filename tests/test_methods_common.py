"""One set of tests over every registered method, the toy `magnitude` included (as peft's testing_common
runs one set over every tuner): the documented defaults, settings through JSON and the command line, the
card, and two processes against one at a pair count that does not split evenly, held-out slice on."""

import ast
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import magnitude_method  # noqa: F401  (registers "magnitude")
from conftest import make_clip, make_pairs
from hf_uwm import UWMConfig, UWMEditor
from hf_uwm.cli import build_parser
from hf_uwm.commands.method_flags import config_from_args, flag
from hf_uwm.hub import render_card
from hf_uwm.methods import get_method, method_names
from hf_uwm.settings import setting_info, setting_names

ROOT = Path(__file__).resolve().parents[1]
METHODS = method_names()
PAIRS = 21   # two shards of 11 and 10; 4 pairs held out of the gradients by iterative methods


def run_config(method: str) -> UWMConfig:
    """The method's defaults, but small batches and for an iterative method few rounds without the knowledge
    budget (a random model's first round costs more than any): the held-out slice is measured every round."""
    few_rounds = {"rounds": 2, "knowledge_budget": None} if "rounds" in setting_names(
        get_method(method).settings_class) else {}
    return UWMConfig(method=method, batch_size=2, **few_rounds)


def calibrated(method: str) -> UWMEditor:
    """`method` calibrated on 21 pairs in float64, on a tiny CLIP or, for a LLaVA-only method, a tiny LLaVA."""
    if "clip" in get_method(method).families:
        model, processor = make_clip(dtype=torch.float64)
    else:
        from test_captioning import tiny_llava

        from hf_uwm.organism_captioner import build_processor

        processor = build_processor()
        model = tiny_llava(processor, seed=6).to(torch.float64)
    return UWMEditor(model, processor, run_config(method)).calibrate(make_pairs(PAIRS, seed=5), progress=False)


# --- defaults as documented ----------------------------------------------------------------------------
def documented_defaults() -> dict[str, dict]:
    """docs/methods.md's tables of every setting: method -> {setting: default}."""
    text = (ROOT / "docs" / "methods.md").read_text()
    section = text.split("\n## Every setting of every method\n")[1].split("\n## ")[0]
    documented = {}
    for block in section.split("\n### Settings of ")[1:]:
        heading, _, body = block.partition("\n")
        rows = [re.split(r"(?<!\\)\|", line)[1:-1] for line in body.splitlines() if line.startswith("| `")]
        table = {name.strip().strip("`"): ast.literal_eval(default.strip().strip("`")) for name, default, *_ in rows}
        documented.update({method: table for method in re.findall(r"`(\w+)`", heading)})
    return documented


@pytest.mark.parametrize("method", METHODS)
def test_a_bare_config_has_the_documented_defaults(method):
    if not get_method(method).__module__.startswith("hf_uwm."):
        pytest.skip("a method outside the package documents itself (tests/magnitude_method.py)")
    assert documented_defaults()[method] == dataclasses.asdict(UWMConfig(method=method).settings)


# --- settings through JSON and the command line --------------------------------------------------------
def _candidates(default, info) -> list:
    """Values other than the default to try, most telling first."""
    if info.choices:
        return [c for c in info.choices if c != default]
    if info.none is not None and default is not None:
        return [None, default / 2]
    if default is None:
        return [0.05]
    if isinstance(default, bool):
        return [not default]
    return [default + 1] if isinstance(default, int) else [default / 2] if isinstance(default, float) else []


def changed_settings(method: str) -> dict:
    """A valid value other than the default for every setting that has one, found setting by setting."""
    settings_class = get_method(method).settings_class
    changed = {}
    for field in dataclasses.fields(settings_class):
        default = getattr(settings_class(), field.name)
        for value in _candidates(default, setting_info(settings_class, field.name)):
            try:
                UWMConfig(method=method, **changed, **{field.name: value})
            except ValueError:
                continue
            changed[field.name] = value
            break
    return changed


def _cli_value(value) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


@pytest.mark.parametrize("method", METHODS)
def test_settings_round_trip_through_json_and_the_command_line(method):
    changed = changed_settings(method)
    assert len(changed) >= len(setting_names(get_method(method).settings_class)) - 1   # all but a one-choice one
    config = UWMConfig(method=method, **changed)
    assert UWMConfig.from_json_string(config.to_json_string()) == config
    flags = [item for name, value in changed.items() for item in (flag(name), _cli_value(value))]
    args = build_parser().parse_args(["edit", "MODEL", "--data", "DATA", "--output", "OUT", "--method", method, *flags])
    assert config_from_args(args) == config


# --- the card -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single_process():
    return {}


def _single(cache: dict, method: str) -> UWMEditor:
    if method not in cache:
        cache[method] = calibrated(method)
    return cache[method]


@pytest.mark.parametrize("method", METHODS)
def test_the_card_names_every_setting(method, single_process):
    card = render_card(_single(single_process, method).record())
    config = json.loads(_single(single_process, method).config.to_json_string())
    for name in setting_names(get_method(method).settings_class):
        assert f"| `{name}` | `{config[name]}` |" in card, name


# --- two processes ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:   # a fixed port collides when two test runs share the machine
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Every method calibrated by two processes in one launch (one start-up for all)."""
    out = tmp_path_factory.mktemp("two") / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(ROOT / "tests" / "scripts" / "distributed_every_method.py"), str(out), ",".join(METHODS)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_match_one_process(method, two_processes, single_process):
    single = _single(single_process, method)
    if "holdout" in single.config.field_names():
        assert single.config.holdout > 0 and single.trajectory   # the held-out slice measured every round
    for rank in (0, 1):
        with safe_open(f"{two_processes}.{method}.rank{rank}.safetensors", framework="pt") as f:
            meta = f.metadata()
            assert meta["processes"] == "2"
            assert json.loads(meta["stop"]) == (list(single.stop) if single.stop else None)
            assert json.loads(meta["trajectory"]) == [s.to_dict() for s in single.trajectory or []]
            for name, scores in single.scores.items():
                torch.testing.assert_close(f.get_tensor(f"score/{name}"), scores, rtol=1e-10, atol=1e-300)
                assert torch.equal(f.get_tensor(f"delta/{name}"), single.delta[name])
