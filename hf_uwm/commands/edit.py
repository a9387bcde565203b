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
    named = edit.add_argument_group("concepts the calibration pairs do not show (text-only pairs; "
                                    "iterative_attribution and the UWM statistics learn from them)")
    named.add_argument("--concepts", metavar="FILE",
                       help="a text file of concept phrases, one per line: each is named in text-only pairs made "
                            "from the calibration's safe captions, in their own pattern (a pair 'a dog' / 'a dog "
                            "next to a knife' gives 'a dog next to a gun'), as many per concept as the calibration "
                            "has per concept")
    named.add_argument("--concept-template", metavar="TEMPLATE",
                       help="with --concepts: write each unsafe caption from this template instead, e.g. "
                            "'{caption} next to a {concept}'")
    named.add_argument("--text-pairs", metavar="FILE",
                       help="a CSV, JSON or JSONL file of text-only pairs (columns safe_text, unsafe_text) to "
                            "calibrate on as well")
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
    data = _with_text_only_pairs(args, data)
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


def _with_text_only_pairs(args, data):
    """The calibration pairs, then the text-only pairs of --concepts and of --text-pairs."""
    from ..concept_pairs import concept_pairs, read_concepts
    from ..data import concatenate_pairs, load_pairs

    if args.concept_template and not args.concepts:
        raise ValueError("--concept-template writes the pairs of --concepts: give --concepts FILE too.")
    extra = []
    if args.concepts:
        extra.append(concept_pairs(data, read_concepts(args.concepts), template=args.concept_template, seed=args.seed))
    if args.text_pairs:
        extra.append(load_pairs(args.text_pairs, skip_bad_rows=args.skip_bad_rows))
    return concatenate_pairs(data, *extra) if extra else data


def edit_summary(editor) -> str:
    """One line of what the calibration chose, in the method's own terms (no τ where the method has none)."""
    config, counts = editor.config, editor.counts()
    weights = f"{sum(counts.values()):,} weights ({', '.join(f'{t} {n:,}' for t, n in counts.items())})"
    if editor.stop is not None:
        from ..methods.stopping import summary

        return f"{config.method}, {summary(*editor.stop, config.rounds)}; {weights} flipped"
    strength = f"density={config.density:g}" if config.selection == "fixed" else f"τ={config.tau:g}"
    return f"{config.method}, {strength}, α={config.alpha:g}; {weights} selected"
