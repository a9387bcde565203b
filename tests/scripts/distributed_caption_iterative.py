"""Run under two processes: caption_iterative on an uneven shard split; save scores and delta per rank."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_pairs  # noqa: E402
from test_captioning import tiny_llava  # noqa: E402

from hf_uwm import UWMConfig, UWMEditor  # noqa: E402
from hf_uwm.organism_captioner import build_processor  # noqa: E402


def main(out: str, config_json: str):
    from accelerate import PartialState

    state = PartialState(cpu=True)
    processor = build_processor()
    editor = UWMEditor(tiny_llava(processor, seed=6).to(torch.float64), processor,
                       UWMConfig.from_json_string(config_json))
    editor.calibrate(make_pairs(5, seed=6), progress=False)
    tensors = {f"score/{k}": v for k, v in editor.scores.items()}
    tensors.update({f"delta/{k}": v for k, v in editor.delta.items()})
    save_file(tensors, f"{out}.rank{state.process_index}.safetensors",
              metadata={"processes": str(state.num_processes)})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
