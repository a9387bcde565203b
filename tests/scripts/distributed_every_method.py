"""Run under two processes: calibrate every registered method (tests/test_methods_common.py's runs) on an
uneven shard split; save each method's scores, delta and stopping record per rank."""

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import save_calibration  # noqa: E402
from test_methods_common import calibrated  # noqa: E402  (also registers the toy method)



def main(out: str, methods: str):
    from accelerate import PartialState

    state = PartialState(cpu=True)
    for method in methods.split(","):
        editor = calibrated(method)
        save_calibration(editor, f"{out}.{method}.rank{state.process_index}.safetensors", state)

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
