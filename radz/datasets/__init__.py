"""Dataset readers: each public radiology dataset in its real on-disk format, plus a generic reader.

Every reader returns a ``datasets.Dataset`` with ``image`` (absolute path), ``report`` (str),
``labels`` (float32 list: 1 positive / 0 negative / NaN unknown, aligned with the label names),
``label`` (int, multi-class sets only) and extra per-format columns; ``dataset_metadata(ds)``
gives ``{"dataset", "label_names", "task"}``. See ``base.py`` for the shared rules.

>>> ds = load_dataset_by_name("chexpert", "/data/CheXpert-v1.0-small", split="valid", uncertain="ones")
"""

from __future__ import annotations

import os
from collections.abc import Callable

import datasets

from .base import dataset_metadata
from .chest import (
    CHEXPERT_LABELS,
    COVIDX_LABELS,
    IU_LABELS,
    NIH_LABELS,
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
from .generic import generic
from .knee import KL_LABELS, knee_kl

READERS: dict[str, Callable[..., datasets.Dataset]] = {
    "mimic_cxr": mimic_cxr,
    "chestxray14": chestxray14,
    "chexpert": chexpert,
    "rsna_pneumonia": rsna_pneumonia,
    "siim_pneumothorax": siim_pneumothorax,
    "covidx": covidx,
    "iu_xray": iu_xray,
    "knee_kl": knee_kl,
    "generic": generic,
}

# Label names of every fixed-format set (the generic reader takes its own).
LABEL_NAMES: dict[str, list[str]] = {
    "mimic_cxr": CHEXPERT_LABELS,
    "chestxray14": NIH_LABELS,
    "chexpert": CHEXPERT_LABELS,
    "rsna_pneumonia": RSNA_LABELS,
    "siim_pneumothorax": SIIM_LABELS,
    "covidx": COVIDX_LABELS,
    "iu_xray": IU_LABELS,
    "knee_kl": KL_LABELS,
}


def load_dataset_by_name(
    name: str, data_dir: str | os.PathLike, split: str | None = "train", **kwargs
) -> datasets.Dataset:
    """``READERS[name](data_dir, split=split, **kwargs)``; for ``generic``, ``data_dir`` is the data file or folder."""
    if name not in READERS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(READERS)}")
    return READERS[name](data_dir, split=split, **kwargs)


__all__ = [
    "LABEL_NAMES",
    "READERS",
    "chestxray14",
    "chexpert",
    "covidx",
    "dataset_metadata",
    "generic",
    "iu_xray",
    "knee_kl",
    "load_dataset_by_name",
    "mimic_cxr",
    "parse_report_sections",
    "rsna_pneumonia",
    "siim_pneumothorax",
]
