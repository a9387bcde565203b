"""`hf-uwm edit`: calibrate an edit on DATA and save the delta."""

from __future__ import annotations

from .common import columns, common_args, hub_args, overwrite_arg, set_threads, skip_bad_rows_arg, threads_arg
from .method_flags import add_method_args, check_method_flags, config_from_args, method_command


def register(commands):
    from ..methods import RECOMMENDED_METHOD

    edit = method_command(commands, "edit", "calibrate an edit on DATA and save the delta", RECOMMENDED_METHOD)
    add_method_args(edit, default_method=RECOMMENDED_METHOD)
    edit.add_argument("--output", required=True, help="folder for the delta (uwm_config.json, uwm_delta.safetensors)")
    overwrite_arg(edit, "--output")
    edit.add_argument("--checkpoint-dir", help="save the running statistics here; a rerun resumes from them")
    skip_bad_rows_arg(edit)
    hub_args(edit)
    threads_arg(edit)
    common_args(edit)
    edit.set_defaults(run=run)


def run(args):
    from ..sources import load_data
    from ..delta import check_output_folder, resolve_delta_folder
    from ..editor import UWMEditor

    if args.alpha == 1:
        raise ValueError("--alpha 1 multiplies the selected weights by 1 and changes nothing: use -1 (negate) or "
                         "0 (prune), or any other factor.")
    check_method_flags(args)
    config = config_from_args(args)
    # Before any work: a full calibration must not end in "folder not empty" or "permission denied".
    check_output_folder(args.output, overwrite=args.overwrite)
    if resolve_delta_folder(args.model, args.revision, token=args.token) is not None:
        raise ValueError(f"{args.model} is a saved delta: edit its base model instead (its uwm_config.json names "
                         "it), or evaluate the delta with `hf-uwm eval`.")
    set_threads(args)
    data = load_data(args.data, args.split, args.samples, args.seed, columns(args.columns),
                     skip_bad_rows=args.skip_bad_rows, token=args.token)
    _check_columns_for_method(data, config.method)
    editor = UWMEditor.from_pretrained(args.model, config, revision=args.revision, token=args.token)
    editor.calibrate(data, progress=not args.quiet, checkpoint_dir=args.checkpoint_dir)
    folder = editor.save_pretrained(args.output, overwrite=args.overwrite)
    print(f"saved the delta to {folder}: {edit_summary(editor)}")
    if editor.trajectory:
        _plot_trajectory(editor, folder, args.model)


def _plot_trajectory(editor, folder, model: str):
    from ..delta import TRAJECTORY_NAME
    from ..methods.stopping import plot_trajectory

    config = editor.config
    kept, reason = editor.stop
    plot_trajectory(editor.trajectory, folder / TRAJECTORY_NAME, goal=config.goal,
                    knowledge_budget=config.knowledge_budget, kept=kept, reason=reason,
                    title=f"{model}: held-out pairs after each round", goal_name=editor.method.goal_name)
    print(f"wrote {folder / TRAJECTORY_NAME}: the held-out measures after each round")


def _check_columns_for_method(data, method: str):
    from ..data import IMAGE_COLUMNS
    from ..methods import get_method

    if get_method(method).needs_both_towers and not set(IMAGE_COLUMNS) <= set(data.column_names):
        raise ValueError(f"--method {method} compares texts with images, and the data has no image columns "
                         f"{list(IMAGE_COLUMNS)}: give them, or edit the text tower by its texts alone with "
                         "--method ratio --towers text.")


def edit_summary(editor) -> str:
    """One line of what the calibration chose, in the method's own terms (no τ where the method has none)."""
    config, counts = editor.config, editor.counts()
    weights = f"{sum(counts.values()):,} weights ({', '.join(f'{t} {n:,}' for t, n in counts.items())})"
    if editor.stop is not None:
        from ..methods.stopping import summary

        return f"{config.method}, {summary(*editor.stop, config.rounds)}; {weights} flipped"
    strength = f"density={config.density:g}" if config.selection == "fixed" else f"τ={config.tau:g}"
    return f"{config.method}, {strength}, α={config.alpha:g}; {weights} selected"
