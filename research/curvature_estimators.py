"""The two curvature estimators of iterative attribution, side by side, as `hf-uwm edit` runs it.

    python research/curvature_estimators.py organism zoo_cache/world2-seed1-unsafe0.25 --out estimators

For every model: the method's defaults (512 calibration pairs of its world, stopping by itself)
with `curvature_estimator="per_item"` (one probe per caption, squared per caption: the default)
and with `"summed"` (eight probes summed over all captions, then squared: the estimator before),
each twice, with two draws of the probes only (same held-out slice, same everything else). The
overlap of two selections is |A ∩ B| / max(|A|, |B|): the draw-to-draw overlap of one estimator is
how much its own probe noise moves the edit, and the reference for the overlap across estimators.
The first draw of each is evaluated on the test split (1,000 quadruples, 500 zero-shot images,
bootstrap 95% intervals) beside a random control of the same size. Writes OUT/estimators.json and
OUT/estimators.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


from hf_uwm import UWMConfig, UWMEditor
from hf_uwm.sources import load_data, load_zero_shot
from hf_uwm.evaluation import evaluate_model
from hf_uwm.formatting import with_interval
from hf_uwm.loading import load_model
from hf_uwm.methods import iterative
from hf_uwm.sweep import evaluate_edit

from common import parse_models  # research/common.py, beside this script

ESTIMATORS = {"per_item": {"curvature_estimator": "per_item", "curvature_probes": 1},
              "summed": {"curvature_estimator": "summed", "curvature_probes": 8}}
PROBE_DRAWS = (0, 1)
draw_probes = iterative.probe_directions


def probes_of_draw(draw: int):
    """probe_directions with the probes' seed moved by `draw` (the held-out slice keeps config.seed)."""
    return lambda seed, *rest: draw_probes(seed + 1000 * draw, *rest)


def selected(editor) -> set[tuple[str, int]]:
    return {(name, int(i)) for name, idx in editor.delta.items() for i in idx}


def overlap(a: set, b: set) -> float:
    return 100 * len(a & b) / max(len(a), len(b), 1)


def check(model_name: str, threads: int) -> dict:
    from hf_uwm import organism

    data_name = "organism" if organism.world_of(model_name) == 2 else "organism-hard"
    model, processor = load_model(model_name)
    train = load_data(data_name, "train", None, 0)
    test = load_data(data_name, "test", None, 0, default=1000)
    zero_shot = load_zero_shot(data_name)

    def evaluate(m):
        return evaluate_model(m, processor, test, zero_shot=zero_shot, bootstrap=1000, seed=0, progress=False)

    runs, result = {}, {"model": Path(model_name).name, "threads": threads, "estimators": {}}
    for name, settings in ESTIMATORS.items():
        for draw in PROBE_DRAWS:
            iterative.probe_directions = probes_of_draw(draw)
            start = time.perf_counter()
            editor = UWMEditor(model, processor, UWMConfig(method="iterative_attribution", **settings))
            editor.calibrate(train, progress=False)
            seconds = time.perf_counter() - start
            iterative.probe_directions = draw_probes
            runs[name, draw] = editor
            entry = result["estimators"].setdefault(name, {"draws": []})
            entry["draws"].append({"draw": draw, "calibrate_s": seconds, "rounds": editor.stop[0],
                                   "reason": editor.stop[1], "weights": len(selected(editor))})
        a, b = (selected(runs[name, d]) for d in PROBE_DRAWS)
        entry["draw_overlap"] = overlap(a, b)
        first = runs[name, PROBE_DRAWS[0]]
        entry["test"] = {"edit": evaluate_edit(first, evaluate).to_dict(),
                         "random control": evaluate_edit(first.random_control(), evaluate).to_dict()}
    result["cross_overlap"] = overlap(selected(runs["per_item", 0]), selected(runs["summed", 0]))
    result["base"] = evaluate(model).to_dict()
    return result


def table(rows: list[dict]) -> str:
    lines = ["| model | estimator | rounds (draws 0, 1) | weights | calibrate s | overlap of the two draws % | "
             "GS [95% CI] | control GS | zero-shot drop |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        base = r["base"]["zero_shot"]
        for name, e in r["estimators"].items():
            edit, control = e["test"]["edit"], e["test"]["random control"]
            draws = e["draws"]

            def each(key, form):
                return ", ".join(format(d[key], form) for d in draws)

            lines.append(
                f"| {r['model']} | {name} | {each('rounds', 'd')} | {each('weights', ',')} | "
                f"{each('calibrate_s', '.1f')} | "
                f"{e['draw_overlap']:.1f} | {with_interval(edit['safeground']['GS'], edit['intervals']['GS'])} | "
                f"{control['safeground']['GS']:.1f} | {edit['zero_shot'] - base:+.1f} |")
    lines.append("")
    lines += [f"- {r['model']}: overlap of per_item and summed (draw 0): {r['cross_overlap']:.1f}%" for r in rows]
    return "\n".join(lines) + "\n"


def main():
    args, out = parse_models(__doc__, "estimators")
    rows = []
    for model in args.models:
        rows.append(check(model, args.threads))
        (out / "estimators.json").write_text(json.dumps(rows, indent=1))
        (out / "estimators.md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
