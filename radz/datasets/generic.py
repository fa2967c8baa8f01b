"""Reader for one's own data: a CSV / JSONL / parquet table, or a folder with one subfolder per class."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import pandas as pd

from .base import IMAGE_EXTENSIONS, absolute_path, build_dataset, handle_missing, label_codes, read_table, require_dir


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
    label_names: Sequence[str] = (),
) -> datasets.Dataset:
    """Read one's own dataset into the common schema.

    A **file** (``.csv``/``.csv.gz``, ``.jsonl``, ``.parquet``): one row per image, read by :func:`table_dataset`
    (the columns, the label codes, relative paths against ``image_root``, default the file's folder). Split: rows
    whose ``split_column`` equals ``split`` when the file has that column; a file without it is taken whole.

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

    required = [image_column, *label_columns] + ([report_column] if report_column else [])
    table = read_table(path, required + (["labels"] if label_names else []), "data file")
    if split is not None and split_column in table:
        table = table[table[split_column] == split]
    return table_dataset(
        table, image_root or path.parent, image_column, report_column, label_columns, label_names, dataset_name,
        on_missing, check_images, source=str(path),
    )  # fmt: skip


def table_dataset(
    table: pd.DataFrame,
    image_root: str | os.PathLike,
    image_column: str = "image",
    report_column: str | None = None,
    label_columns: Sequence[str] = (),
    label_names: Sequence[str] = (),
    dataset_name: str = "generic",
    on_missing: str = "raise",
    check_images: bool = True,
    source: str = "table",
) -> datasets.Dataset:
    """A table (one row per image) in the common schema.

    ``image_column`` holds paths, relative ones resolved against ``image_root``; ``report_column`` the report text
    (blank -> ""; None: no reports). Labels: each of ``label_columns`` holds one label, or a ``labels`` column holds
    lists whose entries ``label_names`` names; the values go through :data:`LABEL_CODES` (1 / 0, blank and -1 ->
    NaN; anything else is an error naming ``source``). Task: "binary" for one label, else "multilabel".
    """
    label_columns, label_names = list(label_columns), list(label_columns or label_names)
    root = absolute_path(image_root)
    # os.path.join keeps absolute paths as they are.
    table = table.assign(image=[os.path.normpath(os.path.join(root, p)) for p in table[image_column].astype(str)])
    if check_images:
        table = handle_missing(table, ["image"], on_missing, dataset_name)
    reports = table[report_column].astype(object) if report_column else pd.Series("", index=table.index)
    frame = pd.DataFrame(
        {"image": table["image"].to_numpy(), "report": reports.where(reports.notna(), "").astype(str).to_numpy()}
    )
    if label_columns:
        matrix = np.stack([label_codes(table[c], f"{source}: label column {c!r}") for c in label_columns], axis=1)
    elif label_names:
        matrix = _label_lists(table["labels"], len(label_names), source)
    else:
        matrix = np.zeros((len(frame), 0), np.float32)
    task = "binary" if len(label_names) == 1 else "multilabel"
    return build_dataset(frame, matrix.reshape(len(frame), len(label_names)), dataset_name, label_names, task)


def _label_lists(column: pd.Series, num_labels: int, source: str) -> np.ndarray:
    """A column of label lists (one entry per label name) -> `[N, num_labels]` through `label_codes`."""
    rows = []
    for row, values in enumerate(column):
        if values is None or np.ndim(values) != 1 or len(values) != num_labels:
            count = None if values is None else np.size(values)
            raise ValueError(f"{source}: row {row}: `labels` has {count} entries, expected {num_labels}")
        rows.append(list(values))
    flat = [value for values in rows for value in values]
    return label_codes(flat, f"{source}: `labels` column").reshape(len(rows), num_labels)


TABLE_SUFFIXES = (".jsonl", ".csv", ".parquet", ".csv.gz")
LABEL_NAMES_FILE = "label_names.json"


def generic_split(
    data_dir: str | os.PathLike, split: str, labels: Sequence[str] | None = None, whole_folder: bool = True
) -> tuple[str, dict]:
    """Where the generic reader reads `split` from, and the arguments it needs:

    - a folder holding `<split>.jsonl|csv|parquet` (the phantom layout) reads that file, with the label columns from
      `labels` or the folder's `label_names.json`;
    - an image folder reads `<split>/<class>/`; the class folders directly under it only with `whole_folder` (never
      for a validation split: that would choose thresholds on the evaluated images);
    - a table file is read as it is (its `split` column, if any, picks the rows).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return str(data_dir), {"split": split} | ({} if labels is None else {"label_columns": list(labels)})
    table = next((data_dir / f"{split}{s}" for s in TABLE_SUFFIXES if (data_dir / f"{split}{s}").is_file()), None)
    if table is not None:
        names_file = data_dir / LABEL_NAMES_FILE
        if labels is None and names_file.is_file():
            labels = json.loads(names_file.read_text())
        if not labels:
            raise ValueError(f"{table}: name the label columns (--labels), or write them to {LABEL_NAMES_FILE}")
        return str(table), {"label_columns": list(labels), "split": None}
    if any(next(data_dir.glob(f"*{suffix}"), None) for suffix in TABLE_SUFFIXES):
        raise FileNotFoundError(f"{data_dir}: no {split}.jsonl / .csv / .parquet")
    if not (data_dir / split).is_dir() and not whole_folder:
        raise FileNotFoundError(f"{data_dir}: no {split}/ folder")
    return str(data_dir), {"split": split}
