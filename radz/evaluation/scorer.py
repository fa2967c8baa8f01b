"""The protocol every scoring method follows: the `Scorer` interface, and the keys of the harness's resume cache.

A method scores a batch of images against a list of label names: `score(images, labels) -> [N, C]` array (higher =
more likely positive). The evaluation harness owns the loop (chunks, batches, resume); a method only scores. The
methods are LLaVA-RadZ (`radz.evaluation.methods.RadZScorer`) and the baselines of `radz.baselines`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch


class Scorer:
    """One scoring method. Subclasses set `name` and implement `score`; the rest has working defaults.

    - `settings()`: everything besides the model files and the data that changes the scores (it keys the resume
      cache, so a changed setting never reuses stale predictions);
    - `prepare()`: one-off work before the first batch (training a probe or an adapter), run lazily so that a fully
      resumed run trains nothing;
    - `outputs()`: the per-image arrays to store, `{"score": [N, C]}` plus method-specific ones (VQA's parsed
      answers);
    - `output_metrics()`: metrics of the method-specific outputs, recorded beside the scores' metrics;
    - `template`: the prompt template with `{}` for the label, for methods that take one (`supports_templates`).
    """

    name = "scorer"
    supports_templates = False
    template: str | None = None

    def settings(self) -> dict:
        return {"method": self.name, "template": self.template}

    def prepare(self) -> None:
        """Train whatever the method trains; a no-op for zero-shot methods."""

    def score(self, images: list[str], labels: list[str]) -> np.ndarray:
        raise NotImplementedError

    def outputs(self, images: list[str], labels: list[str]) -> dict[str, np.ndarray]:
        return {"score": self.score(images, labels)}

    def output_metrics(self, outputs: dict[str, np.ndarray], label_matrix: np.ndarray, label_names: list[str]) -> dict:
        """`{record key: metrics}` of the outputs besides `score` (VQA's parsed answers); none by default."""
        return {}

    def summary(self) -> dict:
        """Facts about the method to record in metrics.json (training set size, adapter path...)."""
        return {}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_fingerprint(model_dir: str | os.PathLike) -> dict:
    """Name, size and modification time of every file of a checkpoint directory (cheap, unlike hashing weights).

    A hub id or any non-directory is fingerprinted by its name alone.
    """
    path = Path(model_dir)
    if not path.is_dir():
        return {"model": str(model_dir)}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {
        "model": str(path.resolve()),
        "files": [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }


def settings_key(settings: dict, length: int = 16) -> str:
    """A short stable hash of JSON-able settings (sorted keys), to name caches."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
