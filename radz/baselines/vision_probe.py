"""The vision-encoder-only baseline: the checkpoint's vision tower, pooled, with a logistic-regression linear probe.

The knee-OA study (arXiv 2601.02443) found a trained vision encoder alone beats full MLLM pipelines, so this is the
control for every MLLM result: same images, same labels, no language model at all. The probe is trained on the
training split's labels under an explicit budget (`shots` per class, `balance_classes`), seeded; one binary probe
per label for multi-label / binary sets, one multinomial probe for multi-class sets. Its weights are saved as
safetensors (plain arrays, never a pickled scikit-learn object).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from sklearn.linear_model import LogisticRegression

from radz.checkpoints import LoadedCheckpoint
from radz.evaluation.scorer import Scorer

from .base import pixel_values, select_rows, training_data_key

logger = logging.getLogger(__name__)
POOLINGS = ("cls", "mean")


class VisionProbeScorer(Scorer):
    """Linear probe on pooled vision-tower features.

    Args:
        checkpoint: the opened checkpoint; only `llava.model.vision_tower` and the image processor are used.
        train_images, train_labels: the training split: paths and `[N, C]` 1/0/NaN labels (one-hot for a
            multi-class task), with `label_names` naming the columns / classes.
        task: "multilabel", "binary" or "multiclass".
        pooling: "cls" (the tower's post-layernorm CLS state) or "mean" (mean of the patch states).
        shots, balance_classes, max_samples, seed: the label budget (see `select_rows`).
        C: inverse L2 strength of the logistic regression.
        save_path: where to write the probe weights (`.safetensors`), or None.
    """

    name = "vision_probe"

    def __init__(
        self,
        checkpoint: LoadedCheckpoint,
        train_images: list[str],
        train_labels: np.ndarray,
        label_names: list[str],
        task: str,
        pooling: str = "cls",
        shots: int | None = None,
        balance_classes: bool = False,
        max_samples: int | None = None,
        seed: int = 0,
        C: float = 1.0,
        batch_size: int = 16,
        save_path: str | Path | None = None,
    ):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.checkpoint = checkpoint
        self.train_images, self.train_labels = list(train_images), np.asarray(train_labels, dtype=np.float64)
        self.label_names, self.task = list(label_names), task
        self.pooling, self.shots, self.balance_classes = pooling, shots, balance_classes
        self.max_samples, self.seed, self.C = max_samples, seed, C
        self.batch_size, self.save_path = batch_size, save_path
        self.train_data = training_data_key(self.train_images, self.train_labels)
        self.weights: dict[str, np.ndarray] | None = None
        self.n_train: dict[str, int] = {}

    def settings(self) -> dict:
        keys = ("pooling", "shots", "balance_classes", "max_samples", "seed", "C", "train_data")
        return {**super().settings(), **{key: getattr(self, key) for key in keys}}

    # -- features ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def features(self, images: list[str]) -> np.ndarray:
        tower = self.checkpoint.llava.model.vision_tower
        rows = []
        for start in range(0, len(images), self.batch_size):
            pixels = pixel_values(
                self.checkpoint.image_processor, images[start : start + self.batch_size], tower.device, tower.dtype
            )
            output = tower(pixel_values=pixels)
            pooled = output.pooler_output if self.pooling == "cls" else output.last_hidden_state[:, 1:].mean(dim=1)
            rows.append(pooled.float().cpu().numpy())
        return np.concatenate(rows).astype(np.float64)

    # -- training ------------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        if self.weights is not None:
            return
        labels = self.train_labels
        if self.task == "multiclass":
            labels = np.where((labels == 1).any(axis=1), np.nan_to_num(labels).argmax(axis=1), -1)
            chosen = {"all": select_rows(labels, **self._budget())}
        else:
            classes = np.where(np.isnan(labels), -1, labels).astype(np.int64)
            chosen = {name: select_rows(classes[:, c], **self._budget()) for c, name in enumerate(self.label_names)}
        needed = np.unique(np.concatenate(list(chosen.values())))
        if needed.size == 0:
            raise ValueError("vision_probe: the training split has no labelled images within the budget")
        extracted = self.features([self.train_images[i] for i in needed])
        # Standardise on the probe's training images: logistic regression is not scale-invariant.
        mean, std = extracted.mean(axis=0), extracted.std(axis=0) + 1e-6
        standard = (extracted - mean) / std

        def rows_of(selection):  # positions of training rows in `extracted` (`needed` is sorted)
            return np.searchsorted(needed, selection)

        weights = {"feature_mean": mean, "feature_std": std}
        if self.task == "multiclass":
            rows = chosen["all"]
            weights["coef"], weights["intercept"] = self._fit(standard[rows_of(rows)], labels[rows].astype(np.int64))
            self.n_train["all"] = int(len(rows))
        else:
            coef, intercept = [], []
            for c, name in enumerate(self.label_names):
                rows = chosen[name]
                w, b = self._fit(standard[rows_of(rows)], labels[rows, c].astype(np.int64))
                coef.append(w[0])
                intercept.append(b[0])
                self.n_train[name] = int(len(rows))
            weights["coef"], weights["intercept"] = np.stack(coef), np.array(intercept)
        self.weights = weights
        if self.save_path is not None:
            metadata = {key: json.dumps(value) for key, value in self.settings().items()}
            metadata.update(label_names=json.dumps(self.label_names), task=self.task)
            arrays = {key: np.ascontiguousarray(value, dtype=np.float32) for key, value in weights.items()}
            save_file(arrays, str(self.save_path), metadata=metadata)

    def _budget(self) -> dict:
        return {
            "shots": self.shots, "balance": self.balance_classes, "max_samples": self.max_samples, "seed": self.seed
        }

    def _fit(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Weights `[n_out, D]` and biases `[n_out]`: one row for a binary probe, one per class for multinomial.

        A binary label seen with one value only cannot be fitted: its probe is a constant (zero weights, a large
        bias of the right sign), and a warning says so.
        """
        n_classes = len(self.label_names) if self.task == "multiclass" else 2
        present = np.unique(y)
        if len(present) < 2:
            logger.warning("vision_probe: training labels hold only class %s; the probe is a constant", present)
            if self.task == "multiclass":
                bias = np.full(n_classes, -10.0)
                bias[present] = 10.0
                return np.zeros((n_classes, x.shape[1])), bias
            return np.zeros((1, x.shape[1])), np.array([10.0 if present.size and present[0] == 1 else -10.0])
        model = LogisticRegression(C=self.C, max_iter=2000)
        model.fit(x, y)
        if self.task != "multiclass":
            return model.coef_, model.intercept_
        # Full-size multinomial weights. With two classes present sklearn fits one logit (class 1 vs class 0);
        # classes absent from training get a very low bias, so they never win the argmax.
        coef, bias = np.zeros((n_classes, x.shape[1])), np.full(n_classes, -1e3)
        if len(present) == 2:
            coef[present[0]], bias[present[0]] = 0.0, 0.0
            coef[present[1]], bias[present[1]] = model.coef_[0], model.intercept_[0]
        else:
            coef[model.classes_], bias[model.classes_] = model.coef_, model.intercept_
        return coef, bias

    # -- scoring -------------------------------------------------------------------------------------------------
    def score(self, images, labels) -> np.ndarray:
        self.prepare()
        missing = [label for label in labels if label not in self.label_names]
        if missing:
            raise ValueError(f"vision_probe was trained on {self.label_names}; it cannot score {missing}")
        weights = self.weights
        standard = (self.features(list(images)) - weights["feature_mean"]) / weights["feature_std"]
        logits = standard @ weights["coef"].T + weights["intercept"]
        if self.task == "multiclass":
            logits -= logits.max(axis=1, keepdims=True)
            probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        else:
            probabilities = 1.0 / (1.0 + np.exp(-logits))
        columns = [self.label_names.index(label) for label in labels]
        return probabilities[:, columns]

    def summary(self) -> dict:
        return {"probe_training_images": dict(self.n_train), "probe_weights": str(self.save_path or "")}
