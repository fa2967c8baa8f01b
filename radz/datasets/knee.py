"""Knee osteoarthritis radiographs graded by Kellgren-Lawrence (KL) grade (OAI-derived sets)."""

from __future__ import annotations

import os

import datasets

from .base import absolute_path, build_dataset
from .generic import image_folder, one_hot

KL_GRADES = ["0", "1", "2", "3", "4"]  # the class folder names
KL_LABELS = [f"KL {grade}" for grade in KL_GRADES]  # label names: "KL 0" ... "KL 4"


def knee_kl(data_dir: str | os.PathLike, split: str = "train") -> datasets.Dataset:
    """Knee KL grading: ``<split>/<grade>/*.png|jpg`` with ``split`` "train" | "val" | "test" and grade 0-4.

    Multi-class: ``label`` is the grade (0-4) and ``labels`` its one-hot vector over
    :data:`KL_LABELS`. Split: the folder of that name. Images are listed from disk, so none can be missing.
    """
    frame, grades = image_folder(absolute_path(data_dir) / split, KL_GRADES)
    frame["label"] = grades
    return build_dataset(frame, one_hot(grades, len(KL_GRADES)), "knee_kl", KL_LABELS, "multiclass")
