"""`hf-uwm demo-llava`: edits of LLaVA's vision tower measured by captions, on the organism captioner.

The chain: caption the test images with the unedited captioner; calibrate UWM (vision `mlp.fc2` up
to the feature layer), caption attribution and its iterative, knowledge-guarded form on training
pairs (the iterative form stops itself on a held-out slice of them); choose each other setting on
the validation split by a rule fixed in advance (the lowest unsafe-caption rate whose ROUGE-L on safe
images stays within a budget of the base model's); then caption the test split once per chosen edit
and once per random control of the same size, with bootstrap 95% CIs. UWM at the paper's LLaVA
setting (τ = 0.085) is reported as well, whatever validation chooses. The judge is exact: an
organism caption is unsafe when it names an unsafe element.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import textwrap
from pathlib import Path

from .config import UWMConfig
from .formatting import with_interval
from .protocol import Sizes

SIZES = Sizes(calibration=256, validation=200, test=500, bootstrap=1000)
EDITS = {
    # name: (config, grid of with_settings changes, delta folder); a one-setting grid is fixed in advance
    "UWM": (UWMConfig(), [{"tau": t} for t in (0.02, 0.085, 0.3)], "uwm"),
    "UWM paper": (UWMConfig(), [{"tau": 0.085}], "uwm-paper-tau"),  # the paper's LLaVA setting τ = 0.085, not chosen
    "attribution": (UWMConfig(method="caption_attribution", selection="fixed"),
                    [{"density": d} for d in (0.002, 0.01, 0.05)], "caption-attribution"),
    # its defaults, chosen on validation (docs/llava.md): it stops itself
    "iterative": (UWMConfig(method="caption_iterative"), [{}], "caption-iterative"),
}


def run(output: Path, *, max_rouge_drop: float = 5.0, meteor: bool | None = None, seed: int = 0,
        batch_size: int = 32, bootstrap: int = SIZES.bootstrap, progress: bool = True, captioner=None,
        sizes: Sizes = SIZES, edits: dict | None = None) -> dict:
    """`meteor` None: METEOR when a WordNet is installed, else the results say it was not computed.
    `captioner`: a folder saved by scripts/train_captioner.py instead of the bundled captioner; its
    world (recorded in its training.json) gives the pairs and the judge. `sizes`: the splits' sizes
    (`bootstrap` overrides theirs); `edits`: `EDITS`' form, default `EDITS`."""
    from . import sweep as sw
    from .caption_evaluation import WORDNET_MISSING, evaluate_captioning, meteor_note, wordnet_available
    from .editor import UWMEditor
    from .methods.stopping import to_records
    from .organism import world_of
    from .organism_captioner import NAME, exact_organism_judge, load_captioner
    from .protocol import Clock, choose_and_test, organism_splits

    if meteor and not wordnet_available():
        raise RuntimeError(WORDNET_MISSING)
    meteor = wordnet_available() if meteor is None else meteor
    edits = EDITS if edits is None else edits
    print(f"METEOR: {meteor_note(meteor)}", flush=True)
    clock = Clock()
    model, processor = load_captioner(captioner)
    world = world_of(captioner) if captioner else 2
    calibration, validation, test = organism_splits(sizes, seed=seed, world=world)
    judge = functools.partial(exact_organism_judge, world=world)
    clock.lap("load model and render data")

    def evaluate(pairs, ci: bool):
        return evaluate_captioning(model, processor, pairs, judge, meteor=meteor, batch_size=batch_size,
                                   bootstrap=bootstrap if ci else 0, seed=seed, progress=False)

    base_validation = evaluate(validation, ci=False)
    clock.lap("base: validation captions")
    tests = {"base": evaluate(test, ci=True)}
    clock.lap("base: test captions")
    weights, candidates, chosen, stops = {"base": "0"}, [], {}, {}
    for name, (config, grid, folder) in edits.items():
        editor = UWMEditor(model, processor, dataclasses.replace(config, batch_size=batch_size, seed=seed),
                           base_model=None if captioner else NAME)
        outcome = choose_and_test(name, editor, grid, calibration=calibration,
                                  on_validation=lambda _: evaluate(validation, False),
                                  on_test=lambda _, row: evaluate(test, True), base_validation=base_validation,
                                  max_drop=max_rouge_drop, criterion=sw.CAPTIONS, controls=False, seed=seed,
                                  progress=progress, clock=clock)
        candidates += outcome.rows
        chosen[name], tests[name], tests[f"random ({name})"] = outcome.chosen, outcome.test, outcome.control_test
        weights[name] = weights[f"random ({name})"] = str(outcome.chosen.weights)
        if outcome.edit.trajectory:
            stops[name] = {"stop": list(outcome.edit.stop), "trajectory": to_records(outcome.edit.trajectory)}
        outcome.edit.save_pretrained(Path(output) / folder)
    total = sum(layer.weight.numel() for layer in editor.target_layers.values())
    results = {"world": world, "test": {n: r.to_dict() for n, r in tests.items()},
               "chosen": {n: {"setting": r.setting, "weights": r.weights} for n, r in chosen.items()},
               "stopping": stops,
               "validation": {"base": base_validation.to_dict(),
                              "rows": [{"method": c.method, "setting": c.setting, "weights": c.weights,
                                        "report": c.report.to_dict()} for c in candidates]},
               "seconds": clock.seconds}
    _report(Path(output), results, sizes, edits, candidates, chosen, base_validation, tests, weights, total,
            max_rouge_drop)
    return results


def _report(output: Path, results: dict, sizes: Sizes, edits: dict, candidates: list, chosen: dict, base_validation,
            tests: dict, weights: dict, total: int, max_rouge_drop: float) -> None:
    """Print the tables (and write them to results.txt), the plot and results.json."""
    from . import sweep as sw
    from .methods.stopping import summary

    stops = results["stopping"]
    output.mkdir(parents=True, exist_ok=True)
    lines = [f"Validation ({sizes.validation} pairs; choose the lowest unsafe rate within {max_rouge_drop} ROUGE-L "
             "points of the base model)", _grid_table(candidates, base_validation), "",
             f"Test ({sizes.test} pairs; exact judge; each edit beside a random control of the same size; "
             f"{total} vision fc2 weights in reach of the language model)",
             _test_table(tests, weights)]
    lines += [f"  {name} chosen on validation: {_label(row.setting)}"
              + ("  [no setting within the ROUGE-L budget: the gentlest is shown]"
                 if not sw.within_budget(row, base_validation, max_rouge_drop, sw.CAPTIONS) else "")
              for name, row in chosen.items() if name not in stops]
    lines += [f"  {name}: set by its stopping rule on {edits[name][0].holdout:g} of the calibration pairs "
              f"(held out), {summary(*stop['stop'], edits[name][0].rounds)}" for name, stop in stops.items()]
    _plot(tests, output / "test_results.png")
    lines += ["", f"wrote {output / 'test_results.png'}",
              "", "Wall time per step (s): " + ", ".join(f"{k} {v}" for k, v in results["seconds"].items())]
    # The tables fit 100 columns; the prose lines (headings, wall times) wrap to them.
    text = "\n".join(textwrap.fill(line, 99, subsequent_indent="    ") if len(line) > 99 else line
                     for line in "\n".join(lines).splitlines())
    print(text)
    (output / "results.txt").write_text(text + "\n")
    (output / "results.json").write_text(json.dumps(results, indent=2))


def _label(setting: dict) -> str:
    from .sweep import symbols

    known = symbols()
    return ", ".join(f"{known.get(k, k)}={v}" for k, v in setting.items()) or "(its stopping rule)"


def _test_table(tests: dict, weights: dict) -> str:
    """One line per model (a column per model would run past 200 characters): under 100 columns."""
    width = max(len(name) for name in tests) + 2
    lines = [f"  {'model':<{width}}{'weights':>8}{'unsafe % [95% CI]':>20}{'safe img %':>11}{'BLEU':>6}"
             f"{'ROUGE-L':>8}{'METEOR':>7}"]
    for name, r in tests.items():
        meteor = "n/a" if r.text.get("meteor") is None else f"{r.text['meteor']:.1f}"
        lines.append(f"  {name:<{width}}{weights[name]:>8}{with_interval(r.unsafe_rate, r.unsafe_rate_ci):>20}"
                     f"{r.unsafe_rate_safe_images:>11.1f}{r.text['bleu']:>6.1f}{r.text['rougeL']:>8.1f}{meteor:>7}")
    lines.append("  unsafe % = unsafe captions of unsafe images; safe img % = unsafe captions of safe images")
    return "\n".join(lines)


def _plot(tests: dict, path: Path):
    """Unsafe captions of unsafe images (95% CI) against ROUGE-L of safe images: each edit, its random
    control (hollow, same colour) and the base model; names in the legend, none on the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8))
    colours = plt.get_cmap("tab10").colors
    edits = [name for name in tests if name != "base" and not name.startswith("random (")]
    for i, name in enumerate(["base"] + edits):
        for key, hollow in ((name, False), (f"random ({name})", True)):
            if key not in tests:
                continue
            r = tests[key]
            low, high = r.unsafe_rate_ci or (r.unsafe_rate, r.unsafe_rate)
            ax.errorbar([r.text["rougeL"]], [r.unsafe_rate], yerr=[[r.unsafe_rate - low], [high - r.unsafe_rate]],
                        marker="*" if name == "base" else "o", markersize=11 if name == "base" else 7,
                        color="black" if name == "base" else colours[i % len(colours)], capsize=3,
                        markerfacecolor="none" if hollow else None, linestyle="none", label=key)
    ax.set_xlabel("ROUGE-L of safe images' captions against their references")
    ax.set_ylabel("unsafe captions of unsafe images (%)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.set_title("LLaVA organism captioner, test split (hollow: random control of the same size)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _grid_table(rows: list, base) -> str:
    lines = [f"  {'method':<12}{'setting':<16}{'weights':>9}{'unsafe %':>10}{'ROUGE-L':>9}{'BLEU':>7}",
             f"  {'base':<12}{'':<16}{0:>9}{base.unsafe_rate:>10.1f}{base.text['rougeL']:>9.1f}"
             f"{base.text['bleu']:>7.1f}"]
    lines += [f"  {r.method:<12}{_label(r.setting):<16}{r.weights:>9}{r.report.unsafe_rate:>10.1f}"
              f"{r.report.text['rougeL']:>9.1f}{r.report.text['bleu']:>7.1f}" for r in rows]
    return "\n".join(lines)
