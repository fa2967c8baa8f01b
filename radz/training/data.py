"""Training data: loading into the common schema, bad-sample handling, the collator and the class-balanced sampler.

The common schema is the one of `radz.datasets`: `image` (absolute path), `report` (str) and, when labelled,
`labels` (floats, 1 positive / 0 negative / NaN unknown, aligned with the label names). Images are decoded lazily
in the collator, never up front.

Bad samples. A long run must not die on one broken file, nor silently train on a broken dataset:
- `scan_dataset` drops rows whose image file is missing or whose report is empty, before training, without
  decoding anything, and names them;
- `RadZCollator` skips rows whose image cannot be decoded (corrupt file, truncated PNG, bad DICOM), warns with the
  path and the reason, and counts them;
- both stop the run with `BadDataError` (count, fraction and the first paths) once more than `max_bad_fraction`
  of the samples seen are bad (the collator waits for `min_samples` samples, or the end of an epoch).
"""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from torch.utils.data import Sampler
from tqdm.auto import tqdm

from processing_llava_radz import RadiographError, load_radiograph

logger = logging.getLogger(__name__)

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SHOWN_PATHS = 5  # how many bad paths an error message lists


class BadDataError(RuntimeError):
    """Too many unreadable samples: the message gives the count, the fraction and the first paths."""


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def read_data_file(path: str | os.PathLike) -> datasets.Dataset:
    """A JSONL, CSV or parquet file as a `datasets.Dataset` (memory-mapped Arrow, nothing decoded)."""
    path = Path(path)
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"{path}: unsupported data file type; use one of {sorted(FILE_BUILDERS)}")
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    return datasets.load_dataset(builder, data_files=str(path), split="train")


def _label_value(value, column: str, row: int) -> float:
    """0/1 (also as strings or booleans) → float; blank, None, NaN and -1 (uncertain) → NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.nan
    text = str(value).strip().lower()
    codes = {"": math.nan, "1": 1.0, "1.0": 1.0, "true": 1.0, "0": 0.0, "0.0": 0.0, "false": 0.0}
    codes.update({"-1": math.nan, "-1.0": math.nan, "nan": math.nan})
    if text not in codes:
        raise ValueError(f"label column {column!r}, row {row}: expected 0, 1, -1 or blank, got {value!r}")
    return codes[text]


def to_common_schema(
    ds: datasets.Dataset,
    base_dir: str | os.PathLike,
    image_column: str = "image",
    report_column: str = "report",
    label_columns: list[str] = (),
    label_names: list[str] = (),
    require_report: bool = True,
) -> tuple[datasets.Dataset, list[str]]:
    """Map a table onto `image` (absolute path), `report` and `labels`; return it with its label names.

    Relative image paths are resolved against `base_dir` (the data file's folder). Labels come from the 0/1
    `label_columns`, or from a `labels` list column whose entries `label_names` names; a table with neither is
    unlabelled (L_CA only).
    """
    columns = set(ds.column_names)
    missing = [c for c in [image_column, *label_columns] if c not in columns]
    if require_report and report_column not in columns:
        missing.append(report_column)
    if missing:
        raise ValueError(f"the data lacks the column(s) {missing}; it has {sorted(columns)}")
    if label_columns:
        names = list(label_columns)
    elif "labels" in columns and label_names:
        names = list(label_names)
    elif "labels" in columns:
        raise ValueError("the data has a `labels` list column: name its entries with --class_names")
    else:
        names = []
    base_dir = str(base_dir)

    def convert(batch, indices):
        n = len(batch[image_column])
        reports = batch[report_column] if report_column in batch else [""] * n
        out = {
            # os.path.join keeps an absolute path as it is.
            "image": [os.path.normpath(os.path.join(base_dir, str(p))) for p in batch[image_column]],
            "report": ["" if r is None else str(r) for r in reports],
        }
        if label_columns:
            out["labels"] = [
                [_label_value(batch[c][i], c, row) for c in label_columns] for i, row in enumerate(indices)
            ]
        elif names:
            for row, values in zip(indices, batch["labels"]):
                if values is None or len(values) != len(names):
                    raise ValueError(f"row {row}: `labels` has {values and len(values)} entries, expected {len(names)}")
            out["labels"] = [[_label_value(v, "labels", row) for v in values] for row, values in zip(indices, batch["labels"])]
        return out

    features = {"image": datasets.Value("string"), "report": datasets.Value("string")}
    if names:
        features["labels"] = datasets.List(datasets.Value("float32"))
    ds = ds.map(
        convert, batched=True, with_indices=True, remove_columns=ds.column_names, features=datasets.Features(features)
    )
    return ds, names


def _metadata_label_names(ds: datasets.Dataset) -> list[str]:
    """Label names a `radz.datasets` reader stored in `ds.info.description`, or [] for other datasets."""
    from radz.datasets import dataset_metadata

    try:
        return list(dataset_metadata(ds)["label_names"])
    except ValueError:
        return []


def load_split(data_args, split: str) -> tuple[datasets.Dataset | None, list[str]]:
    """The `"train"` or `"validation"` split named by `DataArguments`, in the common schema, with label names."""
    train = split == "train"
    label_names = data_args.split_list(data_args.class_names)
    if data_args.train_file is not None:
        path = data_args.train_file if train else data_args.validation_file
        if path is None:
            return None, []
        raw, base_dir = read_data_file(path), Path(path).resolve().parent
    elif data_args.dataset_dir is not None:
        name = data_args.train_split if train else data_args.validation_split
        if name is None:
            return None, []
        raw = datasets.load_from_disk(data_args.dataset_dir)
        if isinstance(raw, datasets.DatasetDict):
            if name not in raw:
                raise ValueError(f"{data_args.dataset_dir}: no split {name!r}; it has {sorted(raw)}")
            raw = raw[name]
        base_dir = Path(data_args.dataset_dir).resolve()
        label_names = label_names or _metadata_label_names(raw)
    else:
        from radz.datasets import load_dataset_by_name

        name = data_args.train_split if train else data_args.validation_split
        if name is None:
            return None, []
        raw, base_dir = load_dataset_by_name(data_args.dataset_name, data_args.data_dir, split=name), data_args.data_dir
        label_names = label_names or _metadata_label_names(raw)
    ds, names = to_common_schema(
        raw,
        base_dir,
        image_column=data_args.image_column,
        report_column=data_args.report_column,
        label_columns=data_args.split_list(data_args.label_columns),
        label_names=label_names,
        require_report=train,
    )
    if train and data_args.max_train_samples is not None:
        ds = ds.select(range(min(data_args.max_train_samples, len(ds))))
    return ds, names


# ----------------------------------------------------------------------------------------------------------------
# Bad samples
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class BadSampleLog:
    """Counts samples seen and bad ones (with path and reason); raises once the bad fraction is too high."""

    max_bad_fraction: float = 0.05
    min_samples: int = 20
    seen: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)

    def record(self, path: str, reason: str):
        self.bad.append((path, reason))
        logger.warning("skipping bad sample %s: %s (%d bad of %d seen so far)", path, reason, len(self.bad), self.seen)

    def check(self, final: bool = False, what: str = "samples seen so far"):
        """Raise `BadDataError` when more than `max_bad_fraction` of the samples are bad (after `min_samples`,
        or at any count when `final`)."""
        if not self.seen or (self.seen < self.min_samples and not final):
            return
        fraction = len(self.bad) / self.seen
        if fraction > self.max_bad_fraction:
            first = "; ".join(f"{path} ({reason})" for path, reason in self.bad[:SHOWN_PATHS])
            raise BadDataError(
                f"{len(self.bad)} of {self.seen} {what} are bad ({fraction:.1%} > --max_bad_fraction "
                f"{self.max_bad_fraction:.1%}). First: {first}"
            )


def scan_dataset(
    ds: datasets.Dataset, max_bad_fraction: float = 0.05, require_report: bool = True
) -> tuple[datasets.Dataset, list[tuple[str, str]]]:
    """Drop rows whose image file is missing or whose report is empty (no decoding: a `stat` per file).

    Returns the kept rows and the dropped `(path, reason)` pairs; raises `BadDataError` when too many are bad.
    """
    keep, log = [], BadSampleLog(max_bad_fraction, min_samples=0)
    reports = ds["report"] if require_report else [None] * len(ds)
    rows = tqdm(zip(ds["image"], reports), total=len(ds), desc="scanning the training data", unit="row")
    for index, (path, report) in enumerate(rows):
        log.seen += 1
        if not os.path.isfile(path):
            log.bad.append((path, "image file not found"))
        elif require_report and not report.strip():
            log.bad.append((path, "empty report"))
        else:
            keep.append(index)
    if log.bad:
        listed = "; ".join(f"{p} ({r})" for p, r in log.bad[:SHOWN_PATHS])
        logger.warning("dropping %d of %d rows before training: %s%s", len(log.bad), log.seen, listed,
                       " ..." if len(log.bad) > SHOWN_PATHS else "")
    log.check(final=True, what="rows of the dataset")
    return (ds.select(keep) if log.bad else ds), log.bad


# ----------------------------------------------------------------------------------------------------------------
# Collator
# ----------------------------------------------------------------------------------------------------------------


class RadZCollator:
    """Rows `{image, report, labels?}` → the model inputs of both DFAT passes, plus `labels` for L_CG.

    Decodes the images here (`load_radiograph`), so a dataset is never decoded up front. A row whose image cannot
    be read, or whose report is empty (with `require_report`), is skipped, named in a warning and counted in
    `bad_log`; a batch is never empty: if every row was bad, replacement rows are drawn from `fallback_dataset`.
    With `num_workers > 0` each worker process keeps its own counts.
    """

    def __init__(
        self,
        processor,
        max_bad_fraction: float = 0.05,
        min_samples: int = 20,
        require_report: bool = True,
        fallback_dataset: datasets.Dataset | None = None,
        seed: int = 0,
    ):
        self.processor = processor
        self.require_report = require_report
        self.bad_log = BadSampleLog(max_bad_fraction, min_samples)
        self.fallback_dataset = fallback_dataset
        self._rng = random.Random(seed)

    def _load(self, row):
        """The decoded image, or None after recording why the row is bad."""
        self.bad_log.seen += 1
        path, report = row["image"], row.get("report") or ""
        if self.require_report and not report.strip():
            self.bad_log.record(path, "empty report")
            return None
        try:
            return load_radiograph(path)
        except (RadiographError, OSError) as error:
            # RadiographError messages start with the path; keep only the reason.
            self.bad_log.record(path, str(error).removeprefix(f"{path}: "))
            return None

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        kept = [(row, image) for row in rows if (image := self._load(row)) is not None]
        tries = 0
        while not kept and self.fallback_dataset is not None and tries < 10 * max(len(rows), 1):
            row = self.fallback_dataset[self._rng.randrange(len(self.fallback_dataset))]
            image, tries = self._load(row), tries + 1
            if image is not None:
                kept.append((row, image))
        self.bad_log.check()
        if not kept:
            raise BadDataError(f"every sample of a batch of {len(rows)} was bad; first: {self.bad_log.bad[-1]}")
        rows, images = zip(*kept)
        batch = self.processor(images=list(images), text=[row.get("report") or "" for row in rows])
        batch = dict(batch)
        if "labels" in rows[0]:
            labels = [[math.nan if v is None else v for v in row["labels"]] for row in rows]
            batch["labels"] = torch.tensor(labels, dtype=torch.float32)
        return batch


# ----------------------------------------------------------------------------------------------------------------
# Class-balanced sampling
# ----------------------------------------------------------------------------------------------------------------


def balance_keys(labels) -> np.ndarray:
    """The class each sample is balanced by: the index of its rarest positive label, or `num_labels` (an extra
    "no positive" class) when it has none. Single-label data gets its one class; multi-label rows count for the
    rarest of their findings, so rare findings are not drowned by common co-occurring ones."""
    labels = np.asarray(labels, dtype=np.float64)
    positive = labels == 1  # NaN (unknown) is not positive
    frequency = positive.sum(axis=0)
    rarity = np.where(positive, frequency[None, :], np.inf)
    keys = rarity.argmin(axis=1)
    keys[~positive.any(axis=1)] = labels.shape[1]
    return keys


class BalancedClassSampler(Sampler[int]):
    """An epoch of `len(keys)` indices in which every class (key) occurs equally often (±1).

    Each class gets a quota of `num_samples / num_classes` draws, taken from a fresh permutation of its members
    (repeated when the class is smaller than its quota, so rare classes are oversampled and common ones
    undersampled); the draws are then shuffled. The order depends only on `seed` and the epoch, so every data-parallel
    rank and a resumed run see the same sequence.
    """

    def __init__(self, keys, num_samples: int | None = None, seed: int = 0):
        keys = np.asarray(keys)
        self.classes = [np.flatnonzero(keys == k) for k in np.unique(keys)]
        self.num_samples = num_samples or len(keys)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        n_classes = len(self.classes)
        quotas = torch.full((n_classes,), self.num_samples // n_classes)
        quotas[torch.randperm(n_classes, generator=generator)[: self.num_samples % n_classes]] += 1
        draws = []
        for members, quota in zip(self.classes, quotas.tolist()):
            repeats = max(1, math.ceil(quota / len(members)))
            order = torch.cat([torch.randperm(len(members), generator=generator) for _ in range(repeats)])
            draws.append(torch.as_tensor(members)[order[:quota]])
        draws = torch.cat(draws)
        return iter(draws[torch.randperm(len(draws), generator=generator)].tolist())
