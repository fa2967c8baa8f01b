"""Zero-shot radiology recognition metrics: AUC / F1 / ACC per class, with the threshold protocol on record.

Self-contained (numpy + scikit-learn) so that ``evaluate.load("<path>/radz_zero_shot")`` works offline.
"""

import math
import warnings

import datasets
import evaluate
import numpy as np
from sklearn.metrics import accuracy_score
from sklearn.metrics import cohen_kappa_score
from sklearn.metrics import confusion_matrix
from sklearn.metrics import f1_score
from sklearn.metrics import roc_auc_score

_CITATION = """\
@article{li2025llavaradz,
  title   = {LLaVA-RadZ: Can Multimodal Large Language Models Effectively Tackle Zero-shot Radiology Recognition?},
  author  = {Li, Bangyan and Huang, Wenxuan and others},
  journal = {arXiv preprint arXiv:2503.07487},
  year    = {2025}
}
"""

_DESCRIPTION = """\
Metrics for zero-shot disease recognition on radiographs, as reported by LLaVA-RadZ, MedKLIP, KAD and CheXzero:
per-class ROC-AUC, F1 and accuracy with macro means (multi-label, e.g. ChestX-ray14 / CheXpert), the same for one
binary finding (RSNA Pneumonia, SIIM-ACR, COVIDx), and accuracy / macro-F1 / confusion matrix / ordinal error for
graded single-label tasks (knee Kellgren-Lawrence 0-4).

F1 and ACC depend on a decision threshold. How it was chosen changes the numbers a lot: MedKLIP and KAD choose it on
the test labels (an oracle). The caller must therefore name the protocol (`threshold_protocol`); it is stored in the
output so that every table says which numbers it shows.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: scores, any real values (probabilities, sigmoid outputs or cosine similarities).
        multilabel: [N, C]; binary: [N] (or [N, 1]); multiclass: [N, K], one score per grade/class.
    references: labels.
        multilabel: [N, C] of 1 / 0 / NaN; NaN (not labelled, e.g. CheXpert blank) is ignored for that class.
        binary: [N] of 1 / 0 / NaN; multiclass: [N] of ints in 0..K-1.
    task: "multilabel" (default), "binary" or "multiclass".
    label_names: one name per column (multilabel, multiclass) or a single name (binary).
    thresholds: per-class thresholds (a scalar is broadcast); a score >= threshold counts as positive.
        Without thresholds only AUC is computed. A NaN threshold leaves that class's F1 / ACC as NaN.
        Not used by "multiclass", which predicts the argmax.
    threshold_protocol: how the thresholds were chosen, e.g. "validation", "fixed-0.5",
        "oracle (chosen on test labels)". Required whenever thresholds are given.
Returns (multilabel):
    per_class: {name: {auc, f1, acc, threshold, n_valid, n_pos}},
    auc_macro, f1_macro, acc_macro: nan-aware means, with n_classes_auc / n_classes_f1 / n_classes_acc saying how
        many classes entered each mean; task, threshold_protocol, label_names, n_samples.
Returns (binary): auc, f1, acc, threshold, n_valid, n_pos and the same bookkeeping keys.
Returns (multiclass): accuracy, f1_macro, confusion_matrix (rows = true class), ordinal_mae (mean |predicted grade -
    true grade|), quadratic_kappa, auc_ovr_macro over the classes where one-vs-rest AUC is defined (n_classes_auc),
    per_class {name: {auc, f1, support}}. ordinal_mae and quadratic_kappa assume the classes are ordered grades.
Examples:
    >>> metric = evaluate.load("./radz/evaluation/radz_zero_shot")
    >>> out = metric.compute(predictions=[[0.9, 0.2], [0.1, 0.7], [0.8, 0.4]],
    ...                      references=[[1, 0], [0, 1], [0, float("nan")]],
    ...                      label_names=["Cardiomegaly", "Effusion"], thresholds=[0.5, 0.5],
    ...                      threshold_protocol="fixed-0.5")
    >>> out["per_class"]["Effusion"]["auc"]
    1.0
"""

TASKS = ("multilabel", "binary", "multiclass")


def _float_array(values, what: str) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float64)
    except ValueError as err:  # numpy refuses ragged rows
        raise ValueError(f"{what} is not a rectangular numeric array (do all rows have the same length?)") from err


def _nan_mean(values) -> tuple[float, int]:
    """Mean over the finite entries and how many there were (NaN, 0 when none, without numpy's warning)."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return (float(finite.mean()) if finite.size else math.nan), int(finite.size)


def _auc_or_nan(y_true: np.ndarray, y_score: np.ndarray, name: str) -> float:
    present = np.unique(y_true)
    if present.size < 2:
        what = f"only label {present[0]:g}" if present.size else "no valid labels"
        warnings.warn(f"class {name!r}: the references hold {what}; its AUC is undefined and reported as NaN")
        return math.nan
    return float(roc_auc_score(y_true, y_score))


def _binary_metrics(y_score: np.ndarray, y_true: np.ndarray, threshold: float, name: str) -> dict:
    """AUC / F1 / ACC of one class over its labelled (non-NaN) rows."""
    valid = ~np.isnan(y_true)
    y_true, y_score = y_true[valid].astype(np.int64), y_score[valid]
    f1 = acc = math.nan
    if not math.isnan(threshold) and y_true.size:
        y_pred = (y_score >= threshold).astype(np.int64)
        # NaN (not 0) when the class has no positive label and none is predicted: F1 is undefined there.
        f1 = float(f1_score(y_true, y_pred, zero_division=np.nan))
        acc = float(accuracy_score(y_true, y_pred))
    return {
        "auc": _auc_or_nan(y_true, y_score, name),
        "f1": f1,
        "acc": acc,
        "threshold": threshold,
        "n_valid": int(y_true.size),
        "n_pos": int(y_true.sum()),
    }


def _check_labels(label_names, n: int, default: list[str]) -> list[str]:
    if label_names is None:
        return default
    names = [str(name) for name in ([label_names] if isinstance(label_names, str) else label_names)]
    if len(names) != n:
        raise ValueError(f"label_names has {len(names)} names but the predictions have {n} columns")
    if len(set(names)) != n:
        raise ValueError(f"label_names must be unique, got {names}")
    return names


def _check_thresholds(thresholds, n_classes: int) -> np.ndarray:
    if thresholds is None:
        return np.full(n_classes, math.nan)
    values = _float_array(thresholds, "thresholds").reshape(-1)
    if values.size == 1:
        return np.full(n_classes, values[0])
    if values.size != n_classes:
        raise ValueError(f"got {values.size} thresholds for {n_classes} classes")
    return values


def _check_binary_labels(labels: np.ndarray) -> None:
    known = labels[~np.isnan(labels)]
    if not np.isin(known, (0.0, 1.0)).all():
        bad = sorted(float(v) for v in set(np.unique(known)) - {0.0, 1.0})
        raise ValueError(
            f"references must be 1, 0 or NaN, found {bad}; map uncertain labels (CheXpert -1) to 1, 0 or NaN first"
        )


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RadzZeroShot(evaluate.Metric):
    def _info(self):
        row = datasets.Sequence(datasets.Value("float64"))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # evaluate picks the first format that the first example fits.
            features=[
                datasets.Features({"predictions": row, "references": row}),  # multilabel
                datasets.Features({"predictions": row, "references": datasets.Value("int64")}),  # multiclass
                datasets.Features({"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}),
            ],
            reference_urls=["https://arxiv.org/abs/2503.07487"],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of predictions and references; an empty batch raises ValueError."""
        # (evaluate appends the inputs description to this docstring, so it must exist.)
        # evaluate infers the format from the first row and fails with a bare IndexError on an empty batch.
        for what, values in (("predictions", predictions), ("references", references)):
            if values is not None and len(values) == 0:
                raise ValueError(f"{what} is empty: the metric needs at least one image")
        super().add_batch(predictions=predictions, references=references, **kwargs)

    def _compute(
        self,
        predictions,
        references,
        task="multilabel",
        label_names=None,
        thresholds=None,
        threshold_protocol=None,
    ):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        scores = _float_array(predictions, "predictions")
        labels = _float_array(references, "references")
        if scores.shape[0] == 0:
            raise ValueError("predictions is empty: the metric needs at least one image")
        if scores.shape[0] != labels.shape[0]:
            raise ValueError(f"{scores.shape[0]} rows of predictions but {labels.shape[0]} rows of references")
        if not np.isfinite(scores).all():
            raise ValueError("predictions contain NaN or infinite scores")
        if task == "multiclass":
            if thresholds is not None:
                raise ValueError("task='multiclass' predicts the argmax; thresholds apply to binary/multilabel only")
            return self._multiclass(scores, labels, label_names)
        if thresholds is not None and not threshold_protocol:
            raise ValueError(
                "thresholds were given without threshold_protocol: name how they were chosen "
                "(e.g. 'validation', 'fixed-0.5', 'oracle (chosen on test labels)')"
            )
        protocol = str(threshold_protocol) if thresholds is not None else "none (AUC only)"
        if task == "binary":
            return self._binary(scores, labels, label_names, thresholds, protocol)
        return self._multilabel(scores, labels, label_names, thresholds, protocol)

    def _multilabel(self, scores, labels, label_names, thresholds, protocol) -> dict:
        if scores.ndim != 2 or labels.ndim != 2:
            raise ValueError(
                f"task='multilabel' needs predictions and references of shape [N, C], got {scores.shape} and "
                f"{labels.shape}; use task='binary' for one finding or 'multiclass' for integer grades"
            )
        if scores.shape != labels.shape:
            raise ValueError(f"predictions {scores.shape} and references {labels.shape} differ in shape")
        _check_binary_labels(labels)
        n_classes = scores.shape[1]
        names = _check_labels(label_names, n_classes, [f"class_{c}" for c in range(n_classes)])
        cuts = _check_thresholds(thresholds, n_classes)
        per_class = {
            name: _binary_metrics(scores[:, c], labels[:, c], float(cuts[c]), name) for c, name in enumerate(names)
        }
        out = {"task": "multilabel", "threshold_protocol": protocol, "label_names": names, "n_samples": len(scores)}
        for key in ("auc", "f1", "acc"):
            out[f"{key}_macro"], out[f"n_classes_{key}"] = _nan_mean([m[key] for m in per_class.values()])
        out["per_class"] = per_class
        return out

    def _binary(self, scores, labels, label_names, thresholds, protocol) -> dict:
        if scores.ndim == 2 and scores.shape[1] == 1:
            scores = scores[:, 0]
        if scores.ndim != 1 or labels.ndim != 1:
            raise ValueError(
                f"task='binary' needs predictions [N] and references [N], got {scores.shape} and {labels.shape}"
            )
        _check_binary_labels(labels)
        (name,) = _check_labels(label_names, 1, ["positive"])
        (cut,) = _check_thresholds(thresholds, 1)
        result = _binary_metrics(scores, labels, float(cut), name)
        bookkeeping = {"task": "binary", "threshold_protocol": protocol, "label_names": [name]}
        return {**bookkeeping, "n_samples": len(scores), **result}

    def _multiclass(self, scores, labels, label_names) -> dict:
        if scores.ndim != 2 or labels.ndim != 1:
            raise ValueError(
                f"task='multiclass' needs predictions [N, K] and integer references [N], got {scores.shape} and "
                f"{labels.shape}"
            )
        n_classes = scores.shape[1]
        in_range = (labels >= 0) & (labels < n_classes) & (labels == np.round(labels))  # False for NaN
        if not in_range.all():
            raise ValueError(f"references must be integers in 0..{n_classes - 1} (one per predictions column)")
        names = _check_labels(label_names, n_classes, [str(c) for c in range(n_classes)])
        y_true = labels.astype(np.int64)
        y_pred = scores.argmax(axis=1)
        classes = list(range(n_classes))
        per_class_f1 = f1_score(y_true, y_pred, labels=classes, average=None, zero_division=np.nan)
        per_class = {
            name: {
                "auc": _auc_or_nan((y_true == c).astype(np.int64), scores[:, c], name),
                "f1": float(per_class_f1[c]),
                "support": int((y_true == c).sum()),
            }
            for c, name in enumerate(names)
        }
        auc_macro, n_auc = _nan_mean([m["auc"] for m in per_class.values()])
        # Kappa is undefined when truth and prediction are the same single class.
        kappa = (
            float(cohen_kappa_score(y_true, y_pred, labels=classes, weights="quadratic"))
            if np.unique(np.r_[y_true, y_pred]).size > 1
            else math.nan
        )
        return {
            "task": "multiclass",
            "threshold_protocol": "argmax",
            "label_names": names,
            "n_samples": len(y_true),
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "f1_macro": float(f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=np.nan)),
            "ordinal_mae": float(np.abs(y_pred - y_true).mean()),
            "quadratic_kappa": kappa,
            "auc_ovr_macro": auc_macro,
            "n_classes_auc": n_auc,
            "confusion_matrix": confusion_matrix(y_true, y_pred, labels=classes).tolist(),
            "per_class": per_class,
        }
