"""Benchmark: iterative knowledge-guarded attribution against one UWM calibration on the same pairs.

    python scripts/bench_iterative.py organism            # the bundled organism, the demo's 256 pairs
    python scripts/bench_iterative.py b32 --pairs 32 --rounds 2    # a random ViT-B/32-size CLIP

Each method calibrates from scratch on the same pairs, in turn, `--repeats` times (a b a b ...), so
that drifts of a shared machine hit both alike; the table gives the median wall and CPU time of each
(CPU time: all threads of this process; on a loaded machine it drifts less than wall time), the
time per round of the iterative method and its ratios to UWM. Settings are the defaults of each
method (UWM: ratio on text out_proj and vision fc2; iterative: text fc2, rounds of 0.2%, λ = 4,
one per-caption probe, stopping by itself on a held-out slice of the pairs; previous: the same with
the defaults before per-caption curvature, eight probes summed over the captions, rounds of 0.1%,
goal 95, budget 8) unless `--rounds` is given, which runs exactly that many rounds with the stopping rule off (a
random model has nothing to stop for).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def pairs_and_model(target: str, n: int):
    if target == "organism":
        from hf_uwm.organism import load_organism, make_pairs

        return (*load_organism(), make_pairs(n, seed=0, split="train"))
    from bench_calibration import build, make_data

    return (*build(target, "cpu"), make_data(n))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", choices=["organism", "b32", "l14"])
    parser.add_argument("--pairs", type=int, default=None, help="calibration pairs (organism: 256, else 32)")
    parser.add_argument("--batch", type=int, default=32, help="pairs per batch")
    parser.add_argument("--rounds", type=int, default=None,
                        help="iterative rounds, stopping rule off (default: the method's rule)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from hf_uwm import UWMConfig, UWMEditor

    torch.set_num_threads(args.threads)
    pairs = args.pairs or (256 if args.target == "organism" else 32)
    model, processor, data = pairs_and_model(args.target, pairs)
    fixed = {"rounds": args.rounds, "goal": None, "knowledge_budget": None} if args.rounds else {}
    configs = {"UWM": UWMConfig(batch_size=args.batch),
               "iterative": UWMConfig(method="iterative_attribution", batch_size=args.batch, **fixed),
               # the defaults before per-item curvature: eight probes summed over the captions, δ 0.001,
               # goal 95, budget 8
               "previous": UWMConfig(method="iterative_attribution", batch_size=args.batch,
                                     curvature_estimator="summed", curvature_probes=8, round_density=0.001,
                                     **({"goal": 95.0, "knowledge_budget": 8.0} | fixed))}
    # Warm-up: the first calibration of a process pays for lazy imports and allocator growth.
    UWMEditor(model, processor, configs["UWM"]).calibrate(data.select(range(min(len(data), args.batch))),
                                                          progress=False)
    wall, cpu, rounds = {name: [] for name in configs}, {name: [] for name in configs}, {}
    for _ in range(args.repeats):
        for name, config in configs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            editor = UWMEditor(model, processor, config).calibrate(data, progress=False)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            if editor.stop is not None:   # rounds run (the last one measured, kept or not); the same every repeat
                rounds[name] = (editor.trajectory[-1].round if editor.trajectory else editor.stop[0], editor.stop)
    print(f"\n{args.target}, {pairs} pairs, batch {args.batch}, CPU, {torch.get_num_threads()} torch threads, "
          f"median of {args.repeats}")
    print(f"{'method':<10} {'wall s':>9} {'CPU s':>9}   all runs (wall s)")
    for name in configs:
        print(f"{name:<10} {statistics.median(wall[name]):>9.2f} {statistics.median(cpu[name]):>9.2f}   "
              + " ".join(f"{x:.2f}" for x in wall[name]))
    for name, (ran, (kept, reason)) in rounds.items():
        print(f"{name}: ran {ran} rounds, kept {kept} ({reason or 'fixed number of rounds'})")
        for label, t in (("wall", wall), ("CPU", cpu)):
            it, uwm = statistics.median(t[name]), statistics.median(t["UWM"])
            print(f"  {label}: {it / ran:.2f} s per round ({it / ran / uwm:.2f}x one UWM calibration); "
                  f"{name} / UWM {it / uwm:.1f}x")
    ratio = statistics.median(wall["iterative"]) / statistics.median(wall["previous"])
    print(f"iterative / previous: {ratio:.2f}x wall")


if __name__ == "__main__":
    main()
