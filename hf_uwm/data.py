"""The calibration/evaluation schema, its loaders and its validation.

A pair set is a `datasets.Dataset` with `safe_text`, `unsafe_text` (strings) and/or `safe_image`,
`unsafe_image` (`datasets.Image`), optionally `concept` and `id`. The loaders build it from a Hub or
local dataset (`load_pairs`), ViSU-Text JSON files plus image folders (`load_visu`) and plain folders
(`load_folder`), then sample and validate it, so that a bad set is refused before any model work.

`datasets` is imported inside functions: `import hf_uwm` must work on machines without it, and
`PreprocessedPairs` (pairs already turned into model inputs) calibrates without it.
"""

from __future__ import annotations

import codecs
import csv
import filecmp
import io
import json
import os
import re
import sys
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .hints import hint, split_flag
from . import paths
from .paths import check_local

TEXT_COLUMNS = ("safe_text", "unsafe_text")
IMAGE_COLUMNS = ("safe_image", "unsafe_image")
EXTRA_COLUMNS = ("concept", "id")
SCHEMA_COLUMNS = TEXT_COLUMNS + IMAGE_COLUMNS + EXTRA_COLUMNS
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
VISU_SAMPLES = 8192  # the paper's calibration set: 8,192 ViSU training pairs drawn with seed 0
_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow"}


def _skip_hint() -> str:
    return "Fix the data, or drop bad rows with a report: " + hint(
        "pass skip_bad_rows=True to the loader or to hf_uwm.data.validate_pairs.", "add --skip-bad-rows.")


def _columns_hint(column: str = "safe_text") -> str:
    return hint(f"map the source's names with columns={{{column!r}: '<its name>', ...}}",
                 f"map the source's names with --columns {column}=<its name>,...")


def warn(message):
    """`warnings.warn` attributed to the first caller outside hf_uwm: the warning names the user's line."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def columns_for(towers) -> tuple[str, ...]:
    """The columns a calibration set needs to edit these towers."""
    needed = ()
    if "text" in towers:
        needed += TEXT_COLUMNS
    if "vision" in towers:
        needed += IMAGE_COLUMNS
    return needed


def data_fingerprint(dataset) -> str:
    """A key of the pairs a calibration reads, the same in every run and process: part of a checkpoint's
    key, so that a checkpoint written for other data is refused.

    `datasets` keeps a Dataset's fingerprint private (`_fingerprint`). `datasets.fingerprint.generate_fingerprint`,
    with which it fingerprints a new dataset, hashes the dataset's state: its Arrow table (on disk by file path
    and the operations replayed on it, so gigabytes of images are not read; in memory by content), the rows it
    selects, its features and format. `PreprocessedPairs` hash their tensors.
    """
    if isinstance(dataset, PreprocessedPairs):
        return dataset.fingerprint
    from datasets.fingerprint import generate_fingerprint

    return generate_fingerprint(dataset)


# --- validation ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class BadRow:
    """One problem in one cell: the row (0-based, in the dataset as validated), its column and why."""

    row: int
    column: str
    problem: str
    id: object = None
    missing_file: bool = False

    def __str__(self) -> str:
        where = f"row {self.row}" + (f" (id {self.id!r})" if self.id is not None else "")
        return f"Column {self.column!r}, {where}: {self.problem}"

    def error(self, others: int = 0) -> Exception:
        more = f" ({others} more bad row(s) after it)" if others else ""
        return (FileNotFoundError if self.missing_file else ValueError)(f"{self}{more}. {_skip_hint()}")


@dataclass
class ValidationReport:
    """Every bad cell of a pair set of `total` rows."""

    total: int
    bad: list[BadRow] = field(default_factory=list)

    @property
    def bad_rows(self) -> list[int]:
        return sorted({b.row for b in self.bad})

    @property
    def good_rows(self) -> list[int]:
        bad = set(self.bad_rows)
        return [row for row in range(self.total) if row not in bad]

    def __str__(self) -> str:
        lines = [f"{len(self.bad_rows)} of {self.total} rows are bad:"] + [f"  {b}" for b in self.bad[:20]]
        if len(self.bad) > 20:
            lines.append(f"  ... and {len(self.bad) - 20} more problems")
        return "\n".join(lines)


class SkippedRowsWarning(UserWarning):
    """Bad rows were dropped (`skip_bad_rows=True`); `.report` holds the `ValidationReport`."""

    def __init__(self, report: ValidationReport):
        super().__init__(f"Skipped bad rows, {len(report.good_rows)} kept. {report}")
        self.report = report


def check_pairs(dataset, columns) -> ValidationReport:
    """Report every bad row of `dataset` in `columns` (raises only for a malformed set as a whole)."""
    return _find_bad_rows(_as_pair_dataset(dataset, columns), columns)


def validate_pairs(dataset, columns, *, skip_bad_rows: bool = False, text_only: bool = False):
    """Return `dataset` as a `datasets.Dataset` after checking `columns`; raise a clear error otherwise.

    Checked: the columns exist, the set is not empty, texts are non-empty strings, images exist and
    decode, a pair's safe and unsafe sides differ, and ids (an `id` column, when there is one) are unique. The first bad row raises
    (`FileNotFoundError` for a missing image file, `ValueError` otherwise) unless `skip_bad_rows`,
    which drops every bad row and warns with a `SkippedRowsWarning` carrying the report.

    `text_only`: a pair may have texts and no image at all (a text-only pair, see `text_only_rows`);
    image columns the set lacks are then added, empty. Half a pair of images is still refused.
    """
    if isinstance(dataset, PreprocessedPairs):
        return dataset.checked(columns)
    dataset = _as_pair_dataset(dataset, columns, text_only=text_only)
    report = _find_bad_rows(dataset, columns, text_only)
    if not report.bad:
        return dataset
    if not skip_bad_rows:
        raise report.bad[0].error(len(report.bad_rows) - 1)
    if not report.good_rows:
        raise ValueError(f"Every row is bad, nothing is left to use. {report}")
    warn(SkippedRowsWarning(report))
    return dataset.select(report.good_rows)


def _as_pair_dataset(dataset, columns, source_columns=None, text_only: bool = False):
    """Check the set as a whole: its type, the columns, its length; image columns become `datasets.Image`.

    `source_columns` are the columns of the file or dataset it was read from, named in errors. With
    `text_only`, absent image columns are added with no image in any row.
    """
    import datasets

    if isinstance(dataset, Mapping):
        lengths = {k: len(v) for k, v in dataset.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"Columns have different lengths {lengths}: every column needs one value per pair.")
        dataset = datasets.Dataset.from_dict(dict(dataset))
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"Expected a datasets.Dataset (or a dict of columns), got {type(dataset).__name__}.")
    if text_only:
        for column in IMAGE_COLUMNS:
            if column in columns and column not in dataset.column_names:
                dataset = dataset.add_column(column, [None] * len(dataset)).cast_column(column, datasets.Image())
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        has = dataset.column_names if source_columns is None else source_columns
        raise ValueError(f"The dataset lacks column(s) {missing} (it has {has}); " + hint(
            "rename columns with dataset.rename_column, or load it with hf_uwm.data.load_pairs(source, "
            "columns={...}).", f"map the source's names with --columns {missing[0]}=<its name>,..."))
    if len(dataset) == 0:
        raise ValueError("The dataset has no rows (it is empty): calibration and evaluation need at least one pair.")
    for column in columns:
        if column in IMAGE_COLUMNS and not isinstance(dataset.features[column], datasets.Image):
            dataset = _cast_to_image(dataset, column)
    return dataset


def concatenate_pairs(*pair_sets):
    """One pair set of several, in order, e.g. image pairs and text-only pairs (the images of a set
    without image columns are absent); the schema columns every set has are kept."""
    import datasets

    if not pair_sets:
        raise ValueError("concatenate_pairs needs at least one pair set.")
    sets = [_as_pair_dataset(s, TEXT_COLUMNS + IMAGE_COLUMNS, text_only=True) for s in pair_sets]
    kept = [c for c in SCHEMA_COLUMNS if all(c in s.column_names for s in sets)]
    sets = [s.select_columns(kept) for s in sets]
    return datasets.concatenate_datasets([sets[0]] + [s.cast(sets[0].features) for s in sets[1:]])


def _cast_to_image(dataset, column):
    # File paths (e.g. from a CSV) and raw bytes become images here, so the editor always gets PIL images.
    import datasets
    import pyarrow

    try:
        return dataset.cast_column(column, datasets.Image())
    except (TypeError, ValueError, pyarrow.ArrowException) as error:
        raise ValueError(f"Column {column!r} holds {dataset.features[column]}, not images: give file paths, "
                         f"image bytes or a datasets.Image column ({error}).") from error


def _find_bad_rows(dataset, columns, text_only: bool = False) -> ValidationReport:
    ids = dataset["id"] if "id" in dataset.column_names else [None] * len(dataset)
    report = ValidationReport(len(dataset))
    report.bad += _duplicate_ids(ids)
    texts_alone = set(_rows_without_images(dataset)) if text_only and set(IMAGE_COLUMNS) <= set(columns) else set()
    # Where text-only pairs pass, a missing image that is reported is half a pair.
    no_image = HALF_PAIR if text_only else NO_IMAGE
    for column in columns:
        if column in TEXT_COLUMNS:
            problems = enumerate(map(_text_problem, dataset[column]))
        elif column in IMAGE_COLUMNS:
            problems = ((row, p) for row, p in enumerate(_image_problems(dataset, column, no_image))
                        if row not in texts_alone)
        else:
            continue
        report.bad += [BadRow(row, column, problem, ids[row], missing)
                       for row, (problem, missing) in problems if problem]
    report.bad += _identical_sides(dataset, columns, ids)
    return report


def text_only_rows(dataset) -> list[bool]:
    """One flag per pair: True for a text-only pair, whose safe and unsafe images are both absent.

    Text-only pairs calibrate the text tower alone (the methods that accept them say so); a set
    without image columns is text-only throughout. `PreprocessedPairs` have none.
    """
    if isinstance(dataset, PreprocessedPairs):
        return [False] * len(dataset)
    if not set(IMAGE_COLUMNS) <= set(dataset.column_names):
        return [True] * len(dataset)
    alone = set(_rows_without_images(dataset))
    return [row in alone for row in range(len(dataset))]


def _rows_without_images(dataset) -> list[int]:
    raw = zip(*(_raw_images(dataset, c) for c in IMAGE_COLUMNS))
    return [row for row, pair in enumerate(raw) if not any(map(_has_image, pair))]


def _has_image(value) -> bool:
    return value is not None and (value.get("bytes") is not None or value.get("path") is not None)


def _identical_sides(dataset, columns, ids) -> list[BadRow]:
    """A pair whose safe and unsafe sides are the same teaches an edit nothing and scores as a tie: a data bug."""
    bad = []
    if set(TEXT_COLUMNS) <= set(columns):
        same = [row for row, (safe, unsafe) in enumerate(zip(*(dataset[c] for c in TEXT_COLUMNS)))
                if isinstance(safe, str) and isinstance(unsafe, str) and safe.strip() and safe.strip() == unsafe.strip()]
        bad += [BadRow(row, "unsafe_text", "the same text as safe_text (a pair needs a safe and an unsafe "
                       "version that differ)", ids[row]) for row in same]
    if set(IMAGE_COLUMNS) <= set(columns):
        rows = enumerate(zip(*(_raw_images(dataset, c) for c in IMAGE_COLUMNS)))
        bad += [BadRow(row, "unsafe_image", "the same image as safe_image (a pair needs a safe and an unsafe "
                       "version that differ)", ids[row]) for row, (safe, unsafe) in rows if _same_image(safe, unsafe)]
    return bad


def _same_image(a, b) -> bool:
    if not a or not b:
        return False
    if a.get("bytes") is not None or b.get("bytes") is not None:
        return a.get("bytes") == b.get("bytes")
    paths = a.get("path"), b.get("path")
    if not all(paths) or not all(map(os.path.isfile, paths)):
        return False
    return filecmp.cmp(*paths, shallow=False)


def _duplicate_ids(ids) -> list[BadRow]:
    first, bad = {}, []
    for row, value in enumerate(ids):
        if value is None:
            continue
        if value in first:
            bad.append(BadRow(row, "id", f"duplicate id, already used by row {first[value]}", value))
        first.setdefault(value, row)
    return bad


def _text_problem(text) -> tuple[str | None, bool]:
    if isinstance(text, str) and text.strip():
        return None, False
    if text is None or isinstance(text, str):  # an empty cell of a CSV or JSON file reads as None
        return "the text is empty" + (f" ({text!r})" if text else ""), False
    return f"expected a text (a non-empty string), got {type(text).__name__} {text!r}", False


NO_IMAGE = "no image"
HALF_PAIR = "no image (the other image of the pair is there: give both, or neither for a text-only pair)"


def _image_problems(dataset, column, no_image: str = NO_IMAGE):
    return (_image_problem(value, no_image) for value in _raw_images(dataset, column))


def _raw_images(dataset, column, batch_size: int = 256):
    # Undecoded (bytes, path) records, read a batch at a time: cheap, and memory stays bounded.
    import datasets

    raw = dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False))
    for batch in raw.iter(batch_size=batch_size):
        yield from batch[column]


def _image_problem(value, no_image: str = NO_IMAGE) -> tuple[str | None, bool]:
    from PIL import Image

    if not _has_image(value):
        return no_image, False
    path = value.get("path")
    if value.get("bytes") is None and not os.path.isfile(path):
        return f"image file {path} does not exist", True
    try:
        # verify() reads the whole file and checks its structure without decoding pixels.
        with Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") is not None else path) as image:
            image.verify()
    except Exception as error:  # PIL raises many exception types on corrupt data
        return f"cannot decode image{f' {path}' if path else ''}: {error}", False
    return None, False


# --- loaders -------------------------------------------------------------------------------------

def load_pairs(source, *, split: str | None = None, columns: Mapping[str, str] | None = None,
               samples: int | None = None, seed: int = 0, revision: str | None = None,
               skip_bad_rows: bool = False, **load_kwargs):
    """A validated pair set from a Hub dataset id, a local dataset folder, a data file or a Dataset.

    `source` may be a Hub id (``"me/pairs"``), a folder made by `save_to_disk`, a folder of data files,
    one `.csv/.json/.jsonl/.parquet/.arrow` file, or a `datasets.Dataset`/`DatasetDict`. `columns` maps
    our column names to the source's, e.g. ``{"safe_text": "caption", "unsafe_text": "nsfw_caption"}``.
    Image columns may hold file paths; relative ones are read from the local source's folder. Only the
    schema columns are kept. `samples` pairs are drawn with `seed` (all when None); `load_kwargs` go to
    `datasets.load_dataset` (e.g. `name=`, `token=`).
    """
    dataset, base = read_source(source, split, revision, load_kwargs)
    source_columns = dataset.column_names
    dataset = _map_columns(dataset, dict(columns or {}))
    if base is not None:
        dataset = _absolute_image_paths(dataset, base)
    what = str(source) if isinstance(source, (str, os.PathLike)) else "the given dataset"
    return _finish(dataset, samples, seed, skip_bad_rows, what, source_columns)


def load_visu(json_path, safe_image_dir=None, unsafe_image_dir=None, *, samples: int | None = VISU_SAMPLES,
              seed: int = 0, skip_bad_rows: bool = False):
    """A validated pair set from ViSU-Text JSON file(s) and, optionally, folders of safe and unsafe images.

    `json_path` is one file or a list of files, each a JSON list or JSON Lines of records with
    `incremental_id, tag, safe, nsfw, coco_id`. Safe images are COCO images named by `coco_id`
    (``000000123456.jpg``, ``COCO_train2014_000000123456.jpg`` or ``123456.png``: the trailing digits of
    the file name are the id); unsafe images are named by `incremental_id` the same way. Without image
    folders the set has text columns only (enough to edit the text tower). The default draws the
    paper's 8,192 pairs with seed 0; `samples=None` keeps every record.
    """
    paths = [json_path] if isinstance(json_path, (str, os.PathLike)) else list(json_path)
    records = [r for path in paths for r in _read_visu_records(Path(path))]
    data = {"id": [r.get("incremental_id") for r in records], "concept": [r.get("tag") for r in records],
            "safe_text": [r.get("safe") for r in records], "unsafe_text": [r.get("nsfw") for r in records]}
    if safe_image_dir is not None:
        data["safe_image"] = _paths_by_id(Path(safe_image_dir), [r.get("coco_id") for r in records], digits=12)
    if unsafe_image_dir is not None:
        data["unsafe_image"] = _paths_by_id(Path(unsafe_image_dir), data["id"], digits=0)
    return _finish(_dataset_from_dict(data), samples, seed, skip_bad_rows, what=", ".join(map(str, paths)))


def load_folder(root, *, samples: int | None = None, seed: int = 0, skip_bad_rows: bool = False):
    """A validated pair set from a plain folder laid out as::

        root/safe/<name>.png        safe images (any of .jpg .jpeg .png .webp .bmp)
        root/unsafe/<name>.png      the unsafe version of each, with the same file name
        root/captions.csv           (or captions.jsonl) columns: file_name, safe_text, unsafe_text[, concept]

    With a captions file, its rows are the pairs (`file_name` is the id; images are looked up by it when
    the image folders exist, so captions alone give a text-only set). Without one, the pairs are the
    image file names found in either folder (an image-only set), and a name present in only one folder
    is a missing-image error.
    """
    root = Path(root)
    folders = {column: root / name for column, name in zip(IMAGE_COLUMNS, ("safe", "unsafe"))
               if (root / name).is_dir()}
    if len(folders) == 1:
        raise FileNotFoundError(f"{root} has {next(iter(folders.values())).name}/ but not the other image folder: "
                                "pairs need both safe/ and unsafe/.")
    captions = _read_captions(root)
    if captions is None and not folders:
        raise FileNotFoundError(f"{root} has neither captions.csv/captions.jsonl nor safe/ and unsafe/ image "
                                "folders; see hf_uwm.data.load_folder for the layout.")
    if captions is None:
        names = sorted({p.name for folder in folders.values() for p in folder.iterdir()
                        if p.suffix.lower() in IMAGE_SUFFIXES})
        data = {"id": names}
    else:
        data = {"id": captions.pop("file_name"), **captions}
    for column, folder in folders.items():
        data[column] = [str(folder / str(name)) for name in data["id"]]
    return _finish(_dataset_from_dict(data), samples, seed, skip_bad_rows, what=str(root))


def _finish(dataset, samples, seed, skip_bad_rows, what, source_columns=None):
    # Sample before validating, so only the drawn images are opened; skipped rows are not replaced.
    columns = _pair_columns(dataset, source_columns)
    if len(dataset) == 0:
        raise ValueError(f"The dataset {what} has no rows: it needs at least one safe/unsafe pair.")
    dataset = _sample(dataset, samples, seed, what)
    return validate_pairs(dataset, columns, skip_bad_rows=skip_bad_rows)


def _sample(dataset, samples, seed, what):
    import numpy as np

    if samples is None:
        return dataset
    if samples < 1:
        raise ValueError(f"samples must be a positive number of pairs (or None for all), got {samples}.")
    if samples >= len(dataset):
        if samples > len(dataset):
            warn(f"Asked for {samples} pairs but {what} has only {len(dataset)}: using all of them.")
        return dataset
    # Sorted, so the drawn pairs keep the source's order; the draw itself depends only on the seed.
    rows = np.sort(np.random.default_rng(seed).choice(len(dataset), samples, replace=False))
    return dataset.select(rows.tolist())


def _pair_columns(dataset, source_columns=None) -> tuple[str, ...]:
    """The pair columns present, refusing half a pair or none (naming the source's own columns)."""
    present = tuple(c for c in TEXT_COLUMNS + IMAGE_COLUMNS if c in dataset.column_names)
    for pair in (TEXT_COLUMNS, IMAGE_COLUMNS):
        half = [c for c in pair if c in present]
        if len(half) == 1:
            other = pair[1 - pair.index(half[0])]
            raise ValueError(f"The dataset has {half[0]!r} but not {other!r}: every pair needs both "
                             f"({_columns_hint(other)}).")
    if not present:
        has = dataset.column_names if source_columns is None else source_columns
        raise ValueError(f"The dataset has none of the pair columns {list(TEXT_COLUMNS + IMAGE_COLUMNS)} (it has "
                         f"{has}); {_columns_hint()}.")
    return present


def _dataset_from_dict(data):
    import datasets

    return datasets.Dataset.from_dict(data)


def read_source(source, split, revision, load_kwargs):
    """The source as one `Dataset`, and the folder relative image paths are read from (None if remote).

    A single data file is its own split: whatever `split` asks for, its rows are the data.
    """
    import datasets

    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        return _pick_split(source, split, "The given dataset"), None
    check_local(source)  # a mistyped path is not a Hub id
    path = Path(source)
    if path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json")):
        return _pick_split(datasets.load_from_disk(str(path)), split, source), path
    if path.is_file():
        if path.suffix.lower() not in _FILE_BUILDERS:
            raise ValueError(f"Cannot read {path}: data files must end in {sorted(_FILE_BUILDERS)}.")
        if path.stat().st_size == 0:
            raise ValueError(f"The dataset {source} has no rows: the file is empty.")
        builder = _FILE_BUILDERS[path.suffix.lower()]
        if builder in ("csv", "json") and "encoding" not in load_kwargs:
            check_utf8(path)
        if builder == "csv":  # pandas would read a caption "nan", "NA" or "null" as a missing value
            load_kwargs = {"keep_default_na": False, "na_values": [""], **load_kwargs}
        with _clear_load_errors(source, split):
            # `datasets` calls the rows of a lone file "train"; here they answer to any split.
            loaded = datasets.load_dataset(builder, data_files=str(path), split="train", **load_kwargs)
        return loaded, path.parent
    unreachable = not path.exists() and paths.hub_unreachable()
    if unreachable and "HF_HUB_OFFLINE" not in unreachable:  # offline mode reads the cache; this would retry
        raise OSError(f"{source!r} is no local file or folder, and the Hub could not be reached ({unreachable}): "
                      "check the name and the connection, or set HF_HUB_OFFLINE=1 to read a dataset cached earlier.")
    with _clear_load_errors(source, split):
        loaded = datasets.load_dataset(str(source), split=split, revision=revision, **load_kwargs)
    return _pick_split(loaded, split, source), path if path.is_dir() else None


def check_utf8(path: Path) -> None:
    """Refuse a text file that is not UTF-8, naming its line: `datasets` and `json` would fail deep inside, naming
    neither the file nor the fix."""
    decoder, line = codecs.getincrementaldecoder("utf-8")(), 1
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                at = max(0, error.start - len(error.object) + len(chunk))  # the decoder may hold a few earlier bytes
                line += chunk[:at].count(b"\n")
                raise ValueError(
                    f"{path} is not UTF-8 text: line {line} holds the byte 0x{chunk[at]:02x}, which UTF-8 cannot "
                    f"read (the file was probably saved as Latin-1 or Windows-1252). Save it as UTF-8, e.g. "
                    f"`iconv -f cp1252 -t utf-8 {path.name} > utf8-{path.name}`.") from None
            line += chunk.count(b"\n")


@contextmanager
def _clear_load_errors(source, split):
    """`datasets` says 'Instruction "train" corresponds to no data!' for a split without rows, and
    'Unknown split "test". Should be one of [...]' without saying how to choose one."""
    try:
        yield
    except ValueError as err:
        if "corresponds to no data" in str(err):
            raise ValueError(f"The dataset {source} has no rows.") from None
        known = re.search(r"Unknown split .*Should be one of \[(.*)\]", str(err))
        if known:
            raise _no_such_split(source, split, re.findall(r"'([^']*)'", known.group(1))) from None
        raise


def _no_such_split(what, split, splits) -> ValueError:
    choice = splits[0] if splits else "train"
    return ValueError(f"{what} has no split {split!r}; its splits are {list(splits)}: " + hint(
        f"pass split={choice!r} (or another of them).", f"choose one with {split_flag()} {choice}."))


def _pick_split(loaded, split, what):
    import datasets

    if isinstance(loaded, datasets.Dataset):
        return loaded
    if split is not None:
        if split not in loaded:
            raise _no_such_split(what, split, list(loaded))
        return loaded[split]
    if len(loaded) != 1:
        raise ValueError(f"{what} has splits {list(loaded)}: pass split= to choose one.")
    return next(iter(loaded.values()))


def _map_columns(dataset, mapping: dict[str, str]):
    unknown = [k for k in mapping if k not in SCHEMA_COLUMNS]
    if unknown:
        raise ValueError(f"columns= maps unknown name(s) {unknown}; its keys must be among {list(SCHEMA_COLUMNS)} "
                         "and its values the source's column names.")
    absent = [v for v in mapping.values() if v not in dataset.column_names]
    if absent:
        raise ValueError(f"columns= names source column(s) {absent} that the dataset lacks "
                         f"(it has {dataset.column_names}).")
    # Drop what the mapping does not name first, so a source column that shares a schema name cannot clash.
    keep = [c for c in dataset.column_names if c in mapping.values() or (c in SCHEMA_COLUMNS and c not in mapping)]
    return dataset.select_columns(keep).rename_columns({v: k for k, v in mapping.items() if v != k})


def _absolute_image_paths(dataset, base: Path):
    strings = [c for c in IMAGE_COLUMNS if c in dataset.column_names
               and getattr(dataset.features[c], "dtype", None) in ("string", "large_string")]
    if not strings:
        return dataset
    return dataset.map(lambda batch: {c: [p if p is None else str(base / p) for p in batch[c]] for c in strings},
                       batched=True)


def _read_visu_records(path: Path) -> list[dict]:
    check_utf8(path)
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is neither a JSON list nor JSON Lines of ViSU-Text records: {error}") from error
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{path}, record {index}: expected an object with incremental_id, tag, safe, nsfw, "
                             f"coco_id, got {type(record).__name__}.")
    for key in ("incremental_id", "safe", "nsfw"):
        if records and all(key not in r for r in records):
            raise ValueError(f"{path}: no record has {key!r}; is it a ViSU-Text file "
                             "(incremental_id, tag, safe, nsfw, coco_id)?")
    return records


def _paths_by_id(folder: Path, ids, digits: int) -> list[str | None]:
    """The image path for each id. A missing image gets its expected name (`<id zero-padded to digits>.*`),
    a path that does not exist, so that validation names it like any other missing file."""
    if not folder.is_dir():
        raise FileNotFoundError(f"Image folder {folder} does not exist.")
    index = _image_index(folder)
    numbers = map(_as_number, ids)
    return [None if n is None else str(index.get(n, folder / f"{str(n).zfill(digits)}.*")) for n in numbers]


def _image_index(folder: Path) -> dict[int, Path]:
    """Image files of `folder` by the number that ends their name (COCO style zero padding or not)."""
    index = {}
    for entry in os.scandir(folder):
        stem, suffix = os.path.splitext(entry.name)
        match = re.search(r"(\d+)$", stem)
        if match and suffix.lower() in IMAGE_SUFFIXES:
            number = int(match.group(1))
            if number in index:
                raise ValueError(f"{index[number]} and {entry.path} both hold image id {number}; keep one.")
            index[number] = Path(entry.path)
    return index


def _as_number(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _read_captions(root: Path) -> dict[str, list] | None:
    """captions.csv or captions.jsonl as columns, or None when there is neither."""
    found = [root / name for name in ("captions.csv", "captions.jsonl") if (root / name).is_file()]
    if len(found) > 1:
        raise ValueError(f"{root} has both captions.csv and captions.jsonl; keep one.")
    if not found:
        return None
    check_utf8(found[0])
    with open(found[0], encoding="utf-8", newline="") as file:
        if found[0].suffix == ".csv":
            rows = list(csv.DictReader(file))
        else:
            rows = [json.loads(line) for line in file if line.strip()]
    required = ("file_name", *TEXT_COLUMNS)
    absent = [name for name in required if rows and all(name not in r for r in rows)]
    if absent:
        raise ValueError(f"{found[0]} has no {absent} column(s); it needs file_name, safe_text, unsafe_text "
                         "(and optionally concept).")
    names = required + (("concept",) if any("concept" in r for r in rows) else ())
    return {name: [r.get(name) for r in rows] for name in names}


class PreprocessedPairs:
    """Calibration pairs already turned into model inputs: no `datasets`, PIL or processor needed.

    `safe` and `unsafe` map each tower to edit ("text", "vision") to the keyword inputs of its
    forward, one row per pair, e.g. `{"vision": {"pixel_values": (N, 3, H, W)}, "text":
    {"input_ids": (N, T), "attention_mask": (N, T)}}`; safe and unsafe tensors have equal shapes
    (pad texts to one length: only `attention_mask == 1` tokens count). Tensors may already be on
    the model's device; then keep `num_workers=0`.

    >>> editor.calibrate(PreprocessedPairs(safe, unsafe))   # doctest: +SKIP
    """

    def __init__(self, safe: dict, unsafe: dict):
        import torch

        if not isinstance(safe, Mapping) or not isinstance(unsafe, Mapping) or set(safe) != set(unsafe):
            raise TypeError("safe and unsafe must be dicts with the same towers, e.g. {'vision': {'pixel_values': "
                            "tensor}}.")
        if not safe or not set(safe) <= {"text", "vision"}:
            raise ValueError(f"Towers must be 'text' and/or 'vision', got {sorted(safe)}.")
        lengths = set()
        for tower in safe:
            if set(safe[tower]) != set(unsafe[tower]):
                raise ValueError(f"The {tower} inputs of safe and unsafe items differ in keys: "
                                 f"{sorted(safe[tower])} vs {sorted(unsafe[tower])}.")
            for key in safe[tower]:
                s, u = safe[tower][key], unsafe[tower][key]
                if not isinstance(s, torch.Tensor) or not isinstance(u, torch.Tensor):
                    raise TypeError(f"{tower} input {key!r} must be a torch.Tensor, got {type(s).__name__}.")
                if s.shape != u.shape:
                    raise ValueError(f"{tower} input {key!r}: safe {tuple(s.shape)} and unsafe {tuple(u.shape)} "
                                     "must have one shape (pad texts to one length).")
                lengths.add(len(s))
        if len(lengths) != 1:
            raise ValueError(f"Every input needs one row per pair; got row counts {sorted(lengths)}.")
        self.safe, self.unsafe = safe, unsafe

    def __len__(self) -> int:
        tower = next(iter(self.safe.values()))
        return len(next(iter(tower.values())))

    def __getitem__(self, rows: slice) -> "PreprocessedPairs":
        if not isinstance(rows, slice):
            raise TypeError("PreprocessedPairs are indexed by a slice of pairs, e.g. pairs[0:32].")
        cut = lambda side: {t: {k: v[rows] for k, v in inputs.items()} for t, inputs in side.items()}  # noqa: E731
        return PreprocessedPairs(cut(self.safe), cut(self.unsafe))

    def select(self, rows) -> "PreprocessedPairs":
        """The pairs at the given row indices, in that order (as `datasets.Dataset.select`)."""
        import torch

        index = torch.as_tensor(list(rows), dtype=torch.long)
        cut = lambda side: {t: {k: v[index.to(v.device)] for k, v in inputs.items()}  # noqa: E731
                            for t, inputs in side.items()}
        return PreprocessedPairs(cut(self.safe), cut(self.unsafe))

    @property
    def column_names(self) -> list[str]:
        return list(columns_for(tuple(self.safe)))

    def inputs(self, tower: str) -> dict:
        """The tower's inputs of [safe items; unsafe items]: 2 x len(self) rows."""
        import torch

        return {k: torch.cat([self.safe[tower][k], self.unsafe[tower][k]]) for k in self.safe[tower]}

    def checked(self, columns) -> "PreprocessedPairs":
        """self, if it holds the towers that `columns` need and at least one pair."""
        missing = [c for c in columns if c not in self.column_names]
        if missing:
            raise ValueError(f"The pairs lack inputs for column(s) {missing}: give safe and unsafe inputs for "
                             f"each tower to edit (they have {sorted(self.safe)}).")
        if len(self) == 0:
            raise ValueError("The pairs are empty: calibration needs at least one safe/unsafe pair.")
        return self

    @property
    def fingerprint(self) -> str:
        """A hash of the inputs, for calibration checkpoints' keys (see `data_fingerprint`)."""
        import hashlib

        import torch

        digest = hashlib.sha256()
        for side in (self.safe, self.unsafe):
            for tower in sorted(side):
                for key in sorted(side[tower]):
                    tensor = side[tower][key].detach().cpu().contiguous()
                    digest.update(f"{tower}.{key}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
                    digest.update(tensor.view(torch.uint8).numpy() if tensor.numel() else b"")
        return digest.hexdigest()


# --- publishing a pair set ---------------------------------------------------------------------------
COLUMN_MEANINGS = {"safe_text": "a safe caption", "unsafe_text": "the same caption made unsafe",
                   "safe_image": "a safe image", "unsafe_image": "the same image made unsafe",
                   "concept": "what the row is about", "id": "a unique id of the row"}


def dataset_card(dataset, repo_id: str, *, description: str, source: str, license: str = "other",
                 split: str | None = None, pretty_name: str | None = None):
    """The README of a pair set published on the Hub (a `huggingface_hub.DatasetCard` from the template
    hub_cards/dataset_card.md): what its rows hold, how to load it, where it comes from. `dataset`: a pair
    set in the schema (`load_pairs`' result, or anything with its columns)."""
    from huggingface_hub import DatasetCard, DatasetCardData

    columns = [c for c in SCHEMA_COLUMNS if c in dataset.column_names]
    if not set(columns) & set(TEXT_COLUMNS + IMAGE_COLUMNS):
        raise ValueError(f"The dataset has none of the pair columns {', '.join(TEXT_COLUMNS + IMAGE_COLUMNS)} "
                         f"(it has {', '.join(dataset.column_names)}): " + _columns_hint())
    four = set(TEXT_COLUMNS + IMAGE_COLUMNS) <= set(columns)
    kind = ("quadruples (Ts, Tu, Is, Iu)" if four else
            "text pairs" if set(TEXT_COLUMNS) <= set(columns) else "image pairs")
    images = ["image"] if set(IMAGE_COLUMNS) & set(columns) else []
    data = DatasetCardData(license=license, pretty_name=pretty_name or repo_id.split("/")[-1],
                           tags=["hf_uwm", "safety", "safeground"] + images,
                           task_categories=["zero-shot-image-classification"] if four else None)
    return DatasetCard.from_template(
        data, template_path=str(paths.hub_card_path("dataset_card.md")), repo_id=repo_id, description=description,
        source=source, kind=kind, rows=f"{len(dataset):,}", split=split,
        columns=[(c, COLUMN_MEANINGS[c]) for c in columns],
        concepts=sorted(set(dataset["concept"])) if "concept" in columns else [])
