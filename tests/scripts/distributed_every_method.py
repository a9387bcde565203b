"""Run under two processes: calibrate every registered method (tests/test_methods_common.py's runs) on an
uneven shard split; save each method's scores, delta and stopping record per rank."""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_methods_common import calibrated  # noqa: E402  (also registers the toy method)

from hf_uwm.methods.stopping import to_records  # noqa: E402


def main(out: str, methods: str):
    from accelerate import PartialState

    state = PartialState(cpu=True)
    for method in methods.split(","):
        editor = calibrated(method)
        tensors = {f"score/{k}": v for k, v in editor.scores.items()}
        tensors.update({f"delta/{k}": v for k, v in editor.delta.items()})
        stop = {"stop": json.dumps(editor.stop), "trajectory": json.dumps(to_records(editor.trajectory))}
        save_file(tensors, f"{out}.{method}.rank{state.process_index}.safetensors",
                  metadata={"processes": str(state.num_processes), **stop})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
