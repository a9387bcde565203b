"""Ablations and baselines on the bundled model organism (issue 7), each beside its random control.

Every family of settings is calibrated once and re-selected from the cached scores. Settings are
evaluated on the validation split; per family the rule of `hf_uwm.sweep.choose` (highest GS within
5 zero-shot points) picks one, and only those are evaluated on the test split, with bootstrap CIs.
Writes docs/ablations.md, docs/ablations_validation.csv and docs/ablations_pareto.png.

    python scripts/organism_ablations.py            # about 15 minutes on one CPU thread
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from hf_uwm import UWMConfig, UWMEditor
from hf_uwm import sweep as sw
from hf_uwm.evaluation import ZeroShotTask, evaluate_model
from hf_uwm.organism import load_organism, make_pairs, organism_path, zero_shot_task

TAUS = [{"tau": t} for t in (0.01, 0.02, 0.05)]
DENSITIES = [{"density": d} for d in (0.01, 0.02, 0.05)]
LAYER_TYPES = ["self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"]


def families():
    """name -> (config to calibrate, grid of with_settings changes)."""
    fixed = dict(selection="fixed")
    out = {}
    for score in ("ratio", "unsafe", "difference"):
        for norm in ("l2", "rms"):
            out[f"{score} {norm}"] = (UWMConfig(score=score, token_norm=norm), TAUS)
    out["ratio l2 fixed"] = (UWMConfig(**fixed), DENSITIES)
    out["ratio l2 prior text off"] = (UWMConfig(text_prior=False), TAUS)
    out["ratio l2 prior vision on"] = (UWMConfig(vision_prior=True), TAUS)
    out["ratio l2 text only"] = (UWMConfig(vision_targets=[]), TAUS)
    out["ratio l2 vision only"] = (UWMConfig(text_targets=[]), TAUS)
    for tower in ("text", "vision"):
        other = {"vision_targets" if tower == "text" else "text_targets": []}
        for layer in LAYER_TYPES:
            out[f"ratio rms {tower} {layer}"] = (UWMConfig(token_norm="rms", **{f"{tower}_targets": [layer]}, **other),
                                                 TAUS)
    out["attribution text out_proj"] = (UWMConfig(score="attribution", vision_targets=[], **fixed), DENSITIES)
    out["attribution both towers"] = (UWMConfig(score="attribution", **fixed), DENSITIES)
    for baseline in ("g_unsafe", "g_safeclip"):
        if baseline in _known_scores():
            out[baseline] = (UWMConfig(score=baseline, alpha=0.0, **fixed), DENSITIES)
    return out


def _known_scores():
    from hf_uwm.config import SCORES

    return SCORES


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="docs")
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--validation", type=int, default=200)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the organism is tiny)")
    parser.add_argument("--max-zero-shot-drop", type=float, default=5.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, processor = load_organism()
    calibration = make_pairs(args.calibration, seed=0, split="train")
    validation = make_pairs(args.validation, seed=0, split="validation")
    test = make_pairs(args.test, seed=0, split="test")
    val_zs = ZeroShotTask(*zero_shot_task(args.validation, seed=1))
    test_zs = ZeroShotTask(*zero_shot_task(500, seed=0))

    def on_validation(m):
        return evaluate_model(m, processor, validation, zero_shot=val_zs, bootstrap=0, progress=False)

    def on_test(m):
        return evaluate_model(m, processor, test, zero_shot=test_zs, bootstrap=1000, seed=0, progress=False)

    base_val, base_test = on_validation(model), on_test(model)
    rows, chosen, tests = [], {}, {}
    for name, (config, grid) in families().items():
        editor = UWMEditor(model, processor, config, base_model=organism_path()).calibrate(calibration,
                                                                                           progress=False)
        family_rows = sw.sweep(editor, grid, on_validation, method=name, progress=False)
        rows += family_rows
        best = sw.choose(family_rows, base_val, args.max_zero_shot_drop)
        if best is None:
            print(f"{name}: no setting within {args.max_zero_shot_drop} zero-shot points")
            continue
        chosen[name] = best
        edit = editor.with_settings(**best.setting)
        tests[name] = (sw.evaluate_edit(edit, on_test), sw.evaluate_edit(edit.random_control(seed=0), on_test))
        print(f"{name}: {best.label()}  test GS {tests[name][0].safeground['GS']:.1f} "
              f"(random {tests[name][1].safeground['GS']:.1f})  [{time.perf_counter() - start:.0f} s]")

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    sw.write_csv(rows, out / "ablations_validation.csv", base_val)
    best_overall = sw.choose(list(chosen.values()), base_val, args.max_zero_shot_drop)
    sw.pareto_plot(rows, out / "ablations_pareto.png", base_val, best_overall)
    (out / "ablations.md").write_text(report(base_test, chosen, tests, best_overall, args, time.perf_counter() - start))
    print((out / "ablations.md").read_text())


def report(base, chosen, tests, best, args, seconds) -> str:
    def cell(r, m):
        lo, hi = r.intervals[m]
        return f"{r.safeground[m]:.1f} [{lo:.1f}, {hi:.1f}]"

    lines = [
        "# Ablations and baselines on the model organism",
        "",
        f"Generated by `python scripts/organism_ablations.py` in {seconds / 60:.1f} min. Calibration: "
        f"{args.calibration} training pairs. Settings chosen per family on {args.validation} validation "
        f"quadruples (highest GS within {args.max_zero_shot_drop} zero-shot points of the base model); test: "
        f"{args.test} quadruples and 500 zero-shot images, bootstrap 95% CIs. Each edit is shown beside a "
        "random control that flips the same number of weights per layer with the same α.",
        "",
        "| family | chosen setting | weights | P_u^t | P_u^v | PU | GS | zero-shot | random PU | random GS | random zero-shot |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| base model | - | 0 | {base.safeground['P_u^t']:.1f} | {base.safeground['P_u^v']:.1f} | {cell(base, 'PU')} | "
        f"{cell(base, 'GS')} | {base.zero_shot:.1f} | | | |",
    ]
    for name, row in chosen.items():
        edit, control = tests[name]
        setting = " ".join(f"{k}={v}" for k, v in row.setting.items())
        lines.append(f"| {name} | {setting} | {row.weights} | {edit.safeground['P_u^t']:.1f} | "
                     f"{edit.safeground['P_u^v']:.1f} | {cell(edit, 'PU')} | {cell(edit, 'GS')} | {edit.zero_shot:.1f} | "
                     f"{cell(control, 'PU')} | {cell(control, 'GS')} | {control.zero_shot:.1f} |")
    lines += ["", f"Best family on validation by the same rule: **{best.method}** ({best.label()})."
              if best else "", "", "![validation Pareto plot](ablations_pareto.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
