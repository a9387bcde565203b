"""`hf-uwm demo`: the whole job on the bundled model organism, with honest controls.

Settings are chosen on the validation split by a rule fixed in advance (highest GS within a
zero-shot budget), then the chosen edits are measured once on the test split beside a random control
of the same size per layer, with bootstrap 95% intervals.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import UWMConfig

N_CALIBRATION, N_VALIDATION, N_TEST, N_ZERO_SHOT = 256, 300, 1000, 500
TAUS = (0.01, 0.02, 0.05)
DENSITIES = (0.01, 0.02, 0.05)
METHODS = {
    # name: (config, grid of with_settings changes, folder)
    "UWM": (UWMConfig(), [{"tau": t} for t in TAUS], "uwm"),
    "UWM rms": (UWMConfig(token_norm="rms"), [{"tau": t} for t in TAUS], "uwm-rms"),
    "attribution": (UWMConfig(score="attribution", selection="fixed", vision_targets=[]),
                    [{"density": d} for d in DENSITIES], "attribution"),
}
BAR_METRICS = ("P_u^t", "P_u^v", "PU", "GS")


def run(output: Path, *, max_zero_shot_drop: float = 5.0, seed: int = 0, batch_size: int = 32,
        progress: bool = True) -> dict:
    import dataclasses

    from . import sweep as sw
    from .editor import UWMEditor
    from .evaluation import ZeroShotTask, compare, evaluate_model
    from .organism import load_organism, make_pairs, organism_path, zero_shot_task

    model, processor = load_organism()
    calibration = make_pairs(N_CALIBRATION, seed=seed, split="train")
    validation = make_pairs(N_VALIDATION, seed=seed, split="validation")
    test = make_pairs(N_TEST, seed=seed, split="test")
    validation_zero_shot = ZeroShotTask(*zero_shot_task(N_VALIDATION, seed=seed + 1))
    test_zero_shot = ZeroShotTask(*zero_shot_task(N_ZERO_SHOT, seed=seed))

    def on_validation(m):
        return evaluate_model(m, processor, validation, zero_shot=validation_zero_shot, bootstrap=0, progress=False)

    def on_test(m):
        return evaluate_model(m, processor, test, zero_shot=test_zero_shot, bootstrap=1000, seed=seed,
                              progress=False)

    base_validation = on_validation(model)
    tests = {"base": on_test(model)}
    rows, chosen_rows = [], {}
    for name, (config, grid, folder) in METHODS.items():
        config = dataclasses.replace(config, batch_size=batch_size, seed=seed)
        editor = UWMEditor(model, processor, config, base_model=organism_path()).calibrate(calibration,
                                                                                           progress=progress)
        method_rows = sw.sweep(editor, grid, on_validation, method=name, control_seed=seed, progress=progress)
        rows += method_rows
        chosen = sw.choose(method_rows, base_validation, max_zero_shot_drop)
        if chosen is None:  # nothing within budget: report the gentlest setting, flagged as such
            chosen = max(method_rows, key=lambda r: r.report.zero_shot)
            chosen.extra["over_budget"] = True
        chosen_rows[name] = chosen
        edit = editor.with_settings(**chosen.setting)
        control = edit.random_control(seed=seed)
        tests[name] = sw.evaluate_edit(edit, on_test)
        tests[f"random ({name})"] = sw.evaluate_edit(control, on_test)
        edit.save_pretrained(output / folder, {"base": tests["base"], "UWM": tests[name],
                                               "random control": tests[f"random ({name})"]})

    output.mkdir(parents=True, exist_ok=True)
    print("\nValidation sweep (settings are chosen here; each beside a random control of the same size)")
    print(sw.table(rows, base_validation))
    sw.write_csv(rows, output / "validation_sweep.csv", base_validation)
    sw.pareto_plot(rows, output / "validation_pareto.png", base_validation)
    print(f"\nChosen on validation (max GS within {max_zero_shot_drop} zero-shot points):")
    for name, row in chosen_rows.items():
        flag = "  [no setting within budget: gentlest shown]" if row.extra.get("over_budget") else ""
        print(f"  {name:<12} {row.label()}  ({row.weights} weights){flag}")
    print(f"\nTest split ({N_TEST} quadruples, zero-shot on {N_ZERO_SHOT} images; differences vs base)")
    print(compare(tests))
    _intervals(tests)
    bar_chart(tests, output / "test_results.png")
    results = {"chosen": {n: {"setting": r.setting, "weights": r.weights, "over_budget": bool(r.extra.get("over_budget"))}
                          for n, r in chosen_rows.items()},
               "test": {n: r.to_dict() for n, r in tests.items()},
               "validation": {"base": base_validation.to_dict(),
                              "rows": [{"method": r.method, "setting": r.setting, "weights": r.weights,
                                        "report": r.report.to_dict(), "control": r.control.to_dict()}
                                       for r in rows]}}
    (output / "results.json").write_text(json.dumps(results, indent=2))
    return results


def _intervals(tests: dict):
    print("\nBootstrap 95% intervals on test (PU, GS):")
    for name, report in tests.items():
        cells = [f"{m} {report.safeground[m]:5.1f} [{report.intervals[m][0]:.1f}, {report.intervals[m][1]:.1f}]"
                 for m in ("PU", "GS")]
        print(f"  {name:<22} " + "   ".join(cells))


def bar_chart(reports: dict, path: Path) -> Path:
    """Grouped bars of the unsafe-side metrics and zero-shot accuracy, with bootstrap 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = BAR_METRICS + ("zero-shot",)
    names = list(reports)
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(10, 4.8))
    for i, name in enumerate(names):
        r = reports[name]
        values = [r.safeground[m] for m in BAR_METRICS] + [r.zero_shot]
        lows = [r.safeground[m] - r.intervals[m][0] if m in r.intervals else 0 for m in BAR_METRICS] + [0]
        highs = [r.intervals[m][1] - r.safeground[m] if m in r.intervals else 0 for m in BAR_METRICS] + [0]
        hatch = "//" if name.startswith("random") else None
        ax.bar(np.arange(len(metrics)) + i * width, values, width, yerr=[lows, highs], capsize=2, label=name,
               hatch=hatch, alpha=0.9)
    ax.set_xticks(np.arange(len(metrics)) + width * (len(names) - 1) / 2, metrics)
    ax.set_ylabel("percent (test split)")
    ax.set_title("Model organism: base, edits and random controls of the same size (95% bootstrap CIs)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
