"""One-command speed check of UWM calibration where users run it: a GPU (the CPU works too).

Random-weight CLIPs of ViT-L/14 and ViT-B/32 size (both towers, default targets) are built from
configs: no weights, no network, no `datasets`, no PIL in the timed part. Inputs are pre-made random
tensors on the device (pixel values; token ids padded to one length, with an attention mask; with
--inputs-on cpu they wait on the CPU and each batch is copied over), given to `calibrate` as
`hf_uwm.data.PreprocessedPairs`. For every size, number of pairs and precision
(bf16 = the model loaded in bfloat16; fp32 with TF32 matmuls on a GPU) it measures:

  plain       a forward of the targeted towers over the same batches, no hooks
  calibrate   UWMEditor.calibrate (fingerprint, statistics, selection, copies to the CPU)
  fixed       its fixed costs alone: fingerprint, selection (on the device), copies to the CPU
  literal     φ per item and per weight materialised (benchmarks/bench_calibration.py), ≤ --literal-pairs
  iterative   one round of method="iterative_attribution", if this hf_uwm has it (after every case)

Each phase runs once as warm-up on two batches (excluded), then --repeats times; the device is
synchronised around each run and the median is kept. Peak GPU memory is reset before each run and
reported as the model's weights plus what the run allocated beyond what it started with, so the
pre-made inputs (which a real run streams batch by batch) do not count. Phases are budgeted against
--budget seconds for the whole command: a phase whose estimated time would overrun is skipped and
the table says so. One JSON (--out) and one table are written.

    python scripts/gpu_check.py --out gpu_check.json         # on a GPU: the full check (≤ 5 min)
    python scripts/gpu_check.py --device cpu --tiny          # smoke test (seconds)
    python scripts/gpu_check.py --device cpu --sizes b32 --pairs 32 --dtypes fp32 --budget 600
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import runpy
import statistics
import time
from pathlib import Path

import torch

# The model sizes and the literal φ of the calibration benchmark (benchmarks/ is not a package).
BENCH = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "bench_calibration.py"))
literal = BENCH["literal"]
SIZES = {**BENCH["SIZES"], "tiny": dict(text=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4),
                               vision=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8),
                               projection_dim=16)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TEXT_LENGTH = 40          # padded caption length; safe captions use 10-20 tokens, unsafe ones 8 more
# Leads for the plan printed before the run (dense matmul rates an H100/H200 reaches on a ViT):
# the budget itself uses the rates measured during the run.
PLAN_TFLOPS = {"bf16": 400.0, "fp32": 150.0}
# Rough cost of a phase against the plain forward, to budget it before it was ever measured.
GUESS_VS_PLAIN = {"plain": 1.0, "calibrate": 1.5, "literal": 6.0, "iterative": 4.0}
TARGETS = {"calibrate_vs_plain": {"bf16": 1.10, "fp32": 1.05}, "peak_memory_vs_plain": 1.5,
           "literal_vs_calibrate": 5.0}


# --- models and inputs -------------------------------------------------------------------------
def build(size: str, device: str):
    from transformers import CLIPConfig, CLIPModel

    spec = SIZES[size]
    torch.manual_seed(0)
    max_positions = 77 if size != "tiny" else TEXT_LENGTH
    config = CLIPConfig(text_config={**spec["text"], "vocab_size": 49408, "max_position_embeddings": max_positions},
                        vision_config=spec["vision"], projection_dim=spec["projection_dim"])
    return CLIPModel(config).to(device).eval()


def make_pairs(model, n: int, device: str, dtype: torch.dtype, seed: int = 0):
    """PreprocessedPairs of random pixels and random captions (BOS, words, EOS, padding)."""
    from hf_uwm.data import PreprocessedPairs

    generator = torch.Generator(device=device).manual_seed(seed)
    vision = model.config.vision_config
    text = model.config.text_config

    def pixels():
        shape = (n, 3, vision.image_size, vision.image_size)
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def captions(lengths):
        ids = torch.randint(0, text.vocab_size - 2, (n, TEXT_LENGTH), generator=generator, device=device)
        positions = torch.arange(TEXT_LENGTH, device=device)
        mask = (positions < lengths[:, None]).long()
        ids[:, 0] = text.vocab_size - 2                                  # BOS
        ids[positions == lengths[:, None] - 1] = text.vocab_size - 1      # EOS
        ids[mask == 0] = text.vocab_size - 1                              # CLIP pads with EOS
        return {"input_ids": ids, "attention_mask": mask}

    short = torch.randint(10, 21, (n,), generator=generator, device=device)
    safe = {"vision": {"pixel_values": pixels()}, "text": captions(short)}
    unsafe = {"vision": {"pixel_values": pixels()}, "text": captions(short + 8)}
    return PreprocessedPairs(safe, unsafe)


def input_bytes(pairs) -> int:
    return sum(t.numel() * t.element_size() for side in (pairs.safe, pairs.unsafe)
               for inputs in side.values() for t in inputs.values())


def forward_flops(model, n_pairs: int) -> float:
    """Matmul FLOPs of one forward of both towers over 2·n_pairs items (attention included)."""
    def tower(config, tokens, patch_macs=0):
        d, m, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
        return 2 * (tokens * layers * (4 * d * d + 2 * d * m + 2 * tokens * d) + patch_macs)

    vision = model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    per_image = tower(vision, patches + 1, patches * 3 * vision.patch_size ** 2 * vision.hidden_size)
    return 2 * n_pairs * (per_image + tower(model.config.text_config, TEXT_LENGTH))


# --- the phases --------------------------------------------------------------------------------
def tower_batches(editor, pairs, batch: int):
    """(tower, inputs of [safe; unsafe] items) per batch, moved to the model's device as calibrate does."""
    for tower in editor.towers:
        for start in range(0, len(pairs), batch):
            yield tower, editor.family.to_device(pairs[start:start + batch].inputs(tower))


def plain(editor, pairs, batch):
    with torch.no_grad():
        for tower, inputs in tower_batches(editor, pairs, batch):
            editor.family.run_tower(tower, inputs)


def calibrate(editor, pairs, batch):
    editor.calibrate(pairs, progress=False)
    return editor


def literal_scores(editor, pairs, batch, dtype=torch.float32):
    return literal(editor, tower_batches(editor, pairs, batch), dtype=dtype)


def precision_probe(model, pairs, batch) -> float:
    """calibrate's scores against the literal formula in float64 on the same activations (one batch):
    shows whether the statistics stay float32-or-better (e.g. not TF32) on this machine."""
    from hf_uwm import UWMConfig, UWMEditor

    pairs = pairs[:batch]
    editor = UWMEditor(model, None, UWMConfig(batch_size=batch)).calibrate(pairs, progress=False)
    return literal_agreement(editor, literal_scores(editor, pairs, batch, torch.float64), len(pairs))


def literal_agreement(editor, sums, n_pairs) -> float:
    """max over layers of max|literal − calibrate| / max|calibrate| (the literal scores get /N and the prior)."""
    worst = 0.0
    for tower in editor.towers:
        for name, layer in editor.layers[tower].items():
            expected = sums[name] / n_pairs
            if editor.config.prior(tower):
                expected = expected * layer.weight.detach().abs().double().cpu()
            got = editor.scores[name]
            worst = max(worst, float((expected - got).abs().max() / got.abs().max()))
    return worst


class Clock:
    """Wall time and peak device memory of one run; the device is synchronised at both ends.

    Peak memory = the model's weights + the most the run allocated beyond what was allocated when
    it started, so the pre-made inputs and other models held on the device do not count.
    """

    def __init__(self, device: str, weight_bytes: int):
        self.cuda, self.weight_bytes = device.startswith("cuda"), weight_bytes

    def run(self, fn):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        out = fn()
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() - before + self.weight_bytes) / 2**30 if self.cuda else None
        return seconds, peak, out


class Budget:
    def __init__(self, seconds: float):
        self.total, self.start = seconds, time.perf_counter()

    @property
    def left(self) -> float:
        return self.total - (time.perf_counter() - self.start)


def measure(fn, warm_fn, clock, budget, repeats, n_pairs, n_warm, own=None, guess=None):
    """Warm up, then time `repeats` runs, unless the estimated time overruns the budget.

    own: seconds per pair of this phase measured at fewer pairs; guess: one from the plain forward's.
    Before the warm-up, own or guess decides; after it, own or the warm-up's own rate.
    """
    try:
        def over(seconds):
            return {"skipped": f"would take ~{seconds:.0f} s; {max(budget.left, 0):.0f} s of the budget left"}

        first = own if own is not None else guess
        if budget.left <= 0 or (first is not None and first * (n_warm + repeats * n_pairs) > budget.left):
            return over(0 if first is None else first * (n_warm + repeats * n_pairs))
        warm_seconds, _, _ = clock.run(warm_fn)
        estimate = repeats * n_pairs * (own if own is not None else warm_seconds / n_warm)
        if estimate > budget.left:
            return over(estimate)
        runs, peaks, out = [], [], None
        for _ in range(repeats):
            seconds, peak, out = clock.run(fn)
            runs.append(seconds)
            peaks.append(peak)
            gc.collect()
        result = {"seconds": statistics.median(runs), "runs": runs,
                  "peak_gib": None if peaks[0] is None else max(peaks)}
        return result | ({"_out": out} if out is not None else {})
    except Exception as error:  # noqa: BLE001 - one failed phase must not cost the others their numbers
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"error": f"{type(error).__name__}: {error}"[:500]}


def iterative_config(batch):
    from hf_uwm import UWMConfig

    try:
        # one round on every pair: a stopping rule needs a held-out slice that a few timed pairs cannot spare
        return UWMConfig(method="iterative_attribution", rounds=1, goal=None, knowledge_budget=None, holdout=0.0,
                         batch_size=batch), None
    except (TypeError, ValueError) as error:
        return None, f"not in this hf_uwm ({type(error).__name__}: {error})"[:300]


def fixed_costs(editor, clock, repeats):
    """Median seconds of the fingerprint, selection on the device, and the copies back to the CPU."""
    from hf_uwm.delta import fingerprint

    device = editor.family.device
    cpu_scores = editor.scores
    editor.scores = {n: s.to(device) for n, s in cpu_scores.items()}
    try:
        phases = {"fingerprint": lambda: fingerprint(editor.target_layers),
                  "selection": editor.select,
                  "scores_to_cpu": lambda: {n: s.cpu() for n, s in editor.scores.items()}}
        selected = editor.select()
        phases["indices_to_cpu"] = lambda: {n: i.cpu() for n, i in selected.items()}
        out = {}
        for name, fn in phases.items():
            clock.run(fn)
            out[name] = statistics.median(clock.run(fn)[0] for _ in range(repeats))
        return out
    finally:
        editor.scores = cpu_scores


def check_case(model, size, n_pairs, dtype_name, args, budget, rates, case=None):
    """The phases of one (size, pairs, precision) case; given its `case`, the iterative method's only
    (a second pass, after every case's main phases)."""
    from hf_uwm import UWMConfig, UWMEditor

    device, batch, repeats = args.device, args.batch, args.repeats
    pairs = make_pairs(model, n_pairs, device if args.inputs_on == "device" else "cpu", DTYPES[dtype_name])
    warm = pairs[:min(n_pairs, 2 * batch)]
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    clock = Clock(device, weight_bytes)
    second_pass = case is not None
    case = case or {"size": size, "pairs": n_pairs, "dtype": dtype_name, "batch": batch,
                    "forward_tflop": forward_flops(model, n_pairs) / 1e12, "input_gib": input_bytes(pairs) / 2**30,
                    "weights_gib": weight_bytes / 2**30}
    base = UWMEditor(model, None, UWMConfig(batch_size=batch))

    def run(phase, fn, warm_fn):
        plain_rate = rates.get((size, dtype_name, "plain"))
        guess = None if plain_rate is None else plain_rate * GUESS_VS_PLAIN[phase]
        result = measure(fn, warm_fn, clock, budget, repeats, n_pairs, len(warm),
                         rates.get((size, dtype_name, phase)), guess)
        if "seconds" in result:
            rates[(size, dtype_name, phase)] = result["seconds"] / n_pairs
        case[phase] = {k: v for k, v in result.items() if k != "_out"}
        print(f"  {size} {n_pairs} {dtype_name} {phase}: {_short(case[phase])}", flush=True)
        return result.get("_out")

    if second_pass:
        config, why_not = iterative_config(batch)
        if config is None:
            case["iterative"] = {"skipped": why_not}
        else:
            iterative = UWMEditor(model, None, config)
            run("iterative", lambda: calibrate(iterative, pairs, batch), lambda: calibrate(iterative, warm, batch))
        return case
    run("plain", lambda: plain(base, pairs, batch), lambda: plain(base, warm, batch))
    if "seconds" in case["plain"]:
        case["plain"]["tflop_per_s"] = case["forward_tflop"] / case["plain"]["seconds"]
    editor = UWMEditor(model, None, UWMConfig(batch_size=batch))
    calibrated = run("calibrate", lambda: calibrate(editor, pairs, batch), lambda: calibrate(editor, warm, batch))
    if calibrated is not None:
        try:
            case["fixed"] = fixed_costs(calibrated, clock, repeats)
        except Exception as error:  # noqa: BLE001
            case["fixed"] = {"error": f"{type(error).__name__}: {error}"[:500]}
        print(f"  {size} {n_pairs} {dtype_name} fixed: {case['fixed']}", flush=True)
    if n_pairs <= args.literal_pairs:
        sums = run("literal", lambda: literal_scores(base, pairs, batch), lambda: literal_scores(base, warm, batch))
        if sums is not None and calibrated is not None:
            case["literal"]["max_rel_diff_vs_calibrate"] = literal_agreement(calibrated, sums, n_pairs)
        if sums is not None:
            try:
                case["literal"]["max_rel_diff_vs_float64_literal"] = precision_probe(model, pairs, batch)
            except Exception as error:  # noqa: BLE001
                case["literal"]["precision_probe_error"] = f"{type(error).__name__}: {error}"[:500]
        print(f"  {size} {n_pairs} {dtype_name} literal vs calibrate: "
              f"{ {k: v for k, v in case['literal'].items() if k.startswith(('max_', 'precision'))} }", flush=True)
    else:
        case["literal"] = {"skipped": f"only at ≤ {args.literal_pairs} pairs"}
    case["iterative"] = {"skipped": f"only at ≤ {args.iterative_pairs} pairs"}    # until the second pass
    return case


def _short(result: dict) -> str:
    if "seconds" in result:
        peak = "" if result.get("peak_gib") is None else f", peak {result['peak_gib']:.2f} GiB"
        return f"{result['seconds']:.3f} s{peak} (runs {', '.join(f'{r:.3f}' for r in result['runs'])})"
    return result.get("skipped") or result.get("error", "?")


# --- report ------------------------------------------------------------------------------------
def ratios(case: dict) -> dict:
    def sec(phase):
        return case.get(phase, {}).get("seconds")

    def peak(phase):
        return case.get(phase, {}).get("peak_gib")

    out = {}
    if sec("plain") and sec("calibrate"):
        out["calibrate_vs_plain"] = sec("calibrate") / sec("plain")
    if peak("plain") and peak("calibrate"):
        out["peak_memory_vs_plain"] = peak("calibrate") / peak("plain")
    if sec("literal") and sec("calibrate"):
        out["literal_vs_calibrate"] = sec("literal") / sec("calibrate")
    if sec("iterative") and sec("plain"):
        out["iterative_vs_plain"] = sec("iterative") / sec("plain")
    return out


def verdict(name, value, dtype):
    target = TARGETS[name][dtype] if name == "calibrate_vs_plain" else TARGETS[name]
    ok = value >= target if name == "literal_vs_calibrate" else value <= target
    return f"{value:.2f}x {'ok' if ok else 'MISS'}"


def table(report: dict) -> str:
    head = ["size", "pairs", "dtype", "plain s", "calibrate s", "calib/plain", "peak GiB plain/calib",
            "peak ratio", "literal s", "literal/calib", "fingerprint s", "select s", "to CPU s", "iterative s"]
    rows = []
    for case in report["cases"]:
        r, fixed = ratios(case), case.get("fixed", {})

        def cell(phase):
            result = case.get(phase, {})
            if "seconds" in result:
                return f"{result['seconds']:.3f}"
            return "skipped" if "skipped" in result else ("error" if "error" in result else "-")

        peaks = [case.get(p, {}).get("peak_gib") for p in ("plain", "calibrate")]
        rows.append([
            case["size"], str(case["pairs"]), case["dtype"], cell("plain"), cell("calibrate"),
            verdict("calibrate_vs_plain", r["calibrate_vs_plain"], case["dtype"]) if "calibrate_vs_plain" in r else "-",
            "/".join("-" if p is None else f"{p:.2f}" for p in peaks),
            verdict("peak_memory_vs_plain", r["peak_memory_vs_plain"], None) if "peak_memory_vs_plain" in r else "-",
            cell("literal"),
            verdict("literal_vs_calibrate", r["literal_vs_calibrate"], None) if "literal_vs_calibrate" in r else "-",
            *(f"{fixed[k]:.3f}" if isinstance(fixed.get(k), float) else "-"
              for k in ("fingerprint", "selection", "scores_to_cpu")),
            cell("iterative") + (f" ({r['iterative_vs_plain']:.2f}x plain)" if "iterative_vs_plain" in r else ""),
        ])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    notes = [f"{c['size']} {c['pairs']} {c['dtype']} {p}: {c[p].get('skipped') or c[p].get('error')}"
             for c in report["cases"] for p in ("plain", "calibrate", "literal", "iterative", "fixed")
             if isinstance(c.get(p), dict) and ("skipped" in c[p] or "error" in c[p])]
    targets = ("targets: calibrate ≤ 1.10x plain (bf16), ≤ 1.05x (fp32/TF32); peak memory ≤ 1.5x plain; "
               "literal ≥ 5x calibrate")
    return "\n".join([report["machine"], *lines, targets, *notes])


def save(report: dict, out: Path, device: str):
    for case in report["cases"]:
        case["ratios"] = ratios(case)
    out.write_text(json.dumps(report, indent=1, default=str))
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def plan(model, pair_counts, dtypes) -> dict:
    """Each case's forward FLOPs and its time at rates an H100/H200 reaches (printed before the run)."""
    out = {}
    for n in pair_counts:
        for dtype in dtypes:
            tflop = forward_flops(model, n) / 1e12
            out[f"{n} {dtype}"] = (f"{tflop:.1f} TFLOP per forward: ~{tflop / PLAN_TFLOPS[dtype]:.2f} s on an "
                                   f"H100/H200 at ~{PLAN_TFLOPS[dtype]:.0f} TFLOP/s")
    return out


def machine(device: str) -> str:
    import transformers

    where = (torch.cuda.get_device_name() if device.startswith("cuda")
             else f"CPU, {torch.get_num_threads()} torch threads")
    return f"{where}; torch {torch.__version__}, transformers {transformers.__version__}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny CLIP, few pairs: a smoke test of this script")
    parser.add_argument("--sizes", help=f"comma-separated, of {sorted(SIZES)} (default l14,b32; tiny with --tiny)")
    parser.add_argument("--pairs", help="comma-separated numbers of pairs (default 1024,8192; 8 with --tiny)")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma-separated, of bf16, fp32")
    parser.add_argument("--batch", type=int, help="pairs per batch (default 128; 4 with --tiny)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per phase (median kept)")
    parser.add_argument("--budget", type=float, default=290.0, help="seconds for the whole command")
    parser.add_argument("--literal-pairs", type=int, default=1024, help="run the literal formula up to this size")
    parser.add_argument("--iterative-pairs", type=int, default=1024, help="run the iterative method up to this size")
    parser.add_argument("--inputs-on", choices=("device", "cpu"), default="device",
                        help="where the pre-made inputs wait: cpu times each batch's copy to the device too")
    parser.add_argument("--out", default="gpu_check.json", help="where the JSON goes")
    args = parser.parse_args(argv)
    for name, default, tiny in (("sizes", "l14,b32", "tiny"), ("pairs", "1024,8192", "8"), ("batch", 128, 4)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else default)
    sizes, dtypes = args.sizes.split(","), args.dtypes.split(",")
    pair_counts = sorted(int(n) for n in args.pairs.split(","))
    unknown = [s for s in sizes if s not in SIZES] + [d for d in dtypes if d not in DTYPES]
    if unknown or args.repeats < 3:
        parser.error(f"unknown sizes/dtypes {unknown}" if unknown else "--repeats must be at least 3 (medians of 3)")
    budget = Budget(args.budget)
    if args.device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")            # TF32 matmuls in fp32
    report = {"machine": machine(args.device), "device": args.device, "args": vars(args), "targets": TARGETS,
              "float32_matmul_precision": torch.get_float32_matmul_precision(), "cases": [],
              "memory_note": "peak_gib: the model's weights + max_memory_allocated during the run beyond what was "
                             "allocated at its start (pre-made inputs and other models excluded)"}
    models = {}
    print(report["machine"], flush=True)
    for size in sizes:
        fp32 = build(size, args.device)
        models[size] = {"fp32": fp32} | ({"bf16": copy.deepcopy(fp32).to(torch.bfloat16)} if "bf16" in dtypes else {})
        report.setdefault("plan", {})[size] = plan(fp32, pair_counts, dtypes)
        report["attention"] = fp32.config._attn_implementation
    print(json.dumps(report["plan"], indent=1), flush=True)
    rates, out = {}, Path(args.out)
    # Small cases first, so that the budget, if short, cuts the largest ones; the iterative method last.
    for n_pairs, size, dtype in [(n, s, d) for n in pair_counts for s in sizes for d in dtypes]:
        report["cases"].append(check_case(models[size][dtype], size, n_pairs, dtype, args, budget, rates))
        save(report, out, args.device)
    for case in report["cases"]:
        if case["pairs"] <= args.iterative_pairs:
            check_case(models[case["size"]][case["dtype"]], case["size"], case["pairs"], case["dtype"], args,
                       budget, rates, case)
            save(report, out, args.device)
    report["seconds"] = args.budget - budget.left
    out.write_text(json.dumps(report, indent=1, default=str))
    print(table(report))
    print(f"{report['seconds']:.0f} s in all; JSON: {out}")
    return report


if __name__ == "__main__":
    main()
