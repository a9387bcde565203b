"""`hf-uwm sweep`: evaluate a grid of settings beside random controls; pick the best."""

from __future__ import annotations

import itertools
from pathlib import Path

from ..paths import ORGANISM_WORLDS
from .common import columns, common_args, overwrite_arg, positive
from .method_flags import add_method_args, check_method_flags, config_from_args, method_command, setting_flags

SWEEP_ORGANISM_SAMPLES = 300  # validation quadruples a sweep draws from the organism world


def register(commands):
    from ..methods import DEFAULT_METHOD

    sweep = method_command(commands, "sweep", "evaluate a grid of settings beside random controls; pick the best",
                           DEFAULT_METHOD)
    sweep.add_argument("--eval", required=True, dest="eval_data", help="validation quadruples (never the test set)")
    sweep.add_argument("--eval-split", default="validation", help="split of --eval (default validation; a single "
                                                                   "data file is its own split)")
    sweep.add_argument("--eval-samples", type=positive, default=None,
                       help=f"use this many validation quadruples (default: all rows; {SWEEP_ORGANISM_SAMPLES} of the "
                            "organism world)")
    sweep.add_argument("--zero-shot", default=None, help="as for eval; needed for --max-zero-shot-drop")
    add_method_args(sweep, default_method=DEFAULT_METHOD, grid=True)
    sweep.add_argument("--layers", nargs="+", default=None,
                       help="layer sets to compare, each 'tower:pattern[,tower:pattern]', e.g. "
                            "text:self_attn.out_proj vision:mlp.fc2 text:mlp.fc1,vision:mlp.fc2")
    sweep.add_argument("--max-zero-shot-drop", type=float, default=5.0,
                       help="largest loss in points (zero-shot accuracy, or safe R@1 without --zero-shot)")
    sweep.add_argument("--output", default="uwm-sweep", help="folder for sweep.csv and pareto.png")
    sweep.add_argument("--save-best", help="save the chosen setting's delta to this folder (only a setting that "
                                           "beats its random control is chosen)")
    sweep.add_argument("--save-best-at-chance", action="store_true",
                       help="with --save-best: when no setting beats its random control, save the highest-GS "
                            "setting within the budget anyway")
    overwrite_arg(sweep, "--save-best")
    common_args(sweep)
    sweep.set_defaults(run=run)


def run(args):
    from .. import sweep as sw
    from ..delta import check_output_folder, check_writable

    check_method_flags(args)
    check_writable(args.output)  # before any work, like the folder of --save-best
    if args.save_best:
        check_output_folder(args.save_best, overwrite=args.overwrite)
    rows, base = _evaluate_grid(args)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    chosen = sw.choose(rows, base, args.max_zero_shot_drop)
    print(sw.table(rows, base, args.max_zero_shot_drop))
    sw.write_csv(rows, out / "sweep.csv", base)
    sw.pareto_plot(rows, out / "pareto.png", base, chosen, max_drop=args.max_zero_shot_drop, table_name="sweep.csv")
    print(f"\nwrote {out / 'sweep.csv'} and {out / 'pareto.png'}")
    print(sw.verdict(rows, base, args.max_zero_shot_drop))
    _save_best(args, rows, base, chosen)


def _evaluate_grid(args):
    """Calibrate once, then evaluate the base model and every setting of the grid on validation."""
    from .. import sweep as sw
    from ..sources import load_data, load_zero_shot
    from ..editor import UWMEditor
    from ..evaluation import evaluate_model
    from ..hints import command_line_hints
    from ..loading import load_model
    from .common import base_id

    calibration = load_data(args.data, args.split, args.samples, args.seed, columns(args.columns))
    with command_line_hints(split_flag="--eval-split"):
        validation = load_data(args.eval_data, args.eval_split, args.eval_samples, args.seed + 1,
                               default=SWEEP_ORGANISM_SAMPLES)
    zero_shot = load_zero_shot(args.zero_shot or (args.eval_data if args.eval_data in ORGANISM_WORLDS else None),
                               n=args.eval_samples or SWEEP_ORGANISM_SAMPLES, seed=args.seed + 1,
                               split=args.eval_split)
    model, processor = load_model(args.model)
    layer_sets = [_layer_set(s) for s in args.layers] if args.layers else [{}]
    union = {f"{t}_targets": sorted({p for s in layer_sets for p in s.get(f"{t}_targets", [])})
             for t in ("text", "vision")} if args.layers else {}
    editor = UWMEditor(model, processor, config_from_args(args, alpha=-1.0, **union), base_model=base_id(args.model))
    editor.calibrate(calibration, progress=not args.quiet)  # settings that change the scores calibrate again

    def evaluate(m):
        return evaluate_model(m, processor, validation, zero_shot=zero_shot, bootstrap=1000, seed=args.seed,
                              progress=False)

    base = evaluate(model)
    rows = sw.sweep(editor, _grid(args, layer_sets, editor.config), evaluate, calibration=calibration,
                    method=args.method, control_seed=args.seed, progress=not args.quiet)
    return rows, base


def _save_best(args, rows, base, chosen):
    from .. import sweep as sw

    if chosen is None and args.save_best_at_chance:
        chosen = sw.choose(rows, base, args.max_zero_shot_drop, require_beats_control=False)
        if chosen is not None:
            print(f"--save-best-at-chance: saving {chosen.label()}, which does not beat its random control")
    if args.save_best and chosen is None:
        print(f"nothing saved to {args.save_best} (pass --save-best-at-chance to save the highest-GS setting "
              "within the budget anyway)")
    elif args.save_best:
        chosen.editor.save_pretrained(args.save_best, chosen.report, overwrite=args.overwrite)
        print(f"saved its delta to {args.save_best}")


def _grid(args, layer_sets: list[dict], config) -> list[dict]:
    """Every combination of the grid flags, as `UWMConfig` changes. A setting the model family decides
    (τ) is always an axis, at its resolved value when not given, so each row says its strength."""
    from ..settings import setting_info

    own = config.field_names()
    axes = {}
    for name in setting_flags():
        info = setting_info(config.settings, name) if name in own else None
        values = getattr(args, name)
        if isinstance(values, list):
            axes[name] = values
        elif info is not None and info.family_default is not None:
            axes[name] = [getattr(config, name)]
    axes["alpha"] = args.alpha
    return [dict(layers, **dict(zip(axes, values)))
            for layers in layer_sets for values in itertools.product(*axes.values())]


def _layer_set(spec: str) -> dict:
    targets = {"text_targets": [], "vision_targets": []}
    for item in spec.split(","):
        tower, _, pattern = item.partition(":")
        if tower not in ("text", "vision") or not pattern:
            raise ValueError(f"--layers items look like text:self_attn.out_proj or vision:mlp.fc2; got {item!r}.")
        targets[f"{tower}_targets"].append(pattern)
    return targets
