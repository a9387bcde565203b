"""Choose the defaults of method="caption_iterative" on the VALIDATION split of an organism captioner.

    python research/caption_iterative_validation.py --output val.jsonl [--model FOLDER]
        [--round-density 0.0005 --curvature-weight 0 4 16 --rounds 30 --every 2]

For each (round density, λ) it calibrates once with the maximum number of rounds on the demo's
calibration pairs less the held-out slice (the rows `holdout_rows` holds out), then, for every
`--every`-th prefix of rounds (re-selected from the cached scores, no forward pass), writes one JSON
line: the held-out slice's goal and cost (what the stopping rule sees) and the validation split's
unsafe-caption rate, false alarms, ROUGE-L and BLEU (exact judge, greedy captions). The test split is
never touched.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from hf_uwm import UWMConfig, UWMEditor
from hf_uwm.caption_evaluation import evaluate_captioning
from hf_uwm.llava_demo import SIZES
from hf_uwm.methods.caption_iterative import KNOWLEDGE_CURVATURES
from hf_uwm.methods.rounds import CURVATURE_ESTIMATORS
from hf_uwm.methods.stopping import holdout_rows
from hf_uwm.organism import make_pairs
from hf_uwm.organism_captioner import NAME, exact_organism_judge, load_captioner


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="JSON lines file to write")
    parser.add_argument("--model", default=None, help="a captioner folder (default: the bundled one)")
    parser.add_argument("--round-density", type=float, nargs="+", default=[0.0005])
    parser.add_argument("--curvature-weight", type=float, nargs="+", default=[0.0, 4.0, 16.0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--every", type=int, default=2, help="evaluate every k-th round")
    parser.add_argument("--probes", type=int, default=None, help="curvature probes (default: the method's)")
    parser.add_argument("--curvature-estimator", default=None, choices=CURVATURE_ESTIMATORS,
                        help="how the curvature probes are squared (default: the method's)")
    parser.add_argument("--knowledge-curvature", default=None, choices=KNOWLEDGE_CURVATURES,
                        help="which log-probabilities the curvature guards (default: the method's)")
    parser.add_argument("--safe-likelihood-weight", type=float, default=None,
                        help="μ, the weight of the safe captions' log-likelihood in the margin (default: the method's)")
    parser.add_argument("--vision-targets", nargs="+", default=None,
                        help="target layers (default: the method's; e.g. mlp.fc2 projector.linear_1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    model, processor = load_captioner() if args.model is None else _load(args.model)
    calibration = make_pairs(SIZES.calibration, seed=args.seed, split="train")
    validation = make_pairs(SIZES.validation, seed=args.seed, split="validation")
    kept, held = holdout_rows(len(calibration), UWMConfig(method="caption_iterative").holdout, args.seed)
    gradient_rows, holdout = calibration.select(kept), calibration.select(held)
    with open(args.output, "w") as out:
        for density in args.round_density:
            for weight in args.curvature_weight:
                config = UWMConfig(method="caption_iterative", rounds=args.rounds, round_density=density,
                                   curvature_weight=weight, seed=args.seed, goal=None, knowledge_budget=None,
                                   holdout=0.0, vision_targets=args.vision_targets,
                                   **_given(curvature_probes=args.probes, curvature_estimator=args.curvature_estimator,
                                          knowledge_curvature=args.knowledge_curvature,
                                          safe_likelihood_weight=args.safe_likelihood_weight))
                editor = UWMEditor(model, processor, config, base_model=NAME if args.model is None else None)
                start = time.perf_counter()
                editor.calibrate(gradient_rows, progress=False)
                seconds = time.perf_counter() - start
                state = editor.method.start_measuring(editor, holdout)
                for rounds in range(0, args.rounds + 1, args.every):
                    row = dict(round_density=density, curvature_weight=weight, rounds=rounds, calibrate_s=seconds,
                               vision_targets=editor.config.vision_targets,
                               curvature_estimator=editor.config.curvature_estimator,
                               curvature_probes=editor.config.curvature_probes,
                               knowledge_curvature=editor.config.knowledge_curvature,
                               safe_likelihood_weight=editor.config.safe_likelihood_weight)
                    row.update(_evaluate(editor, rounds, holdout, state, validation))
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                    print(row, flush=True)


def _evaluate(editor, rounds, holdout, state, validation) -> dict:
    edit = editor.with_settings(rounds=rounds) if rounds else None
    if edit:
        edit.apply()
    try:
        goal, cost, measures = editor.method.measure(editor, holdout, state)
        report = evaluate_captioning(editor.model, editor.processor, validation, exact_organism_judge, meteor=False,
                                     batch_size=32, bootstrap=0, progress=False)
    finally:
        if edit:
            edit.revert()
    return dict(weights=sum(edit.counts().values()) if edit else 0, holdout_goal=goal, holdout_cost=cost,
                holdout_bleu=measures["bleu"],
                unsafe=report.unsafe_rate, false_alarms=report.unsafe_rate_safe_images,
                rougeL=report.text["rougeL"], bleu=report.text["bleu"])


def _given(**settings) -> dict:
    """The settings given on the command line (the method's defaults for the others)."""
    return {k: v for k, v in settings.items() if v is not None}


def _load(folder):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


if __name__ == "__main__":
    main()
