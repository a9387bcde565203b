"""The calibration/evaluation schema (SPEC §5) and its validation."""

from __future__ import annotations

TEXT_COLUMNS = ("safe_text", "unsafe_text")
IMAGE_COLUMNS = ("safe_image", "unsafe_image")


def columns_for(towers) -> tuple[str, ...]:
    """The columns a calibration set needs to edit these towers."""
    needed = ()
    if "text" in towers:
        needed += TEXT_COLUMNS
    if "vision" in towers:
        needed += IMAGE_COLUMNS
    return needed


def validate_pairs(dataset, columns):
    """Return `dataset` as a `datasets.Dataset` after checking `columns`; raise a clear error otherwise."""
    import datasets

    if isinstance(dataset, dict):
        lengths = {k: len(v) for k, v in dataset.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"Columns have different lengths {lengths}: every column needs one value per pair.")
        dataset = datasets.Dataset.from_dict(dataset)
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"Expected a datasets.Dataset (or a dict of columns), got {type(dataset).__name__}.")
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"The dataset lacks column(s) {missing} (it has {dataset.column_names}); rename "
                         "columns with dataset.rename_column or use hf_uwm.data loaders with a column mapping.")
    if len(dataset) == 0:
        raise ValueError("The dataset is empty: calibration needs at least one safe/unsafe pair.")
    for column in columns:
        if column in TEXT_COLUMNS:
            for row, text in enumerate(dataset[column]):
                if not isinstance(text, str) or not text.strip():
                    raise ValueError(f"Column {column!r}, row {row}: expected a non-empty string, got {text!r}.")
    return dataset
