"""Text-only calibration pairs for concepts named in words, which no calibration image shows.

Each pair is a safe caption of the calibration set and the same caption with the concept added:
in the captions' own pattern (where a pair's unsafe caption is its safe one plus words that end in
its concept, "... next to a dangerous knife", the knife becomes the named concept), or in a template
the user gives ("{caption} with a {concept}"). Methods that calibrate the text tower from text-only
pairs (`Method.text_only_pairs`) learn from them as from image pairs; their images are stood in for.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

CAPTION, CONCEPT = "{caption}", "{concept}"
_LAST_WORD = re.compile(r"(\w+)\W*$")


def read_concepts(path: str | Path) -> list[str]:
    """The concept phrases of a text file, one per line; blank lines and lines starting with # are skipped."""
    from .data import check_utf8

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Concept file {path} does not exist: give a text file with one concept phrase "
                                "per line, e.g. 'gun'.")
    check_utf8(path)
    concepts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    concepts = list(dict.fromkeys(c for c in concepts if c and not c.startswith("#")))
    if not concepts:
        raise ValueError(f"Concept file {path} names no concept: write one concept phrase per line, e.g. 'gun'.")
    return concepts


def caption_patterns(pairs) -> list[str | None]:
    """Per pair, the words its unsafe caption adds to its safe one with the concept as `{concept}`
    (" next to a dangerous {concept}"), or None where it adds none that end in its concept.

    The concept is the pair's `concept` column where there is one, else the last word added."""
    concepts = pairs["concept"] if "concept" in pairs.column_names else [None] * len(pairs)
    return [_pattern(safe, unsafe, concept)
            for safe, unsafe, concept in zip(pairs["safe_text"], pairs["unsafe_text"], concepts)]


def _pattern(safe: str, unsafe: str, concept: str | None) -> str | None:
    if not unsafe.startswith(safe) or unsafe == safe:
        return None
    added = unsafe[len(safe):]
    last = _LAST_WORD.search(added)
    if last is None or (concept and last.group(1).lower() != concept.lower()):
        return None
    return added[: last.start(1)] + CONCEPT + added[last.end(1):]


def concept_pairs(pairs, concepts: list[str], *, template: str | None = None, per_concept: int | None = None,
                  seed: int = 0):
    """Text-only pairs (safe_text, unsafe_text, concept) naming each of `concepts`, from `pairs`' safe captions.

    `template` (with `{caption}` and `{concept}`) writes every unsafe caption; without it each pair
    keeps the pattern of the calibration pair whose safe caption it takes (`caption_patterns`).
    `per_concept` pairs per concept (default: as many as the calibration has per concept of its
    `concept` column, else 100, at most one per usable caption); captions are drawn with `seed`.
    """
    import datasets

    concepts = _checked_concepts(concepts)
    safe = list(pairs["safe_text"])
    if template is not None:
        _check_template(template)
        patterns = [template] * len(safe)
    else:
        patterns = caption_patterns(pairs)
    usable = [i for i, p in enumerate(patterns) if p is not None]
    if not usable:
        raise ValueError("No calibration pair's unsafe caption is its safe caption plus words ending in its concept "
                         "(e.g. 'a dog' / 'a dog next to a knife'), so the captions show no pattern to name a new "
                         "concept in: give a template, e.g. --concept-template '{caption} next to a {concept}'.")
    count = min(per_concept or _default_per_concept(pairs), len(usable))
    rows = {"safe_text": [], "unsafe_text": [], "concept": []}
    for k, concept in enumerate(concepts):
        drawn = np.random.default_rng([seed, k]).permutation(usable)[:count]
        for i in drawn.tolist():
            rows["safe_text"].append(safe[i])
            rows["unsafe_text"].append(_fill(patterns[i], safe[i], concept, template is not None))
            rows["concept"].append(concept)
    return datasets.Dataset.from_dict(rows)


def _fill(pattern: str, caption: str, concept: str, whole: bool) -> str:
    text = pattern.replace(CONCEPT, concept)
    return text.replace(CAPTION, caption) if whole else caption + text


def _default_per_concept(pairs) -> int:
    if "concept" in pairs.column_names:
        counts = [n for c, n in zip(*np.unique([str(c) for c in pairs["concept"]], return_counts=True)) if c]
        if counts:
            return max(1, round(float(np.mean(counts))))
    return 100


def _checked_concepts(concepts) -> list[str]:
    if isinstance(concepts, str) or not all(isinstance(c, str) and c.strip() for c in concepts):
        raise TypeError(f"concepts must be a list of non-empty phrases, e.g. ['gun', 'fire'], got {concepts!r}.")
    if not concepts:
        raise ValueError("concepts is empty: name at least one concept, e.g. ['gun'].")
    return [c.strip() for c in concepts]


def _check_template(template: str):
    if not isinstance(template, str) or CAPTION not in template or CONCEPT not in template:
        raise ValueError(f"The concept template must hold {CAPTION} and {CONCEPT}, e.g. "
                         f"'{{caption}} next to a {{concept}}'; got {template!r}.")
