"""Choose the stopping rule's defaults (goal, knowledge measure, budget) on validation splits only.

For every organism given, iterative attribution runs its maximum number of rounds with the rule
switched off (goal=None, knowledge_budget=None) but the held-out slice measured after every round.
Each prefix of rounds is then evaluated on the organism's validation split (quadruples and zero-shot
images). Offline, every candidate rule (knowledge measure × budget × goal) is replayed on the
recorded trajectories (a rule that would run past them on some organism is not eligible), and the
rule kept is the one with the highest worst-case validation GS whose validation zero-shot drop stays
within `--max-drop` on every organism. Test splits are never read.

    python research/stopping_defaults.py --models organism zoo_cache/world2-seed1-unsafe0.25 ... \
        --out docs/stopping_defaults.json

Writes the raw trajectories and per-round validation numbers (JSON), the table of candidate rules,
and a plot of validation zero-shot drop against each knowledge measure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from hf_uwm import UWMConfig, UWMEditor
from hf_uwm.evaluation import ZeroShotTask, evaluate_model
from hf_uwm.methods.stopping import MAX_ROUNDS, Step, from_records, stopping_round, to_records

# Knowledge measures of the slice, as points lost against round 0 (higher = more lost).
MEASURES = {
    "drift": lambda s, base: s.measures["drift"],
    "agreement": lambda s, base: base.measures["agreement"] - s.measures["agreement"],
    "agreement_text": lambda s, base: base.measures["agreement_text"] - s.measures["agreement_text"],
    "vocabulary_mass": lambda s, base: s.measures["vocabulary_mass_lost"],
    "vocabulary_accuracy": lambda s, base: s.measures["vocabulary_accuracy_lost"],
    "vocabulary_shift": lambda s, base: s.measures["vocabulary_shift"],
}
GOALS = (None, 90.0, 95.0, 98.0, 100.0)
BUDGETS = {"drift": (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0), "agreement": (1, 2, 3, 5, 8, 12),
           "agreement_text": (1, 2, 3, 5, 8, 12), "vocabulary_mass": (1, 2, 3, 4, 5, 6, 7, 8, 10),
           "vocabulary_accuracy": (1, 2, 3, 4, 5, 6, 7, 8, 10), "vocabulary_shift": (4, 6, 8, 10, 12, 14, 16, 20)}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="organism folders (or 'organism')")
    parser.add_argument("--calibration", type=int, default=512, help="calibration pairs (the CLI's default)")
    parser.add_argument("--validation", type=int, default=1000, help="validation quadruples")
    parser.add_argument("--zero-shot", type=int, default=2000, help="validation zero-shot images")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--curvature-weight", type=float, nargs="+", default=[4.0],
                        help="λ values to compare (each runs its own trajectories; the rule is chosen per λ)")
    parser.add_argument("--round-density", type=float, nargs="+", default=[0.001],
                        help="δ values to compare, crossed with λ")
    parser.add_argument("--max-drop", type=float, default=2.0, help="validation zero-shot points allowed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="stopping_defaults.json")
    return parser.parse_args()


def world_data(model_name: str, args):
    from hf_uwm import organism

    world = organism.world_of(model_name)
    calibration = organism.make_pairs(args.calibration, split="train", world=world)
    validation = organism.make_pairs(args.validation, split="validation", world=world)
    zero_shot = organism.zero_shot_task(args.zero_shot, split="validation", world=world)
    return calibration, validation, ZeroShotTask(*zero_shot)


def trajectory_of(model_name: str, args, weight: float, density: float) -> dict:
    from hf_uwm.loading import load_model

    model, processor = load_model(model_name)
    calibration, validation, zero_shot = world_data(model_name, args)
    config = UWMConfig(method="iterative_attribution", rounds=args.rounds, goal=None, knowledge_budget=None,
                       curvature_weight=weight, round_density=density)
    start = time.process_time()
    editor = UWMEditor(model, processor, config).calibrate(calibration, progress=False)
    calibrate_s = time.process_time() - start
    per_round = []
    for r in range(0, args.rounds + 1):
        edited = editor.with_settings(rounds=r) if r else None
        if edited is not None:
            edited.apply()
        try:
            report = evaluate_model(model, processor, validation, zero_shot=zero_shot, progress=False)
        finally:
            if edited is not None:
                edited.revert()
        per_round.append({"round": r, "GS": report.safeground["GS"], "PU": report.safeground["PU"],
                          "zero_shot": report.zero_shot, "R@1 Ts->Is": report.retrieval["R@1 Ts->Is"]})
        print(f"{model_name}: round {r:2d}  slice GS {editor.trajectory[r].goal:5.1f}  "
              f"drift {editor.trajectory[r].measures['drift']:.2f}  "
              f"agreement {editor.trajectory[r].measures['agreement']:.1f}  "
              f"vocabulary shift {editor.trajectory[r].measures['vocabulary_shift']:.2f}  | validation GS {per_round[-1]['GS']:5.1f}"
              f"  zero-shot {report.zero_shot:.1f}", flush=True)
    return {"model": model_name, "curvature_weight": weight, "round_density": density, "calibrate_cpu_s": calibrate_s,
            "trajectory": to_records(editor.trajectory), "validation": per_round}


def replay(run: dict, measure: str, goal, budget) -> tuple[int, str | None]:
    steps = from_records(run["trajectory"])
    base = steps[0]
    costed = [Step(s.round, s.goal, MEASURES[measure](s, base), s.flipped, s.measures) for s in steps]
    return stopping_round(costed, goal, budget, len(steps) - 1)


def candidates(runs: list[dict], max_drop: float) -> list[dict]:
    rows = []
    for measure, budgets in BUDGETS.items():
        for budget in budgets:
            for goal in GOALS:
                outcome = []
                for run in runs:
                    kept, reason = replay(run, measure, goal, budget)
                    val = run["validation"]
                    outcome.append({"model": run["model"], "rounds": kept, "reason": reason,
                                    "GS": val[kept]["GS"], "drop": val[0]["zero_shot"] - val[kept]["zero_shot"]})
                rows.append({"measure": measure, "budget": budget, "goal": goal, "per_model": outcome,
                             "worst_GS": min(o["GS"] for o in outcome), "worst_drop": max(o["drop"] for o in outcome),
                             # a rule that ran to the end of a recorded trajectory would have gone on: unknown
                             "ok": all(o["drop"] <= max_drop and o["reason"] != MAX_ROUNDS for o in outcome)})
    return rows


def plot(runs: list[dict], path: Path):
    """Validation zero-shot drop against each held-out knowledge measure (one point per round), and
    validation GS against the held-out GS; world-3 organisms dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hf_uwm import organism

    panels = len(MEASURES) + 1
    cols = 4
    fig, axes = plt.subplots((panels + cols - 1) // cols, cols, figsize=(4.2 * cols, 3.6 * ((panels + cols - 1) // cols)))
    axes = axes.flatten()
    for run in runs:
        steps = from_records(run["trajectory"])
        drops = [run["validation"][0]["zero_shot"] - v["zero_shot"] for v in run["validation"]]
        style = dict(marker=".", label=Path(run["model"]).name,
                     linestyle="--" if organism.world_of(run["model"]) == 3 else "-")
        for ax, (name, fn) in zip(axes, MEASURES.items()):
            ax.plot([fn(s, steps[0]) for s in steps], drops, **style)
            ax.set_xlabel(f"held-out {name} (points lost)")
            ax.set_ylabel("validation zero-shot drop")
        axes[panels - 1].plot([s.goal for s in steps], [v["GS"] for v in run["validation"]], **style)
    axes[panels - 1].set_xlabel("held-out GS")
    axes[panels - 1].set_ylabel("validation GS")
    for ax in axes[panels:]:
        ax.axis("off")
    for ax in axes[:panels]:
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    axes[-1].legend(handles, labels, fontsize=8, loc="center", title="world 3 dashed")
    fig.suptitle("Iterative attribution, one point per round: what the held-out slice sees vs validation")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    cached = json.loads(out.read_text()) if out.is_file() else {"runs": []}
    runs = {(run["model"], run.get("curvature_weight", 4.0), run.get("round_density", 0.001)): run
            for run in cached["runs"]}
    rows = []
    for weight, density in itertools.product(args.curvature_weight, args.round_density):
        for name in args.models:
            if (name, weight, density) not in runs:
                runs[name, weight, density] = trajectory_of(name, args, weight, density)
                out.write_text(json.dumps({"runs": list(runs.values())}, indent=1))
        rows += [{"curvature_weight": weight, "round_density": density, **row}
                 for row in candidates([runs[name, weight, density] for name in args.models], args.max_drop)]
    ok = [r for r in rows if r["ok"]]
    # Ties on the worst-case GS go to the higher mean GS, then to fewer rounds (a cheaper calibration).
    best = max(ok, key=lambda r: (round(r["worst_GS"], 1), round(sum(o["GS"] for o in r["per_model"]), 1),
                                  -max(o["rounds"] for o in r["per_model"]))) if ok else None
    out.write_text(json.dumps({"runs": list(runs.values()), "candidates": rows, "chosen": best,
                               "max_drop": args.max_drop}, indent=1))
    kept = ((best["curvature_weight"], best["round_density"]) if best
            else (args.curvature_weight[0], args.round_density[0]))
    plot([runs[(name, *kept)] for name in args.models], out.with_suffix(".png"))
    print(f"\n{'λ':>4} {'δ':>6} {'measure':<15}{'budget':>7}{'goal':>6}{'worst GS':>10}{'worst drop':>12}  "
          "per model (rounds, GS, drop)")
    for r in sorted(rows, key=lambda r: (-r["ok"], -r["worst_GS"]))[:25]:
        per = "  ".join(f"{o['rounds']:>2} {o['GS']:5.1f} {o['drop']:+.1f}" for o in r["per_model"])
        print(f"{r['curvature_weight']:>4g} {r['round_density']:>6g} {r['measure']:<15}{r['budget']:>7g}"
              f"{str(r['goal']):>6}{r['worst_GS']:>10.1f}{r['worst_drop']:>12.2f}  {per}"
              f"{'' if r['ok'] else '  (not eligible)'}")
    print("\nchosen:", None if best is None else {k: best[k] for k in ("curvature_weight", "round_density", "measure",
                                                                       "budget", "goal", "worst_GS")})


if __name__ == "__main__":
    main()
