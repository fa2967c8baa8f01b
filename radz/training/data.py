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

from radiograph_llava_radz import RadiographError, load_radiograph

from radz.datasets import dataset_metadata, load_split, table_dataset
from radz.datasets.base import check_columns, read_table

logger = logging.getLogger(__name__)

SHOWN_PATHS = 5  # how many bad paths an error message lists


class BadDataError(RuntimeError):
    """Too many unreadable samples: the message gives the count, the fraction and the first paths."""


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def load_training_data(data_args, split: str) -> tuple[datasets.Dataset | None, list[str]]:
    """The `"train"` or `"validation"` split named by `DataArguments`, with its label names, or `(None, [])` when
    none is named.

    Every source goes through `radz.datasets`: a data file is read by its table reader (`read_table`) and mapped by
    `table_dataset`, with the one table of label codes (blank and -1 unknown) that evaluation uses too; a
    `save_to_disk` folder is mapped the same way; a named dataset is read by its reader (`load_split`). The result
    has the columns `image`, `report` and, when labelled, `labels`.
    """
    train = split == "train"
    if data_args.train_file is not None:
        source = data_args.train_file if train else data_args.validation_file
        if source is None:
            return None, []
        table, base_dir, label_names = read_table(source, what="data file"), Path(source).resolve().parent, []
    else:
        name = data_args.train_split if train else data_args.validation_split
        if name is None:
            return None, []
        if data_args.dataset_name is not None:
            ds = load_split(data_args.dataset_name, data_args.data_dir, split=name)
            names = list(dataset_metadata(ds)["label_names"])
            ds = ds.select_columns(["image", "report", "labels"])
            return _training_columns(ds, names, train and data_args.max_train_samples), names
        table, base_dir, label_names = _saved_table(data_args.dataset_dir, name)
        source = f"{data_args.dataset_dir} (split {name})"
    label_columns = data_args.split_list(data_args.label_columns)
    label_names = data_args.split_list(data_args.class_names) or label_names
    if not label_columns and "labels" in table and not label_names:
        raise ValueError("the data has a `labels` list column: name its entries with --class_names")
    # A report column is required to train on; a validation table may have none (it is scored by its labels).
    report_column = data_args.report_column if train or data_args.report_column in table else None
    check_columns(table, [data_args.image_column, *label_columns] + ([report_column] if report_column else []), source)
    ds = table_dataset(
        table, base_dir, data_args.image_column, report_column, label_columns,
        label_names if "labels" in table else (), check_images=False, source=str(source),
    )  # fmt: skip
    names = list(dataset_metadata(ds)["label_names"])
    return _training_columns(ds, names, train and data_args.max_train_samples), names


def _saved_table(dataset_dir, name: str):
    """A `save_to_disk` folder (a Dataset, or one split of a DatasetDict) as a table, with the label names its
    `radz.datasets` reader stored (none for other datasets)."""
    raw = datasets.load_from_disk(dataset_dir)
    if isinstance(raw, datasets.DatasetDict):
        if name not in raw:
            raise ValueError(f"{dataset_dir}: no split {name!r}; it has {sorted(raw)}")
        raw = raw[name]
    try:
        label_names = list(dataset_metadata(raw)["label_names"])
    except ValueError:
        label_names = []
    return raw.to_pandas(), Path(dataset_dir).resolve(), label_names


def _training_columns(ds: datasets.Dataset, names: list[str], max_samples) -> datasets.Dataset:
    """`image`, `report` and, when there are label names, `labels`; at most `max_samples` rows."""
    if not names:
        ds = ds.remove_columns("labels")
    return ds.select(range(min(max_samples, len(ds)))) if max_samples else ds


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
