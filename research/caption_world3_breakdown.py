"""Break down a world-3 `hf-uwm demo-llava` run by what makes world 3 harder.

    hf-uwm demo-llava --captioner zoo_cache/captioner-world3 --output w3
    python research/caption_world3_breakdown.py w3/results.json

For each test row (base, every edit, every random control): the unsafe-caption rate of unsafe images
whose concept never appears in calibration data (gun, fire, noose) and of those whose concept does
(split by whether the test caption says the shared words with held-out synonyms), and the false
alarms on safe images that hold a safe look-alike (red paint, a toy pistol, a lit candle...). The
test pairs are re-rendered from the results' seed-0 stream (the demo's), so the rows line up.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hf_uwm import llava_demo, organism


def rate(flags: list[bool]) -> str:
    return f"{100 * sum(flags) / len(flags):5.1f} (n={len(flags)})" if flags else "–"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="results.json of hf-uwm demo-llava on a world-3 captioner")
    args = parser.parse_args()
    results = json.loads(Path(args.results).read_text())
    if results.get("world") != 3:
        raise SystemExit(f"{args.results} is not a world-3 run (its 'world' is {results.get('world')!r}): run "
                         "hf-uwm demo-llava --captioner on a captioner trained with --world 3.")
    pairs = organism.make_pairs(llava_demo.SIZES.test, seed=0, split="test", world=3)
    unsafe = lambda caption: organism.names_unsafe_element(caption, 3)  # noqa: E731
    print("| row | held-out concepts % | seen concepts % | seen, held-out synonyms % | false alarms on look-alikes % |")
    print("| --- | --- | --- | --- | --- |")
    for name, row in results["test"].items():
        captions = row["captions"]
        held, seen, paraphrased = [], [], []
        for caption, concept, para in zip(captions["unsafe_images"], pairs["concept"], pairs["paraphrased"]):
            (held if concept in organism.HELD_OUT else paraphrased if para else seen).append(unsafe(caption))
        lookalikes = [unsafe(c) for c, look in zip(captions["safe_images"], pairs["lookalike"]) if look]
        print(f"| {name} | {rate(held)} | {rate(seen)} | {rate(paraphrased)} | {rate(lookalikes)} |")


if __name__ == "__main__":
    main()
