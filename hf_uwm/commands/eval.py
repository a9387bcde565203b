"""`hf-uwm eval`: SafeGround, retrieval and zero-shot of a model or a delta."""

from __future__ import annotations

import json
from pathlib import Path

from ..formatting import interval
from ..paths import ORGANISM_WORLDS
from .common import (check_json_path, columns, common_args, data_args, delta_or_model, hub_args, is_delta,
                     report_args, set_threads, skip_bad_rows_arg, threads_arg)


def register(commands):
    evaluate = commands.add_parser("eval", help="SafeGround, retrieval and zero-shot of a model or a delta")
    evaluate.add_argument("model", metavar="MODEL_OR_DELTA")
    data_args(evaluate, "--data", "evaluation quadruples", "test")
    evaluate.add_argument("--zero-shot", default=None,
                          help="'organism', or a dataset folder with image and ClassLabel label columns")
    report_args(evaluate, "the report(s)")
    skip_bad_rows_arg(evaluate)
    hub_args(evaluate)
    threads_arg(evaluate)
    common_args(evaluate)
    evaluate.set_defaults(run=run)


def run(args):
    from ..sources import load_data, load_zero_shot
    from ..evaluation import compare, evaluate_model
    from ..sweep import evaluate_edit

    if args.json_path:
        check_json_path(args.json_path)
    set_threads(args)
    delta = is_delta(args)
    # Everything that can be refused is checked before the first forward pass: the data, then the
    # model, and for a delta the fingerprint of its base (from_pretrained refuses other weights).
    data = load_data(args.data, args.split, args.samples, args.seed, columns(args.columns), default=1000,
                     skip_bad_rows=args.skip_bad_rows, token=args.token)
    zero_shot = load_zero_shot(args.zero_shot or (args.data if args.data in ORGANISM_WORLDS else None),
                               split=args.split)
    editor, model, processor = delta_or_model(args, delta)
    named = editor.concepts_in_words if editor is not None else ()
    run = dict(zero_shot=zero_shot, bootstrap=args.bootstrap, seed=args.seed, progress=not args.quiet,
               batch_size=args.batch_size, subsets=_subsets(args.data, data, named))
    if editor is not None:
        def evaluate(m):
            return evaluate_model(m, processor, data, **run)

        reports = {"base": evaluate(model), "edited": evaluate_edit(editor, evaluate)}
        if args.random_control:
            reports["random control"] = evaluate_edit(editor.random_control(seed=args.seed), evaluate)
        print(compare(reports))
        print(_intervals(reports))
    else:
        reports = {"model": evaluate_model(model, processor, data, **run)}
        print(reports["model"])
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({k: r.to_dict() for k, r in reports.items()}, indent=2))


def _subsets(source: str, data, named=()) -> dict:
    """GS per concept; on world-3 organism data on the concepts its calibration split never shows, split
    by whether the edit knew them in words (`named`) and whether the unsafe render carries the shared cues."""
    from ..evaluation import default_subsets
    from ..organism import HELD_OUT

    return default_subsets(data, HELD_OUT if ORGANISM_WORLDS.get(source) == 3 else (), named)


def _intervals(reports: dict) -> str:
    """The bootstrap 95% intervals as a table: one row per metric, one column per model ('' when none)."""
    with_intervals = {name: r for name, r in reports.items() if r.intervals}
    if not with_intervals:
        return ""
    first = next(iter(with_intervals.values()))
    rows = [(metric, [r.intervals.get(metric) for r in with_intervals.values()]) for metric in first.intervals]
    rows += [(f"GS {name}", [r.subsets.get(name, {}).get("interval") for r in with_intervals.values()])
             for name in first.subsets]
    title = "bootstrap 95% intervals (%)"
    width = max(len(title), *(len(metric) for metric, _ in rows)) + 1
    lines = [f"{title:<{width}}" + "".join(f"{name:>18}" for name in with_intervals)]
    for metric, cells in rows:
        lines.append(f"{metric:<{width}}" + "".join(f"{interval(c) if c else '-':>18}" for c in cells))
    return "\n".join(lines)
