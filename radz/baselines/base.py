"""What the baselines share: pixel batches, the label budget and the identity of a training split.

The `Scorer` interface they implement and the cache keys are the evaluation's (`radz.evaluation.scorer`); a checkpoint
is opened by `radz.checkpoints.load_checkpoint`.
"""

from __future__ import annotations

import numpy as np
import torch
from radiograph_llava_radz import load_radiographs

from radz.evaluation.scorer import settings_key


def pixel_values(image_processor, images: list, device, dtype) -> torch.Tensor:
    """Read radiographs (paths, PIL, arrays, DICOM) and run the image processor: `[N, 3, H, W]`."""
    loaded = load_radiographs(list(images))
    return image_processor(loaded, return_tensors="pt")["pixel_values"].to(device, dtype)


def select_rows(
    classes: np.ndarray, shots: int | None, balance: bool, max_samples: int | None, seed: int
) -> np.ndarray:
    """The label budget: which training items to use, sorted. `classes` holds one int per item (-1 = unusable).

    - `shots`: at most K items per class;
    - `balance`: every class cut to the size of the smallest (class-balanced, as the knee study's 500 images);
      otherwise the natural class mix is kept;
    - `max_samples`: at most this many items in all; with `balance` split evenly between the classes.
    Items are drawn at random with `seed`, so a budget is reproducible.
    """
    rng = np.random.default_rng(seed)
    by_class = {c: rng.permutation(np.flatnonzero(classes == c)) for c in np.unique(classes[classes >= 0])}
    if not by_class:
        return np.array([], dtype=np.int64)
    per_class = min(len(rows) for rows in by_class.values()) if balance else None
    if shots is not None:
        per_class = shots if per_class is None else min(per_class, shots)
    if balance and max_samples is not None:
        per_class = min(per_class, max_samples // len(by_class))
    chosen = np.concatenate([rows[:per_class] for rows in by_class.values()])
    if max_samples is not None and len(chosen) > max_samples:
        chosen = rng.permutation(chosen)[:max_samples]
    return np.sort(chosen)


def training_data_key(images: list[str], labels: np.ndarray) -> str:
    """Identity of a training split (paths and labels), part of a trained method's settings."""
    return settings_key({"images": list(images), "labels": np.asarray(labels, dtype=np.float64).tolist()})
