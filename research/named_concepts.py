"""Concepts no calibration image shows, named in words: world-3 test splits, beside random controls.

For every model (a world-3 organism), four edits by iterative attribution:
- "not named": the default edit on the 512 calibration pairs (`hf-uwm edit MODEL --data organism-hard`);
- "named in words": the same with gun, fire and noose named (`--concepts`, one phrase per line), which
  adds text-only pairs in the calibration captions' own pattern;
- "own phrasing": the same with `research/own_phrasing.csv` instead (`--text-pairs`), 36 text-only pairs
  written by hand in a phrasing the world's captions never use ("a gun beside a red cat");
- the reference: the same concepts shown as 100 image pairs (test-split scenes of another seed) with the
  rule off for 16 rounds; each prefix of rounds is evaluated, and the one at the named edit's zero-shot
  cost is the comparison.
Then the test split (1,000 quadruples, 500 zero-shot images, bootstrap 95% intervals): GS, GS on seen
concepts, on the unseen ones named or not, each with and without the shared cues, look-alike R@1,
zero-shot, and a random control of each self-set edit.

    python research/named_concepts.py organism-hard zoo/world3-seed4-unsafe0.35 ... --out named_concepts

Writes OUT/named_concepts.json, OUT/named_concepts.md and OUT/named_concepts.png.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


from hf_uwm import UWMConfig, UWMEditor
from hf_uwm.concept_pairs import concept_pairs
from hf_uwm.data import concatenate_pairs, load_pairs
from hf_uwm.evaluation import ZeroShotTask, default_subsets, evaluate_model
from hf_uwm.formatting import with_interval
from hf_uwm.loading import load_model
from hf_uwm.organism import HELD_OUT, make_pairs, zero_shot_task

from common import parse_models  # research/common.py, beside this script

OWN_PHRASING = Path(__file__).with_name("own_phrasing.csv")
REFERENCE_PAIRS = 100
GROUPS = ("seen concepts", "unseen, named", "unseen, named with cues", "unseen, named without cues")


def edits(model, processor, calibration, rounds: int) -> dict:
    held = make_pairs(2000, seed=7, split="test", world=3)
    held = held.filter(lambda c: c in HELD_OUT, input_columns="concept").select(range(REFERENCE_PAIRS))
    default = UWMConfig(method="iterative_attribution")
    sets = {"not named": calibration,
            "named in words": concatenate_pairs(calibration, concept_pairs(calibration, list(HELD_OUT))),
            "own phrasing": concatenate_pairs(calibration, load_pairs(str(OWN_PHRASING)))}
    made = {name: UWMEditor(model, processor, default).calibrate(data, progress=False) for name, data in sets.items()}
    reference = UWMConfig(method="iterative_attribution", goal=None, knowledge_budget=None, holdout=0.0, rounds=rounds)
    made["images"] = UWMEditor(model, processor, reference).calibrate(concatenate_pairs(calibration, held),
                                                                     progress=False)
    return made


def check(name: str, rounds: int) -> dict:
    model, processor = load_model(name)
    test = make_pairs(1000, seed=0, split="test", world=3)
    zero_shot = ZeroShotTask(*zero_shot_task(500, seed=0, split="test", world=3))
    subsets = default_subsets(test, HELD_OUT, HELD_OUT)

    def evaluate(editor=None):
        if editor is None:
            report = evaluate_model(model, processor, test, zero_shot=zero_shot, progress=False, subsets=subsets)
        else:
            with editor.applied():
                report = evaluate_model(model, processor, test, zero_shot=zero_shot, progress=False, subsets=subsets)
        return {"GS": [report.safeground["GS"], *report.intervals["GS"]], "zero_shot": report.zero_shot,
                "lookalike_R@1": report.lookalikes["R@1 Is->Ts"],
                **{g: [report.subsets[g]["GS"], *report.subsets[g]["interval"]] for g in GROUPS},
                **({"weights": sum(editor.counts().values())} if editor is not None else {}),
                **({"stop": list(editor.stop)} if editor is not None and editor.trajectory else {})}

    start = time.perf_counter()
    made = edits(model, processor, make_pairs(512, seed=0, split="train", world=3), rounds)
    rows = {"base": evaluate()}
    for key in ("not named", "named in words", "own phrasing"):
        rows[key] = evaluate(made[key])
        rows[f"{key}: random control"] = evaluate(made[key].random_control())
    rows["images"] = [evaluate(made["images"].with_settings(rounds=r)) for r in range(1, rounds + 1)]
    return {"model": Path(name).name, "rows": rows, "wall_s": time.perf_counter() - start}


def same_cost(reference: list, zero_shot: float) -> int:
    """The index of the last prefix of the reference whose zero-shot accuracy is not below `zero_shot`."""
    kept = [i for i, row in enumerate(reference) if row["zero_shot"] >= zero_shot - 1e-9]
    return kept[-1] if kept else 0


def table(results: list[dict]) -> str:
    lines = []
    for result in results:
        rows = result["rows"]
        ref = same_cost(rows["images"], rows["named in words"]["zero_shot"])
        lines += [f"\n**{result['model']}**\n",
                  "| edit | rounds (why) | weights | GS | seen concepts | unseen, named | named, with cues | "
                  "named, without cues | zero-shot | look-alike R@1 |", "| --- " * 10 + "|"]
        named = [(k, rows[k]) for k in rows if k != "images"]
        named.insert(3, (f"images, {ref + 1} rounds (the named edit's zero-shot)", rows["images"][ref]))
        for key, row in named:
            stop = f"{row['stop'][0]} ({row['stop'][1]})" if "stop" in row else ""
            cells = [with_interval(row[g][0], row[g][1:]) for g in ("GS",) + GROUPS]
            lines.append(f"| {key} | {stop} | {row.get('weights', 0):,} | " + " | ".join(cells)
                         + f" | {row['zero_shot']:.1f} | {row['lookalike_R@1']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for ax, result in zip(axes[0], results):
        rows = result["rows"]
        ax.plot([r["weights"] for r in rows["images"]], [r["unseen, named"][0] for r in rows["images"]], "-o", ms=3,
                color="grey", label="shown as 100 image pairs (1-16 rounds)")
        for key, marker in (("not named", "s"), ("named in words", "*"), ("own phrasing", "^")):
            gs = rows[key]["unseen, named"]
            ax.errorbar(rows[key]["weights"], gs[0], yerr=[[gs[0] - gs[1]], [gs[2] - gs[0]]], fmt=marker, ms=9,
                        capsize=3, label=f"{key} (zero-shot {rows[key]['zero_shot'] - rows['base']['zero_shot']:+.1f})")
        ax.set(title=result["model"], xlabel="weights flipped", ylabel="GS on gun, fire, noose (test)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    args, out = parse_models(__doc__, "named_concepts", lambda parser: parser.add_argument(
        "--rounds", type=int, default=16, help="rounds of the image-calibrated reference"))
    results = [check(model, args.rounds) for model in args.models]
    (out / "named_concepts.json").write_text(json.dumps(results, indent=1))
    (out / "named_concepts.md").write_text(table(results))
    plot(results, out / "named_concepts.png")
    print(table(results))


if __name__ == "__main__":
    main()
