"""Dataset readers: each public radiology dataset in its real on-disk format, plus a generic reader.

Every reader returns a ``datasets.Dataset`` with ``image`` (absolute path), ``report`` (str),
``labels`` (float32 list: 1 positive / 0 negative / NaN unknown, aligned with the label names),
``label`` (int, multi-class sets only) and extra per-format columns; ``dataset_metadata(ds)``
gives ``{"dataset", "label_names", "task"}``. See ``base.py`` for the shared rules.

``DATASETS`` is the one registry: each dataset's reader, label names and validation split; ``load_split`` reads one
split through it, for evaluation and training alike.

>>> ds = load_split("chexpert", "/data/CheXpert-v1.0-small", split="valid", uncertain="ones")
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import datasets

from .base import LABEL_CODES, dataset_metadata
from .chest import (
    CHEXPERT_LABELS,
    COVIDX_LABELS,
    IU_LABELS,
    NIH_LABELS,
    NIH_VALIDATION,
    RSNA_LABELS,
    SIIM_LABELS,
    chestxray14,
    chexpert,
    covidx,
    iu_xray,
    mimic_cxr,
    parse_report_sections,
    rsna_pneumonia,
    siim_pneumothorax,
)
from .generic import generic, generic_split, table_dataset
from .knee import KL_LABELS, knee_kl


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its reader, its label names and the split that chooses thresholds.

    `label_names` is None where the data names its labels (generic). `validation_split` is None where the format is
    one labelled set with no validation part (RSNA, SIIM, IU X-ray); `validation_note` says how the validation split
    is made when it is not an official one.
    """

    reader: Callable[..., datasets.Dataset]
    label_names: list[str] | None
    validation_split: str | None
    validation_note: str = ""


DATASETS: dict[str, DatasetSpec] = {
    "mimic_cxr": DatasetSpec(mimic_cxr, CHEXPERT_LABELS, "validate"),
    "chestxray14": DatasetSpec(chestxray14, NIH_LABELS, "val", NIH_VALIDATION),
    "chexpert": DatasetSpec(chexpert, CHEXPERT_LABELS, "valid"),
    "rsna_pneumonia": DatasetSpec(rsna_pneumonia, RSNA_LABELS, None),
    "siim_pneumothorax": DatasetSpec(siim_pneumothorax, SIIM_LABELS, None),
    "covidx": DatasetSpec(covidx, COVIDX_LABELS, "val"),
    "iu_xray": DatasetSpec(iu_xray, IU_LABELS, None),
    "knee_kl": DatasetSpec(knee_kl, KL_LABELS, "val"),
    "generic": DatasetSpec(generic, None, "validation"),
}


def load_split(
    name: str,
    data_dir: str | os.PathLike,
    split: str | None = "train",
    labels: list[str] | None = None,
    whole_folder: bool = True,
    **kwargs,
) -> datasets.Dataset:
    """One split of a registered dataset, read by its reader (``DATASETS[name].reader(data_dir, split=split,
    **kwargs)``). For ``generic``, ``data_dir`` is a table file, a folder of ``<split>.jsonl|csv|parquet`` or an
    image folder (:func:`generic_split`), and ``labels`` names its label columns."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    if name == "generic":
        source, extra = generic_split(data_dir, split, labels, whole_folder)
        return generic(source, **{**kwargs, **extra})
    return DATASETS[name].reader(data_dir, split=split, **kwargs)


__all__ = [
    "DATASETS",
    "LABEL_CODES",
    "DatasetSpec",
    "chestxray14",
    "chexpert",
    "covidx",
    "dataset_metadata",
    "generic",
    "iu_xray",
    "knee_kl",
    "load_split",
    "mimic_cxr",
    "parse_report_sections",
    "rsna_pneumonia",
    "siim_pneumothorax",
    "table_dataset",
]
