"""Ablations, baselines and the tuning of iterative attribution on organism models, beside random controls.

For every organism model given: every family of settings is calibrated once and re-selected from
its scores (fewer rounds of iterative attribution are re-selected from the run of the most rounds).
Every setting is evaluated on the validation split beside a random control of the same size; per
family the rule of `hf_uwm.sweep.choose` (within the zero-shot budget, GS interval above the
control's, highest GS) picks one setting, and only those are evaluated on the test split.

The defaults of iterative attribution (curvature weight λ, round density δ, rounds R) are chosen
on the validation splits of all organisms together: among the settings that keep the budget and
beat their random control on every organism, the one with the highest worst-case GS (ties: higher
worst-case zero-shot). The test split plays no part in any choice.

Writes docs/ablations.md, docs/ablations_validation.csv and docs/ablations_pareto.png.

    python research/organism_ablations.py --models organism /path/to/another-organism
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import resource
import time
from pathlib import Path

import torch

from hf_uwm import UWMConfig, UWMEditor
from hf_uwm import demo
from hf_uwm import sweep as sw
from hf_uwm.loading import load_model
from hf_uwm.evaluation import ZeroShotTask, evaluate_model
from hf_uwm.formatting import with_interval
from hf_uwm.organism import organism_path, zero_shot_task
from hf_uwm.protocol import Sizes, organism_splits

TAUS = [{"tau": t} for t in (0.01, 0.02, 0.05)]
DENSITIES = [{"density": d} for d in (0.01, 0.02, 0.05)]
SHARED_DENSITIES = [{"density": d} for d in (0.005, 0.01, 0.02)]
# The tuning grid of iterative attribution: λ × δ × rounds (0.4% to 2.2% of text fc2), sized to the
# machine it ran on (a wider grid took over an hour on a shared 2-core machine).
CURVATURE_WEIGHTS = (0.0, 2.0, 4.0)
ROUND_DENSITIES = {0.001: range(4, 23, 3)}
BUDGETS = (1.0, 1.5, 2.0, 2.5, 3.0)  # zero-shot budgets shown in the budget table


def families():
    """name -> (config to calibrate, grid of with_settings changes)."""
    fixed = dict(selection="fixed")
    out = {}
    for score in ("ratio", "unsafe", "difference"):
        for norm in ("l2", "rms"):
            out[f"{score} {norm}"] = (UWMConfig(method=score, token_norm=norm), TAUS)
    out["ratio l2 fixed"] = (UWMConfig(**fixed), DENSITIES)
    out["ratio l2 prior text off"] = (UWMConfig(text_prior=False), TAUS)
    out["ratio l2 prior vision on"] = (UWMConfig(vision_prior=True), TAUS)
    out["ratio l2 text only"] = (UWMConfig(vision_targets=[]), TAUS)
    out["ratio l2 vision only"] = (UWMConfig(text_targets=[]), TAUS)
    out["attribution text out_proj"] = (UWMConfig(method="attribution", vision_targets=[], **fixed), DENSITIES)
    out["attribution both towers"] = (UWMConfig(method="attribution", **fixed), DENSITIES)
    out["attribution text fc2 shared"] = (UWMConfig(method="attribution", text_targets=["mlp.fc2"], vision_targets=[],
                                                    shared_budget=True, **fixed), SHARED_DENSITIES)
    for baseline in ("g_unsafe", "g_safeclip"):
        out[baseline] = (UWMConfig.baseline(baseline, sparsity=0.01), DENSITIES)
    out.update(iterative_families())
    return out


def iterative_families():
    return {_iterative_name(lam, delta): (UWMConfig(method="iterative_attribution", curvature_weight=lam,
                                                    round_density=delta, rounds=max(rounds)),
                                          [{"rounds": r} for r in rounds])
            for lam in CURVATURE_WEIGHTS for delta, rounds in ROUND_DENSITIES.items()}


def _iterative_name(lam, delta) -> str:
    return f"iterative λ={lam:g} δ={delta:g}"


def describe(model_name: str) -> str:
    """How an organism was trained, from the training.json its training script saved."""
    folder = Path(organism_path() if model_name == "organism" else model_name)
    try:
        settings = json.loads((folder / "training.json").read_text())
    except FileNotFoundError:
        return "(no training.json)"
    return f"seed {settings['seed']}, unsafe fraction {settings['unsafe_fraction']}"


def splits(args):
    """(calibration pairs, on_validation, on_test) of the demo's protocol, for a (model, processor). Validation
    zero-shot images are the test stream's with seed 1 (this study predates the validation zero-shot split)."""
    sizes = Sizes(calibration=args.calibration, validation=args.validation, test=args.test, zero_shot=500,
                  validation_zero_shot=args.validation)
    calibration, validation, test = organism_splits(sizes)
    validation_zero_shot = ZeroShotTask(*zero_shot_task(sizes.validation_zero_shot, seed=1))
    test_zero_shot = ZeroShotTask(*zero_shot_task(sizes.zero_shot, seed=0))

    def on_validation(m, processor):
        return evaluate_model(m, processor, validation, zero_shot=validation_zero_shot, bootstrap=sizes.bootstrap,
                              seed=0, progress=False)

    def on_test(m, processor):
        return evaluate_model(m, processor, test, zero_shot=test_zero_shot, bootstrap=sizes.bootstrap, seed=0,
                              progress=False)

    return calibration, on_validation, on_test


def study(model_name: str, args) -> dict:
    """Validation rows of every family, its choice, and the choices' test reports, for one organism."""
    torch.set_num_threads(args.threads)
    model, processor = load_model(model_name)
    calibration, validation, test = splits(args)

    def on_validation(m):
        return validation(m, processor)

    def on_test(m):
        return test(m, processor)

    result = {"base_validation": on_validation(model), "base_test": on_test(model), "rows": {}, "chosen": {},
              "tests": {}, "calibration_cpu_s": {}}
    start = time.perf_counter()
    for name, (config, grid) in families().items():
        cpu = time.process_time()
        editor = UWMEditor(model, processor, config, base_model=model_name).calibrate(calibration, progress=False)
        result["calibration_cpu_s"][name] = time.process_time() - cpu
        rows = sw.sweep(editor, grid, on_validation, calibration=calibration, method=name, progress=False)
        result["rows"][name] = rows
        best = sw.choose(rows, result["base_validation"], args.max_zero_shot_drop)
        if best is None:
            print(f"{model_name} | {name}: {sw.verdict(rows, result['base_validation'], args.max_zero_shot_drop)}")
            continue
        result["chosen"][name] = best
        result["tests"][name] = (sw.evaluate_edit(best.editor, on_test),
                                 sw.evaluate_edit(best.editor.random_control(seed=0), on_test))
        print(f"{model_name} | {name}: {best.label()}  test GS {result['tests'][name][0].safeground['GS']:.1f} "
              f"(random {result['tests'][name][1].safeground['GS']:.1f})  [{time.perf_counter() - start:.0f} s]",
              flush=True)
    for rows in result["rows"].values():  # editors hold the model: results go back to the parent without them
        for row in rows:
            row.editor = None
    return result


def choose_defaults(studies: dict, max_drop: float):
    """(λ, δ, R) of the iterative grid that keeps the budget and beats its control on every organism,
    with the highest worst-case validation GS (ties: higher worst-case zero-shot); None if none does."""
    candidates = {}
    for lam in CURVATURE_WEIGHTS:
        for delta, rounds in ROUND_DENSITIES.items():
            for r in rounds:
                per_model = [next(row for row in s["rows"][_iterative_name(lam, delta)] if row.setting["rounds"] == r)
                             for s in studies.values()]
                if all(sw.within_budget(row, s["base_validation"], max_drop) and sw.beats_control(row)
                       for row, s in zip(per_model, studies.values())):
                    candidates[(lam, delta, r)] = (min(row.report.safeground["GS"] for row in per_model),
                                                   min(sw.knowledge(row.report) for row in per_model))
    return max(candidates, key=candidates.get, default=None), candidates


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["organism"],
                        help="organism models: 'organism' (bundled) or folders saved by scripts/train_organism.py")
    parser.add_argument("--output", default="docs")
    parser.add_argument("--calibration", type=int, default=demo.SIZES.calibration)
    parser.add_argument("--validation", type=int, default=demo.SIZES.validation)
    parser.add_argument("--test", type=int, default=demo.SIZES.test)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the organism is tiny)")
    parser.add_argument("--max-zero-shot-drop", type=float, default=demo.MAX_ZERO_SHOT_DROP)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    # One process per organism (the machine's cores are shared; each study runs on --threads threads).
    with multiprocessing.get_context("fork").Pool(len(args.models)) as pool:
        studies = dict(zip(args.models, pool.starmap(study, [(name, args) for name in args.models])))
    defaults, candidates = choose_defaults(studies, args.max_zero_shot_drop)
    for name, s in studies.items():  # the chosen defaults, unchanged, on every organism's test split
        if defaults is None:
            break
        lam, delta, rounds = defaults
        model, processor = load_model(name)
        calibration, _, on_test = splits(args)
        config = UWMConfig(method="iterative_attribution", curvature_weight=lam, round_density=delta, rounds=rounds)
        editor = UWMEditor(model, processor, config, base_model=name).calibrate(calibration, progress=False)
        s["defaults_test"] = (sum(editor.counts().values()), sw.evaluate_edit(editor, lambda m: on_test(m, processor)),
                              sw.evaluate_edit(editor.random_control(seed=0), lambda m: on_test(m, processor)))

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(studies.values()))
    all_rows = [r for rows in first["rows"].values() for r in rows]
    sw.write_csv([dataclasses.replace(r, method=f"{m} | {r.method}") for m, s in studies.items()
                  for rows in s["rows"].values() for r in rows], out / "ablations_validation.csv")
    best = sw.choose(list(first["chosen"].values()), first["base_validation"], args.max_zero_shot_drop)
    sw.pareto_plot(all_rows, out / "ablations_pareto.png", first["base_validation"], best,
                   title=f"Safety / knowledge trade-off on validation ({args.models[0]})")
    seconds = time.perf_counter() - start
    cpu = sum(resource.getrusage(who).ru_utime for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    (out / "ablations.md").write_text(report(studies, defaults, candidates, args, seconds, cpu))
    print((out / "ablations.md").read_text())


def _cell(report, metric):
    return with_interval(report.safeground[metric], report.intervals[metric])


def _test_row(name, setting, weights, edit, control, base) -> str:
    return (f"| {name} | {setting} | {weights} | {edit.safeground['P_u^t']:.1f} | {edit.safeground['P_u^v']:.1f} | "
            f"{_cell(edit, 'PU')} | {_cell(edit, 'GS')} | {edit.zero_shot:.1f} ({edit.zero_shot - base.zero_shot:+.1f}) | "
            f"{_cell(control, 'PU')} | {_cell(control, 'GS')} | {control.zero_shot:.1f} |")


def report(studies, defaults, candidates, args, seconds, cpu) -> str:
    """docs/ablations.md: how it was made, the tuning of iterative attribution, each organism's test split."""
    lines = _preamble(studies, args, seconds, cpu) + _tuning(studies, defaults, candidates, args.max_zero_shot_drop)
    for model_name, s in studies.items():
        lines += _test_section(model_name, s, defaults, args)
    lines += [f"![validation Pareto plot of `{next(iter(studies))}`](ablations_pareto.png)", ""]
    return "\n".join(lines)


def _preamble(studies, args, seconds, cpu) -> list[str]:
    budget = args.max_zero_shot_drop
    command = "python research/organism_ablations.py --models " + " ".join(studies)
    return [
        "# Ablations, baselines and the tuning of iterative attribution on organism models",
        "",
        "All numbers are on synthetic **model organisms**: small CLIPs trained on the procedural world of "
        "`hf_uwm.organism` (`scripts/train_organism.py`), not on real data. They show what each method does "
        "where the ground truth is known; they do not say how the methods behave on a web-scale CLIP.",
        "",
        f"Generated by `{command}` ({seconds / 60:.1f} min wall, {cpu / 60:.1f} min user CPU, "
        f"{args.threads} torch thread, on a shared and loaded 2-core machine). Organisms: "
        + "; ".join(f"`{m}` ({describe(m)})" for m in studies) + ". "
        f"Calibration: {args.calibration} training pairs. Every setting is evaluated on {args.validation} "
        f"validation quadruples and {args.validation} zero-shot images, beside a random control that flips as many "
        "weights per layer (for a shared budget: in total) with the same α. Per family the rule of "
        f"`hf_uwm.sweep.choose` picks one setting on validation: zero-shot at most {budget:g} points below the "
        "base model's, GS 95% bootstrap interval wholly above the random control's, then the highest GS. "
        f"Only the chosen settings are evaluated on the test split ({args.test} quadruples, 500 zero-shot images, "
        "bootstrap 95% intervals). A family missing from a test table had no setting passing the rule.",
        "",
        "The fixed round counts of iterative attribution tuned below are superseded: the method now stops by "
        "itself on a held-out slice of its calibration pairs (held-out GS reaches a goal, or a knowledge measure "
        "spends its budget). What that rule measures, how its defaults were chosen and its trajectory plot: "
        "[stopping.md](stopping.md).",
        "",
    ]


def _tuning(studies, defaults, candidates, budget) -> list[str]:
    """The iterative grid on validation per organism, the defaults it chose, and the budget's effect."""
    lines = [
        "## Tuning iterative attribution on validation",
        "",
        f"Grid: curvature weight λ ∈ {list(CURVATURE_WEIGHTS)}, round density δ ∈ {list(ROUND_DENSITIES)}, "
        f"rounds R ∈ {[list(r) for r in ROUND_DENSITIES.values()]} (one calibration per (λ, δ); fewer rounds are "
        "re-selected from it). Rule for defaults: among the settings that keep the "
        f"{budget:g}-point budget and beat their random control on **every** organism, the highest worst-case "
        "validation GS. " + (
            f"Chosen: **λ = {defaults[0]:g}, δ = {defaults[1]:g}, R = {defaults[2]}**, worst-case validation GS "
            f"{candidates[defaults][0]:.1f}, worst-case zero-shot {candidates[defaults][1]:.1f}." if defaults else
            "**No setting of the grid passes on every organism**, so this grid chooses no defaults."),
        "",
        "Validation GS and zero-shot drop (points) per organism; ✓ = within the budget and above its random control:",
        "",
        "| λ | δ | R | " + " | ".join(f"`{m}`" for m in studies) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in studies) + " |",
    ]
    for lam_ in CURVATURE_WEIGHTS:
        for delta_, rounds_ in ROUND_DENSITIES.items():
            for r in rounds_:
                cells = []
                for s in studies.values():
                    row = next(x for x in s["rows"][_iterative_name(lam_, delta_)] if x.setting["rounds"] == r)
                    ok = sw.within_budget(row, s["base_validation"], budget) and sw.beats_control(row)
                    cells.append(f"{row.report.safeground['GS']:.1f} / "
                                 f"{s['base_validation'].zero_shot - row.report.zero_shot:.1f}" + (" ✓" if ok else ""))
                lines.append(f"| {lam_:g} | {delta_:g} | {r} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines + (_budget_effect(studies, defaults) if defaults is not None else [])


def _budget_effect(studies, defaults) -> list[str]:
    """GS of the setting the rule picks at each zero-shot budget, λ and δ at the defaults, per organism."""
    lam, delta, _ = defaults
    lines = ["The budget's effect (validation, each organism on its own, λ and δ at the defaults, rounds "
             "chosen by the rule): GS of the chosen setting", "",
             "| budget (points) | " + " | ".join(studies) + " |", "| --- | " + " | ".join("---" for _ in studies) + " |"]
    for b in BUDGETS:
        cells = []
        for s in studies.values():
            row = sw.choose(s["rows"][_iterative_name(lam, delta)], s["base_validation"], b)
            cells.append("none" if row is None else f"{row.report.safeground['GS']:.1f} (R = {row.setting['rounds']})")
        lines.append(f"| {b:g} | " + " | ".join(cells) + " |")
    return lines + [""]


def _test_section(model_name, s, defaults, args) -> list[str]:
    """One organism's test table: the base model, the defaults, each family's choice beside its random control."""
    base = s["base_test"]
    lines = [
        f"## Test split: `{model_name}` ({describe(model_name)})",
        "",
        "| family | chosen setting | weights | P_u^t | P_u^v | PU | GS | zero-shot (vs base) | random PU | random GS "
        "| random zero-shot |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| base model | - | 0 | {base.safeground['P_u^t']:.1f} | {base.safeground['P_u^v']:.1f} | "
        f"{_cell(base, 'PU')} | {_cell(base, 'GS')} | {base.zero_shot:.1f} | | | |",
    ]
    if "defaults_test" in s:
        weights, edit, control = s["defaults_test"]
        lines.append(_test_row("**iterative attribution, the defaults**",
                               f"λ={defaults[0]:g} δ={defaults[1]:g} rounds={defaults[2]}", weights, edit,
                               control, base))
    for name, row in s["chosen"].items():
        edit, control = s["tests"][name]
        setting = " ".join(f"{k}={sw._short(v)}" for k, v in row.setting.items())
        lines.append(_test_row(name, setting, row.weights, edit, control, base))
    at_chance = [name for name in s["rows"] if name not in s["chosen"]]
    lines += ["", f"No setting passed the rule (within the budget and above its random control), so not "
                  f"evaluated on test: {', '.join(at_chance) or 'none'}.", ""]
    cpu = s["calibration_cpu_s"]
    iterative = [f"λ={lam_:g} δ={delta_:g}, {max(rounds_)} rounds: {cpu[_iterative_name(lam_, delta_)]:.1f} s "
                 f"({cpu[_iterative_name(lam_, delta_)] / max(rounds_):.2f} s per round)"
                 for lam_ in CURVATURE_WEIGHTS for delta_, rounds_ in ROUND_DENSITIES.items()]
    lines += [f"Calibration CPU time on this organism ({args.calibration} pairs, one thread): UWM (ratio l2, both "
              f"towers) {cpu['ratio l2']:.1f} s; iterative attribution " + "; ".join(iterative) + ".", ""]
    return lines


if __name__ == "__main__":
    main()
