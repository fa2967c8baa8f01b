"""Shared pieces of the dataset readers: CSV loading, file checks and the common ``Dataset`` schema.

Every reader returns a ``datasets.Dataset`` with

* ``image``  -- absolute path of the image file (pixels are decoded later, never here);
* ``report`` -- free-text report, ``""`` where the format has none;
* ``labels`` -- float32 list aligned with the dataset's label names: 1.0 positive, 0.0 negative,
  NaN unknown or ignored;
* ``label``  -- int class index, for multi-class sets only;
* extra per-format columns (patient id, view, MeSH terms, ...).

``ds.info.description`` holds ``{"dataset", "label_names", "task"}`` as JSON; it survives
``select``, ``filter``, ``map`` and ``save_to_disk``/``load_from_disk``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

TASKS = ("multilabel", "binary", "multiclass")
ON_MISSING = ("raise", "drop", "warn")
UNCERTAIN_POLICIES = ("ones", "zeros", "ignore")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".bmp", ".tif", ".tiff")
# Names accepted by the readers whose format has no split of its own: they mean "the whole labelled set".
WHOLE_SET = (None, "all", "train")
_SHOWN = 5  # how many missing paths an error or warning lists


def dataset_metadata(ds: datasets.Dataset) -> dict:
    """Return ``{"dataset", "label_names", "task"}`` stored by a reader in ``ds.info.description``."""
    try:
        meta = json.loads(ds.info.description or "")
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or not {"dataset", "label_names", "task"} <= meta.keys():
        raise ValueError("this Dataset was not built by a radz.datasets reader (no metadata in info.description)")
    return meta


def require_file(path: str | os.PathLike, what: str) -> Path:
    """Return ``path`` as a Path, or raise FileNotFoundError naming it and what it should hold."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def find_file(directory: Path, *names: str) -> Path:
    """First of ``directory/name`` (or its ``.gz``) that exists, else the first name (for the error message)."""
    for name in names:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return directory / names[0]


def absolute_path(path: str | os.PathLike) -> Path:
    """``~`` expanded and made absolute, without resolving symlinks (image paths stay as the user laid them out)."""
    return Path(os.path.abspath(os.path.expanduser(path)))


def require_dir(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def check_columns(frame: pd.DataFrame, required: Iterable[str], path: str | os.PathLike) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")


def read_table(path: str | os.PathLike, required: Sequence[str] = (), what: str = "label file") -> pd.DataFrame:
    """Read a CSV (optionally gzipped), JSONL/JSON-lines or parquet file and check its header.

    Header names are stripped of surrounding spaces, because some real files have them
    (SIIM's ``ImageId, EncodedPixels``).
    """
    path = require_file(path, what)
    name = path.name.lower()
    if name.endswith(".parquet"):
        frame = pd.read_parquet(path)
    elif name.endswith((".jsonl", ".json", ".jsonl.gz")):
        frame = pd.read_json(path, lines=True)
    else:
        frame = pd.read_csv(path)  # also .gz / single-file .zip, by suffix
    frame.columns = [str(c).strip() for c in frame.columns]
    check_columns(frame, required, path)
    return frame


def check_split(split: str | None, dataset: str) -> None:
    """Reject split names for formats that ship a single labelled set (so it is not mistaken for a test set)."""
    if split not in WHOLE_SET:
        raise ValueError(
            f"{dataset} has no official {split!r} split: its label file is one labelled set; "
            f"use split=None (or 'all'/'train') and split it yourself"
        )


def read_split_list(path: Path, dataset: str) -> set[str]:
    """Read a one-name-per-line split list (NIH ``train_val_list.txt`` / ``test_list.txt``)."""
    path = require_file(path, f"{dataset} split list")
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def index_files(root: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> dict[str, Path]:
    """Map file name -> path for every file under ``root`` (recursively) with one of ``extensions``."""
    found: dict[str, Path] = {}
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            if filename.lower().endswith(tuple(extensions)):
                found.setdefault(filename, Path(dirpath) / filename)
    return found


def uncertain_to(values: np.ndarray, uncertain: str) -> np.ndarray:
    """CheXpert-style codes (1, 0, -1 uncertain, NaN blank) -> 1/0/NaN.

    Blank means "not mentioned in the report" and becomes 0, as CheXpert, MIMIC-CXR-JPG and
    torchxrayvision treat it; -1 follows ``uncertain``: "ones" -> 1, "zeros" -> 0, "ignore" -> NaN.
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain must be one of {UNCERTAIN_POLICIES}, got {uncertain!r}")
    out = np.nan_to_num(values.astype(np.float32), nan=0.0)
    out[out == -1] = {"ones": 1.0, "zeros": 0.0, "ignore": np.nan}[uncertain]
    bad = sorted(set(np.unique(out[~np.isnan(out)]).tolist()) - {0.0, 1.0})
    if bad:
        raise ValueError(f"unexpected label codes {bad}; expected 1, 0, -1 or blank")
    return out


# The one table of label codes of free-form tables (the generic reader, training files): every spelling of 1, 0 and
# blank, and CheXpert's -1 ("uncertain"), which is unknown here (NaN) as `uncertain="ignore"` makes it for CheXpert.
LABEL_CODES = {
    "1": 1.0, "1.0": 1.0, "true": 1.0,
    "0": 0.0, "0.0": 0.0, "false": 0.0,
    "": np.nan, "nan": np.nan, "none": np.nan, "-1": np.nan, "-1.0": np.nan,
}  # fmt: skip


def label_codes(values: Sequence, where: str) -> np.ndarray:
    """Label values (numbers, booleans, their strings, None/NaN) -> float32 1/0/NaN through `LABEL_CODES`;
    anything else raises a ValueError naming `where` (the file and the column) and the bad values."""
    text = pd.Series(values, dtype=object)
    text = text.where(text.notna(), "").astype(str).str.strip().str.lower()
    bad = sorted(set(text) - LABEL_CODES.keys())
    if bad:
        raise ValueError(f"{where}: labels must be 1, 0, -1 (uncertain) or blank; found {bad[:5]}")
    return text.map(LABEL_CODES).to_numpy(np.float32)


def handle_missing(frame: pd.DataFrame, path_columns: Sequence[str], on_missing: str, dataset: str) -> pd.DataFrame:
    """Check that the files named in ``path_columns`` exist.

    ``on_missing="raise"`` raises FileNotFoundError with the count and the first few paths;
    ``"drop"`` removes those rows and logs a warning; ``"warn"`` keeps them and logs a warning.
    """
    if on_missing not in ON_MISSING:
        raise ValueError(f"on_missing must be one of {ON_MISSING}, got {on_missing!r}")
    present = np.ones(len(frame), dtype=bool)
    for column in path_columns:
        paths = tqdm(frame[column], desc=f"{dataset}: checking {column}", unit="file", leave=False)
        present &= np.fromiter((os.path.isfile(p) for p in paths), dtype=bool, count=len(frame))
    n_missing = int((~present).sum())
    if n_missing == 0:
        return frame
    first = [p for column in path_columns for p in frame.loc[~present, column] if not os.path.isfile(p)][:_SHOWN]
    message = f"{dataset}: {n_missing} of {len(frame)} rows have missing files; first few: {first}"
    if on_missing == "raise":
        raise FileNotFoundError(message + " (pass on_missing='drop' to skip them, or 'warn' to keep them)")
    logger.warning("%s (%s)", message, "dropped" if on_missing == "drop" else "kept")
    return frame[present].reset_index(drop=True) if on_missing == "drop" else frame


def build_dataset(
    frame: pd.DataFrame,
    labels: np.ndarray,
    dataset: str,
    label_names: Sequence[str],
    task: str,
) -> datasets.Dataset:
    """Assemble the common schema from ``frame`` (``image``, ``report`` and extra columns) and a
    ``[n, len(label_names)]`` label matrix; store the metadata in ``info.description``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    labels = np.asarray(labels, dtype=np.float32).reshape(len(frame), len(label_names))
    # Built straight from numpy: far faster than python lists for the 100k+-row label files.
    offsets = pa.array(np.arange(len(frame) + 1, dtype=np.int32) * len(label_names))
    columns = {
        "image": pa.array(frame["image"].map(str).tolist(), type=pa.string()),
        "report": pa.array(frame["report"].fillna("").tolist(), type=pa.string()),
        "labels": pa.ListArray.from_arrays(offsets, pa.array(labels.ravel(), type=pa.float32())),
    }
    for name in frame.columns:
        if name not in columns:
            values = frame[name].astype(object)
            columns[name] = pa.array(values.where(values.notna(), None).tolist())  # blanks -> nulls
    table = pa.table(columns)
    description = json.dumps({"dataset": dataset, "label_names": list(label_names), "task": task})
    info = datasets.DatasetInfo(description=description, features=datasets.Features.from_arrow_schema(table.schema))
    return datasets.Dataset(table, info=info)
