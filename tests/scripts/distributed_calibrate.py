"""Run under two processes: calibrate on an uneven shard split and save scores and delta from rank 0."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_clip, make_pairs, save_calibration  # noqa: E402

from hf_uwm import UWMConfig, UWMEditor  # noqa: E402


def main(out: str, config_json: str):
    from accelerate import PartialState

    state = PartialState(cpu=True)
    model, processor = make_clip(dtype=torch.float64)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    editor = UWMEditor(model, processor, UWMConfig.from_json_string(config_json))
    editor.calibrate(make_pairs(21, seed=5), progress=False)   # uneven shards, 5 held out
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items()), "model left edited"
    save_calibration(editor, f"{out}.rank{state.process_index}.safetensors", state)

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
