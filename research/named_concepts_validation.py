"""How named concepts were set up, on validation splits only (shard and bomb play the unseen concepts).

Calibration: the 512 world-3 train pairs of blood, knife, syringe and skull as image pairs; shard and
bomb, which the validation split shows, are named in words only. Three studies, each on every model:

1. the stand-in for a missing image (rule off, 16 rounds, 50 text-only pairs per named concept): the
   caption's own unedited embedding (the library's), the same shifted by the mean image-minus-caption
   gap of the image pairs, shard and bomb shown as image pairs instead, and not named at all;
2. text-only pairs per named concept, with the self-set stopping rule: 0, 20, 40 and 85 (85: the
   calibration's pairs per seen concept, the default);
3. phrasing, with the rule: 18 and 85 pairs per concept written in a phrasing of our own ("a shard
   beside a red cat"), and 85 from the template "{caption} and a {concept}".

    python research/named_concepts_validation.py organism-hard zoo/world3-seed4-unsafe0.35 --out named_validation
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import torch

from hf_uwm import UWMConfig, UWMEditor
from hf_uwm.concept_pairs import concept_pairs
from hf_uwm.data import concatenate_pairs
from hf_uwm.evaluation import ZeroShotTask, evaluate_model
from hf_uwm.loading import load_model
from hf_uwm.methods import pair_images
from hf_uwm.organism import COLOURS, NOUNS, make_pairs, zero_shot_task

from common import parse_models  # research/common.py, beside this script

SHOWN, NAMED = ("blood", "knife", "syringe", "skull"), ("shard", "bomb")
RULE_OFF = dict(goal=None, knowledge_budget=None, holdout=0.0, rounds=16)
PREFIXES = (8, 10, 12, 16)
OWN_FORMS = ("a {k} beside a {c} {n}", "a {c} {n} and a {k}", "someone holds a {k} near a {c} {n}")


def own_phrasing(per_concept: int):
    rows = {"safe_text": [], "unsafe_text": []}
    for concept in NAMED:
        for i in range(per_concept):
            noun, colour = NOUNS[i % len(NOUNS)], list(COLOURS)[(3 * i) % len(COLOURS)]
            rows["safe_text"].append(f"a {colour} {noun}")
            rows["unsafe_text"].append(OWN_FORMS[i % 3].format(k=concept, c=colour, n=noun))
    return datasets.Dataset.from_dict(rows)


def gap_stand_in(family, run, rows, text_inputs):
    """The library's stand-in shifted by the mean image-minus-caption gap of the batch's image pairs."""
    embedded = library_stand_in(family, run, rows, text_inputs)
    pictured = [i for i, row in enumerate(rows) if not run.text_only[row]]
    if pictured:
        at = pictured + [len(rows) + i for i in pictured]
        captions = family.embed_text(family.to_device(text_inputs))[at]
        gap = embedded[at].mean(0) - captions.mean(0)
        alone = [i for i in range(2 * len(rows)) if i not in at]
        embedded[alone] = torch.nn.functional.normalize(embedded[alone] + gap, dim=-1)
    return embedded


library_stand_in = pair_images._images_or_captions


def study(name: str) -> dict:
    model, processor = load_model(name)
    calibration = make_pairs(512, seed=0, split="train", world=3)
    shown = calibration.filter(lambda c: c in SHOWN, input_columns="concept")
    validation = make_pairs(1000, seed=0, split="validation", world=3)
    zero_shot = ZeroShotTask(*zero_shot_task(1000, seed=0, split="validation", world=3))
    named = [c in NAMED for c in validation["concept"]]
    subsets = {"named": named, "shown": [not n for n in named],
               "named, without cues": [n and not c for n, c in zip(named, validation["cues"])]}

    def evaluate(editor, **extra):
        with editor.applied():
            report = evaluate_model(model, processor, validation, zero_shot=zero_shot, bootstrap=200, progress=False,
                                    subsets=subsets)
        return {"GS": report.safeground["GS"], "zero_shot": report.zero_shot,
                "lookalike_R@1": report.lookalikes["R@1 Is->Ts"], **{k: v["GS"] for k, v in report.subsets.items()},
                "weights": sum(editor.counts().values()), **extra}

    def edit(data, **settings):
        return UWMEditor(model, processor, UWMConfig(method="iterative_attribution", **settings)).calibrate(
            data, progress=False)

    words = concatenate_pairs(shown, concept_pairs(shown, list(NAMED), per_concept=50))
    runs = {"caption stand-in": lambda: edit(words, **RULE_OFF), "shown as images": lambda: edit(calibration, **RULE_OFF),
            "not named": lambda: edit(shown, **RULE_OFF)}

    def with_gap():
        pair_images._images_or_captions = gap_stand_in
        try:
            return edit(words, **RULE_OFF)
        finally:
            pair_images._images_or_captions = library_stand_in

    runs["gap-shifted stand-in"] = with_gap
    results = {"stand-in": {key: [evaluate(make().with_settings(rounds=r), rounds=r) for r in PREFIXES]
                            for key, make in runs.items()}}
    results["pairs per concept"] = {}
    for count in (0, 20, 40, 85):
        data = shown if not count else concatenate_pairs(shown, concept_pairs(shown, list(NAMED), per_concept=count))
        editor = edit(data)
        results["pairs per concept"][count] = evaluate(editor, stop=list(editor.stop))
    variants = {"own phrasing, 18": own_phrasing(18), "own phrasing, 85": own_phrasing(85),
                "template '{caption} and a {concept}', 85":
                    concept_pairs(shown, list(NAMED), template="{caption} and a {concept}", per_concept=85)}
    results["phrasing"] = {}
    for key, text in variants.items():
        editor = edit(concatenate_pairs(shown, text))
        results["phrasing"][key] = evaluate(editor, stop=list(editor.stop))
    return results


def main():
    args, out = parse_models(__doc__, "named_validation")
    results = {Path(m).name: study(m) for m in args.models}
    (out / "named_concepts_validation.json").write_text(json.dumps(results, indent=1))
    for model, result in results.items():
        print(f"\n{model}")
        for study_name, rows in result.items():
            for key, row in rows.items():
                for r in (row if isinstance(row, list) else [row]):
                    print(f"  {study_name:<18} {str(key):<42} " + "  ".join(
                        f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
