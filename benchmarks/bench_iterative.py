"""Benchmark: iterative knowledge-guarded attribution against one UWM calibration on the same pairs.

    python benchmarks/bench_iterative.py organism            # the bundled organism, the demo's 256 pairs
    python benchmarks/bench_iterative.py b32 --pairs 32 --rounds 14    # a random ViT-B/32-size CLIP

Each method calibrates from scratch on the same pairs, each run in a fresh process (after a warm-up
calibration on one batch) so that its peak RSS is its own, the methods taking turns `--repeats`
times (a b c a b c ...) so that drifts of a shared machine hit all alike; the table gives the median
wall and CPU time of each (CPU time: all threads of the process; on a loaded machine it drifts less
than wall time), the largest peak RSS, the time per round of the iterative methods and their ratios
to UWM. Settings are the defaults of each method (UWM: ratio on text out_proj and vision fc2;
iterative: text fc2, rounds of 0.2%, λ = 4, one per-caption probe, stopping by itself on a held-out
slice of the pairs; previous: the same with the defaults before per-caption curvature, eight probes
summed over the captions, rounds of 0.1%, goal 95, budget 8) unless `--rounds` is given, which runs
exactly that many rounds with the stopping rule off (a random model has nothing to stop for; the
organisms' rule stopped after 10–14 rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def pairs_and_model(target: str, n: int):
    if target == "organism":
        from hf_uwm.organism import load_organism, make_pairs

        return (*load_organism(), make_pairs(n, seed=0, split="train"))
    from bench_calibration import build, make_data

    return (*build(target, "cpu"), make_data(n))


METHODS = ("UWM", "iterative", "previous")


def config(name: str, args):
    from hf_uwm import UWMConfig

    fixed = {"rounds": args.rounds, "goal": None, "knowledge_budget": None} if args.rounds else {}
    if name == "UWM":
        return UWMConfig(batch_size=args.batch)
    if name == "iterative":
        return UWMConfig(method="iterative_attribution", batch_size=args.batch, **fixed)
    # the defaults before per-item curvature: eight probes summed over the captions, δ 0.001, goal 95, budget 8
    return UWMConfig(method="iterative_attribution", batch_size=args.batch, curvature_estimator="summed",
                     curvature_probes=8, round_density=0.001, **({"goal": 95.0, "knowledge_budget": 8.0} | fixed))


def time_held_out_measures() -> list:
    """Wall seconds of every call that measures the held-out slice (its setup included), appended
    to the list returned, for the rest of this process."""
    from hf_uwm.methods.iterative import IterativeAttribution
    from hf_uwm.methods.rounds import IterativeEdit

    seconds = []
    for cls, name in ((IterativeAttribution, "start_measuring"), (IterativeEdit, "_step")):
        def timed(self, *args, _inner=getattr(cls, name), **kwargs):
            start = time.perf_counter()
            try:
                return _inner(self, *args, **kwargs)
            finally:
                seconds.append(time.perf_counter() - start)
        setattr(cls, name, timed)
    return seconds


def run_one(args):
    """One calibration of `args.method` in this process; prints its JSON result."""
    from bench_calibration import peak_gib

    from hf_uwm import UWMConfig, UWMEditor

    torch.set_num_threads(args.threads)
    model, processor, data = pairs_and_model(args.target, args.pairs)
    # Warm-up: the first calibration of a process pays for lazy imports and allocator growth.
    UWMEditor(model, processor, UWMConfig(batch_size=args.batch)).calibrate(
        data.select(range(min(len(data), args.batch))), progress=False)
    measuring = time_held_out_measures()
    start, start_cpu = time.perf_counter(), time.process_time()
    editor = UWMEditor(model, processor, config(args.method, args)).calibrate(data, progress=False)
    result = {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - start_cpu,
              "peak_gib": peak_gib("cpu"), "measure_seconds": sum(measuring)}
    if editor.stop is not None:   # rounds run (the last one measured, kept or not); the same every repeat
        result |= {"ran": editor.trajectory[-1].round if editor.trajectory else editor.stop[0],
                   "kept": editor.stop[0], "reason": editor.stop[1]}
    print(json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", choices=["organism", "b32", "l14"])
    parser.add_argument("--pairs", type=int, default=None, help="calibration pairs (organism: 256, else 32)")
    parser.add_argument("--batch", type=int, default=32, help="pairs per batch")
    parser.add_argument("--rounds", type=int, default=None,
                        help="iterative rounds, stopping rule off (default: the method's rule)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.pairs = args.pairs or (256 if args.target == "organism" else 32)
    if args.method:
        return run_one(args)

    from bench_calibration import interleaved

    argv = [args.target, f"--pairs={args.pairs}", f"--batch={args.batch}", f"--threads={args.threads}"]
    runs = interleaved(__file__, "--method", list(METHODS), argv + ([f"--rounds={args.rounds}"] if args.rounds else []),
                       args.repeats)
    median = {label: {name: statistics.median(r[key] for r in runs[name]) for name in METHODS}
              for label, key in (("wall", "seconds"), ("CPU", "cpu_seconds"))}
    print(f"\n{args.target}, {args.pairs} pairs, batch {args.batch}, CPU, {args.threads} torch threads, "
          f"median of {args.repeats}, each run in a fresh process")
    print(f"{'method':<10} {'wall s':>9} {'CPU s':>9} {'peak GiB':>9}   all runs (wall s)")
    for name in METHODS:
        peak = max(r["peak_gib"] for r in runs[name])
        print(f"{name:<10} {median['wall'][name]:>9.2f} {median['CPU'][name]:>9.2f} {peak:>9.2f}   "
              + " ".join(f"{r['seconds']:.2f}" for r in runs[name]))
    for name in METHODS[1:]:
        last = runs[name][-1]
        print(f"{name}: ran {last['ran']} rounds, kept {last['kept']} ({last['reason'] or 'fixed number of rounds'})")
        for label, t in median.items():
            it, uwm = t[name], t["UWM"]
            print(f"  {label}: {it / last['ran']:.2f} s per round ({it / last['ran'] / uwm:.2f}x one UWM calibration); "
                  f"{name} / UWM {it / uwm:.2f}x")
        measure = statistics.median(r["measure_seconds"] for r in runs[name]) / (last["ran"] + 1)
        print(f"  held-out measures: {measure:.3f} s per round (setup shared out; wall), "
              f"{measure / (median['wall'][name] / last['ran']):.2f} of a round")
    print(f"iterative / previous: {median['wall']['iterative'] / median['wall']['previous']:.2f}x wall")


if __name__ == "__main__":
    main()
