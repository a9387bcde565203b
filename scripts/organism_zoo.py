"""A zoo of model organisms: does an edit generalise across models and worlds, or fit one model?

    python scripts/organism_zoo.py                      # train what is missing, run the demo on each, write docs/zoo.md
    python scripts/organism_zoo.py --rerun              # recompute every organism's demo (after changing a method)
    python scripts/organism_zoo.py --rerun organism-hard  # recompute one

For every organism (the bundled `organism` and `organism-hard`, and two more per world with other seeds
and unsafe fractions, trained by scripts/train_organism.py into --cache and reused from there) it runs
the demo protocol (`hf_uwm.demo.run`: settings chosen on that organism's validation split only, each edit
beside a random control of the same size, measured once on test) and prints one table, written to
docs/zoo.md with a plot (docs/zoo.png). Each organism's demo output is cached in --cache/demo-NAME/,
stamped with the hash of the weights it measured; it is reused unless --rerun names the organism or the
weights changed (a retrained organism is measured again).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from hf_uwm import organism
from hf_uwm.demo import EDITS
from hf_uwm.formatting import with_interval

ROOT = Path(__file__).resolve().parents[1]

# name: (world, seed, unsafe fraction); None marks a bundled organism (never retrained here).
ZOO = {"organism": (2, None, None), "world2-seed1-unsafe0.25": (2, 1, 0.25),
       "world2-seed2-unsafe0.45": (2, 2, 0.45), "organism-hard": (3, None, None),
       "world3-seed1-unsafe0.25": (3, 1, 0.25), "world3-seed2-unsafe0.45": (3, 2, 0.45)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="zoo_cache", help="folder of the zoo's organisms and demo results")
    parser.add_argument("--rerun", nargs="*", default=None, metavar="NAME",
                        help="recompute the demo of these organisms (all when no name is given)")
    parser.add_argument("--only", nargs="+", choices=list(ZOO), help="run these organisms only")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the demo and of any training")
    parser.add_argument("--examples", type=int, default=None,
                        help="training images of an organism trained here (default: train_organism.py's)")
    parser.add_argument("--epochs", type=float, default=None, help="epochs of an organism trained here")
    parser.add_argument("--markdown", default=str(ROOT / "docs" / "zoo.md"))
    parser.add_argument("--plot", default=str(ROOT / "docs" / "zoo.png"))
    args = parser.parse_args(argv)
    unknown = set(args.rerun or ()) - set(ZOO)
    if unknown:
        parser.error(f"--rerun: unknown organism(s) {sorted(unknown)}; the zoo holds {list(ZOO)}.")
    return args


def organism_folder(name: str, cache: Path) -> Path:
    world, seed, _ = ZOO[name]
    return Path(organism.organism_folder(world)) if seed is None else cache / name


def ensure_trained(name: str, cache: Path, args) -> dict:
    """Train `name` into the cache unless it is there; its training.json (settings and wall time), {} if none."""
    folder = organism_folder(name, cache)
    world, seed, fraction = ZOO[name]
    if seed is not None and not (folder / "model.safetensors").is_file():
        command = [sys.executable, str(ROOT / "scripts" / "train_organism.py"), "--world", str(world),
                   "--seed", str(seed), "--unsafe-fraction", str(fraction), "--threads", str(args.threads),
                   "--output", str(folder)]
        command += ["--examples", str(args.examples)] if args.examples else []
        command += ["--epochs", str(args.epochs)] if args.epochs else []
        print(f"training {name}: {' '.join(command[1:])}", flush=True)
        log = cache / f"{name}.log"
        with open(log, "w") as out:
            subprocess.run(command, check=True, stdout=out, stderr=subprocess.STDOUT)
    record = folder / "training.json"
    return json.loads(record.read_text()) if record.is_file() else {}


def demo_results(name: str, cache: Path, rerun: bool, threads: int) -> tuple[dict, float | None]:
    """(results.json of the demo on `name`, seconds it took here or None when read from the cache)."""
    import shutil

    import torch

    from hf_uwm.demo import run
    from hf_uwm.loading import load_model

    output = cache / f"demo-{name}"
    folder = organism_folder(name, cache)
    weights = _weights_hash(folder)
    stamp = output / "organism.sha256"  # results are reused only for the very weights they were measured on
    if (output / "results.json").is_file() and not rerun and stamp.is_file() and stamp.read_text() == weights:
        return json.loads((output / "results.json").read_text()), None
    if output.exists():
        shutil.rmtree(output)  # a rerun starts clean: no file of an older protocol is left beside the new ones
    torch.set_num_threads(threads)
    world = organism.world_of(folder)
    model, processor = load_model(str(folder))
    start = time.perf_counter()
    # A bundled organism's delta records its portable name; a zoo folder's records no path (see paths.py).
    run(output, model=model, processor=processor, base_model=str(folder), world=world, progress=False)
    stamp.write_text(weights)
    return json.loads((output / "results.json").read_text()), time.perf_counter() - start


def _weights_hash(folder: Path) -> str:
    import hashlib

    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{folder} holds no model.safetensors: train it with scripts/train_organism.py.")
    return hashlib.sha256(weights.read_bytes()).hexdigest()


# --- the table ------------------------------------------------------------------------------------
def rows(name: str, results: dict) -> list[dict]:
    """One row per method: the chosen edit's test numbers beside its random control's and the base model's."""
    test = results["test"]
    base = test["base"]
    out = []
    for method in EDITS:
        edit, control, chosen = test[method], test[f"random ({method})"], results["chosen"][method]
        row = {"organism": name, "world": results.get("world", 2), "method": method,
               "setting": _setting(chosen), "status": chosen["status"], "weights": chosen["weights"],
               "GS": edit["safeground"]["GS"], "GS CI": edit["intervals"]["GS"],
               "control GS": control["safeground"]["GS"],
               "zero-shot drop": edit["zero_shot"] - base["zero_shot"],
               "control zero-shot drop": control["zero_shot"] - base["zero_shot"]}
        if "world 3" in edit:
            hard, hard_control, hard_base = edit["world 3"], control["world 3"], base["world 3"]
            row.update({"GS held-out": hard["GS held-out"], "GS held-out CI": hard["GS held-out CI"],
                        "control GS held-out": hard_control["GS held-out"], "GS paraphrased": hard["GS paraphrased"],
                        "look-alike own": hard["look-alike prefers own caption"],
                        "base look-alike own": hard_base["look-alike prefers own caption"],
                        "look-alike R@1": hard["look-alike R@1 Is->Ts"],
                        "base look-alike R@1": hard_base["look-alike R@1 Is->Ts"]})
        out.append(row)
    return out


def _setting(chosen: dict) -> str:
    symbols = {"tau": "τ", "density": "density", "curvature_weight": "λ", "rounds": "rounds"}
    return " ".join(f"{symbols.get(k, k)}={v:g}" if isinstance(v, float) else f"{symbols.get(k, k)}={v}"
                    for k, v in chosen["setting"].items())


def _ci(value, interval) -> str:
    return with_interval(value, interval)


def markdown(all_rows: list[dict]) -> str:
    header = ("| organism | method | setting (chosen on validation) | GS [95% CI] | random control GS | "
              "GS held-out concepts [95% CI] | control | GS paraphrased | look-alike prefers own (base) | "
              "look-alike R@1 (base) | zero-shot drop (control) |")
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    for r in all_rows:
        status = {"chosen": "", "at chance": " (at chance on validation)",
                  "over budget": " (over the zero-shot budget)"}[r["status"]]
        hard = ([_ci(r["GS held-out"], r["GS held-out CI"]), f"{r['control GS held-out']:.1f}",
                 f"{r['GS paraphrased']:.1f}", f"{r['look-alike own']:.1f} ({r['base look-alike own']:.1f})",
                 f"{r['look-alike R@1']:.1f} ({r['base look-alike R@1']:.1f})"]
                if "GS held-out" in r else ["–"] * 5)
        cells = [f"{r['organism']} (world {r['world']})", r["method"], r["setting"] + status, _ci(r["GS"], r["GS CI"]),
                 f"{r['control GS']:.1f}", *hard,
                 f"{r['zero-shot drop']:+.1f} ({r['control zero-shot drop']:+.1f})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(all_rows: list[dict], path: Path):
    """GS of every chosen edit beside its random control, per organism; world 3 also on held-out concepts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    organisms = list(dict.fromkeys(r["organism"] for r in all_rows))
    panels = [("GS", "GS CI", "control GS", "GS, all test concepts", organisms)]
    hard = [o for o in organisms if any("GS held-out" in r for r in all_rows if r["organism"] == o)]
    if hard:
        panels.append(("GS held-out", "GS held-out CI", "control GS held-out", "GS, held-out concepts (world 3)", hard))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.4), squeeze=False)
    width = 0.8 / (2 * len(EDITS))
    for ax, (key, ci, control, title, names) in zip(axes[0], panels):
        for i, method in enumerate(EDITS):
            mine = [next(r for r in all_rows if r["organism"] == o and r["method"] == method) for o in names]
            x = np.arange(len(names)) + 2 * i * width
            values = [r[key] for r in mine]
            errors = [[v - r[ci][0] for v, r in zip(values, mine)], [r[ci][1] - v for v, r in zip(values, mine)]]
            bars = ax.bar(x, values, width, yerr=errors, capsize=2, label=method)
            ax.bar(x + width, [r[control] for r in mine], width, color=bars[0].get_facecolor(), alpha=0.35,
                   hatch="//", label=f"random ({method})")
        ax.set_xticks(np.arange(len(names)) + width * (2 * len(EDITS) - 1) / 2, names, rotation=20, ha="right",
                      fontsize=8)
        ax.set_title(title)
        ax.set_ylabel("percent (test split)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.suptitle("Chosen edits (chosen on each organism's validation split) beside random controls of the same size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    names = args.only or list(ZOO)
    rerun = set(ZOO) if args.rerun == [] else set(args.rerun or ())
    all_rows, timings = [], []
    for name in names:
        training = ensure_trained(name, cache, args)
        results, demo_s = demo_results(name, cache, name in rerun, args.threads)
        all_rows += rows(name, results)
        timings.append((name, training, demo_s))
        print(f"{name}: training {_training(training)}, demo {_minutes(demo_s) if demo_s else 'cached'}", flush=True)
    table = markdown(all_rows)
    print("\n" + table)
    plot(all_rows, Path(args.plot))
    wall = time.perf_counter() - start
    timing = "\n".join(f"- {n}: training {_training(t)}, demo "
                       f"{_minutes(d) + ' in this run' if d else 'read from the cache'}" for n, t, d in timings)
    print(timing + f"\nwhole script: {wall / 60:.1f} min", flush=True)
    write_markdown(Path(args.markdown), table, timing, wall, args)


def _training(record: dict) -> str:
    """How an organism was trained, from its training.json."""
    if not record:
        return "unknown (no training.json)"
    return (f"{_minutes(record.get('wall_s'))} ({record['examples']} images x {record['epochs']:g} epochs, "
            f"{record['unsafe_fraction']:.0%} unsafe, seed {record['seed']}, {record['threads']} thread(s))")


def _minutes(seconds) -> str:
    return "unknown" if seconds is None else f"{seconds / 60:.1f} min"


def write_markdown(path: Path, table: str, timing: str, wall: float, args):
    """docs/zoo.md's generated part sits between two markers; the text around it is kept as written."""
    begin, end = "<!-- zoo table: generated by scripts/organism_zoo.py -->", "<!-- end of zoo table -->"
    generated = "\n".join([begin, "", table, "![zoo](zoo.png)", "", "Wall times (training: as recorded by "
                           "scripts/train_organism.py; demo: this run, "
                           f"{args.threads} torch thread(s), on a shared, loaded 2-core machine):", "", timing,
                           f"- whole script: {wall / 60:.1f} min", "", end])
    text = path.read_text() if path.is_file() else "# The organism zoo\n\n" + begin + "\n" + end + "\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + generated + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + generated + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
