"""The self-setting default on models nobody tuned it on: one command per model, as a user runs it.

For every model: `hf-uwm edit MODEL --data DATA --output OUT/NAME`
(no other setting), then the test split (1,000 quadruples, 500 zero-shot images, bootstrap 95%
intervals) for the base model, the edit, and a random control flipping as many weights per layer.

    python research/self_set_check.py organism zoo_cache/world2-seed1-unsafe0.25 ... --out self_set

Prints one table and writes OUT/self_set.json and OUT/self_set.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


from hf_uwm import UWMEditor
from hf_uwm.cli import main as cli
from hf_uwm.sources import load_data, load_zero_shot
from hf_uwm.evaluation import default_subsets, evaluate_model
from hf_uwm.formatting import with_interval
from hf_uwm.organism import HELD_OUT
from hf_uwm.sweep import evaluate_edit

from common import parse_models  # research/common.py, beside this script


def data_name(model: str) -> str:
    """The organism world the model was trained on, as a DATA argument."""
    from hf_uwm import organism

    return "organism" if organism.world_of(model) == 2 else "organism-hard"


def check(model: str, out: Path, threads: int, batch_size: int | None = None) -> dict:
    name = Path(model).name + (f"-bs{batch_size}" if batch_size else "") + (f"-t{threads}" if threads != 1 else "")
    data = data_name(model)
    start = time.perf_counter()
    batch = ["--batch-size", str(batch_size)] if batch_size else []
    if cli(["edit", model, "--data", data, "--output", str(out / name), "--quiet", "--threads", str(threads),
            "--overwrite", *batch]) != 0:
        raise SystemExit(f"hf-uwm edit {model} failed")
    edit_s = time.perf_counter() - start
    from hf_uwm.loading import load_model

    base_model, processor = load_model(model)
    editor = UWMEditor.from_pretrained(out / name, model=base_model, processor=processor)
    test = load_data(data, "test", None, 0, default=1000)
    zero_shot = load_zero_shot(data)

    subsets = default_subsets(test, HELD_OUT if data == "organism-hard" else ())

    def evaluate(m):
        return evaluate_model(m, processor, test, zero_shot=zero_shot, bootstrap=1000, seed=0, progress=False,
                              subsets=subsets)

    reports = {"base": evaluate(base_model), "edit": evaluate_edit(editor, evaluate),
               "random control": evaluate_edit(editor.random_control(), evaluate)}
    record = json.loads((out / name / "uwm_config.json").read_text())
    return {"model": name, "data": data, "edit_wall_s": edit_s, "stop": record["stop"],
            "weights": sum(record["counts"].values()), "test": {k: r.to_dict() for k, r in reports.items()}}


def table(rows: list[dict]) -> str:
    lines = ["| model | stopped after (of 40) | why | weights | GS [95% CI] | control GS [95% CI] | zero-shot base → edit "
             "(drop) | control zero-shot | unseen concepts GS [95% CI] |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        base, edit, control = (r["test"][k] for k in ("base", "edit", "random control"))

        def unseen(rep):
            s = rep["subsets"].get("unseen concepts")
            return with_interval(s["GS"], s["interval"]) if s else "-"

        def gs(rep):
            return with_interval(rep["safeground"]["GS"], rep["intervals"]["GS"])

        lines.append(f"| {r['model']} | {r['stop']['rounds']} | {r['stop']['reason']} | {r['weights']:,} | {gs(edit)} | "
                     f"{gs(control)} | {base['zero_shot']:.1f} → {edit['zero_shot']:.1f} "
                     f"({edit['zero_shot'] - base['zero_shot']:+.1f}) | {control['zero_shot']:.1f} | {unseen(edit)} |")
    return "\n".join(lines) + "\n"


def run():
    args, out = parse_models(__doc__, "self_set", lambda parser: parser.add_argument(
        "--batch-size", type=int, default=None, help="the edit's --batch-size (default: the CLI's)"))
    start = time.perf_counter()
    rows = [check(model, out, args.threads, args.batch_size) for model in args.models]
    (out / "self_set.json").write_text(json.dumps(rows, indent=1))
    (out / "self_set.md").write_text(table(rows))
    print(table(rows))
    print(f"whole script: {(time.perf_counter() - start) / 60:.1f} min wall, {args.threads} torch thread(s)")


if __name__ == "__main__":
    run()
