"""Reader for one's own data: a CSV / JSONL / parquet table, or a folder with one subfolder per class."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import pandas as pd

from .base import IMAGE_EXTENSIONS, absolute_path, build_dataset, handle_missing, read_table, require_dir


def image_folder(root: Path, class_names: Sequence[str]) -> tuple[pd.DataFrame, np.ndarray]:
    """Images in ``root/<class>/`` for each of ``class_names`` -> (frame with ``image``, class indices).

    Any other subfolder is an error, so a misnamed class folder is not silently skipped.
    """
    root = require_dir(root, "image folder")
    unexpected = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in class_names)
    if unexpected:
        raise ValueError(f"{root}: unexpected subfolder(s) {unexpected}; class folders are {list(class_names)}")
    images, classes = [], []
    for index, name in enumerate(class_names):
        folder = root / name
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) if folder.is_dir() else []
        images += [str(p) for p in found]
        classes += [index] * len(found)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {root}")
    return pd.DataFrame({"image": images, "report": ""}), np.array(classes, dtype=np.int64)


def one_hot(classes: np.ndarray, n: int) -> np.ndarray:
    return np.eye(n, dtype=np.float32)[classes]


def generic(
    data_files: str | os.PathLike,
    image_column: str = "image",
    report_column: str | None = None,
    label_columns: Sequence[str] = (),
    image_root: str | os.PathLike | None = None,
    split: str | None = None,
    split_column: str = "split",
    dataset_name: str = "generic",
    on_missing: str = "raise",
    check_images: bool = True,
) -> datasets.Dataset:
    """Read one's own dataset into the common schema.

    A **file** (``.csv``/``.csv.gz``, ``.jsonl``, ``.parquet``): one row per image.
    ``image_column`` holds paths (relative ones are resolved against ``image_root``, default the
    file's folder); ``report_column`` the report text (blank -> ""); each of ``label_columns`` is
    0/1 with missing/blank -> NaN (any other value is an error). Task: "binary" for one label
    column, else "multilabel". Split: rows whose ``split_column`` equals ``split`` when the file
    has that column; a file without it is taken whole.

    A **folder**: one subfolder per class (sorted names), multi-class with a ``label`` column;
    ``split`` picks the subfolder ``<folder>/<split>`` when it exists.
    """
    path = absolute_path(data_files)
    if path.is_dir():
        root = path / split if split and (path / split).is_dir() else path
        class_names = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not class_names:
            raise ValueError(f"{root}: an image folder needs one subfolder per class")
        frame, classes = image_folder(root, class_names)
        frame["label"] = classes
        return build_dataset(frame, one_hot(classes, len(class_names)), dataset_name, class_names, "multiclass")

    label_columns = list(label_columns)
    required = [image_column, *label_columns] + ([report_column] if report_column else [])
    table = read_table(path, required, "data file")
    if split is not None and split_column in table:
        table = table[table[split_column] == split]
    root = absolute_path(image_root) if image_root else path.parent
    # os.path.join keeps absolute paths as they are.
    table = table.assign(image=[os.path.normpath(os.path.join(root, p)) for p in table[image_column].astype(str)])
    if check_images:
        table = handle_missing(table, ["image"], on_missing, dataset_name)
    frame = pd.DataFrame(
        {
            "image": table["image"].to_numpy(),
            "report": table[report_column].fillna("").astype(str).to_numpy() if report_column else "",
        }
    )
    label_matrix = np.zeros((len(frame), 0), np.float32)
    if label_columns:
        label_matrix = np.stack([_binary_column(table[c], path) for c in label_columns], axis=1)
    task = "binary" if len(label_columns) == 1 else "multilabel"
    return build_dataset(frame, label_matrix, dataset_name, label_columns, task)


def _binary_column(column: pd.Series, path: Path) -> np.ndarray:
    """0/1 (numbers, booleans or their strings) -> float32, blank -> NaN; anything else raises."""
    text = column.astype(object).where(column.notna(), "").astype(str).str.strip().str.lower()
    codes = {"": np.nan, "0": 0.0, "1": 1.0, "0.0": 0.0, "1.0": 1.0, "false": 0.0, "true": 1.0, "nan": np.nan}
    bad = sorted(set(text) - codes.keys())
    if bad:
        raise ValueError(f"{path}: label column {column.name!r} must hold 0/1 or blank; found {bad[:5]}")
    return text.map(codes).to_numpy(np.float32)
