"""`hf-uwm export`: write a delta as a peft adapter, beside the delta, into a new folder."""

from __future__ import annotations

from .common import delta_or_model, hub_args, overwrite_arg


def register(commands):
    export = commands.add_parser("export", help="write a delta as a peft adapter, beside the delta, into a new folder",
                                 description="Write DELTA and the same edit as a peft SHiRA adapter (adapter_config.json, "
                                             "adapter_model.safetensors) into OUTPUT, which then loads with hf_uwm and "
                                             "with peft alone. The adapter holds (alpha - 1) * W of the base weights, so "
                                             "the base model is loaded. The new card describes both; it has no "
                                             "evaluation table.")
    export.add_argument("model", metavar="DELTA", help="a delta folder or Hub repo")
    export.add_argument("output", metavar="OUTPUT")
    export.add_argument("--peft", action="store_true", required=True, help="write the peft adapter (the only format)")
    export.add_argument("--base", help="for a delta made on a local model folder: that folder")
    overwrite_arg(export, "OUTPUT")
    hub_args(export)
    export.set_defaults(run=run, quiet=True)


def run(args):
    from ..delta import check_output_folder, resolve_delta_folder
    from ..peft_adapter import require_peft

    require_peft()
    check_output_folder(args.output, overwrite=args.overwrite)
    if resolve_delta_folder(args.model, args.revision, token=args.token) is None:
        raise ValueError(f"{args.model} is a model, not a delta: export a delta saved by `hf-uwm edit`.")
    editor, _, _ = delta_or_model(args, delta=True)
    folder = editor.save_pretrained(args.output, overwrite=args.overwrite, peft=True)
    print(f"wrote the delta and its peft adapter to {folder}: load it with UWMEditor.from_pretrained or "
          "PeftModel.from_pretrained(base_model, folder)")
