"""Metric layer of the zero-shot evaluation harness.

The numbers come from the `evaluate` module ``radz_zero_shot`` beside this file (package data, loaded by path, so it
works offline and from an installed wheel);
this file adds what the module cannot know: how F1/ACC thresholds are chosen, bootstrap confidence intervals
for AUC, and the markdown report.

Threshold protocols (the default must be "validation"):
- ``validation``: best F1 on a validation split; test labels are never read.
- ``fixed``: one constant (0.5) for every class.
- ``oracle``: best F1 on the *test* labels, as MedKLIP and KAD do. It is always labelled "oracle".
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import evaluate
import numpy as np
from tqdm.auto import tqdm

METRIC_DIR = Path(__file__).resolve().parent / "radz_zero_shot"
PROTOCOLS = ("validation", "fixed", "oracle")
ORACLE_CAPTION = "oracle: thresholds chosen on test labels"
# Where each task's summary AUC lives in the metric module's output.
SUMMARY_AUC_KEY = {"multilabel": "auc_macro", "binary": "auc", "multiclass": "auc_ovr_macro"}


@dataclass(frozen=True)
class ThresholdChoice:
    """Per-class thresholds together with the name of the protocol that chose them."""

    thresholds: np.ndarray
    protocol: str


def load_metric() -> evaluate.EvaluationModule:
    """Load the ``radz_zero_shot`` metric shipped inside the package, wherever the caller runs from."""
    if not (METRIC_DIR / "radz_zero_shot.py").is_file():
        raise FileNotFoundError(
            f"the metric module was not found at {METRIC_DIR / 'radz_zero_shot.py'}; it is package data of "
            "llava-radz: reinstall the package (pip install llava-radz)"
        )
    # In memory: no arrow cache files or file locks under HF_HOME for what is a single in-process computation.
    return evaluate.load(str(METRIC_DIR), keep_in_memory=True)


def _score_label_columns(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """Scores and 1/0/NaN labels as matching [N, C] float arrays (a 1-D input is one class)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[:, None]
    if labels.ndim == 1:
        labels = labels[:, None]
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must both be [N] or [N, C] alike")
    if scores.shape[0] == 0:
        raise ValueError("scores and labels are empty")
    known = labels[~np.isnan(labels)]
    if not np.isin(known, (0.0, 1.0)).all():
        raise ValueError("labels must be 1, 0 or NaN")
    return scores, labels


def _best_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The lowest unique score t whose rule ``score >= t`` maximises F1 on these (non-NaN) labels."""
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], labels[order]
    # Cut after the last row of each run of tied scores: a threshold takes the whole run.
    ends = np.r_[np.flatnonzero(np.diff(ranked) != 0), len(ranked) - 1]
    tp = np.cumsum(hits)[ends]
    predicted = ends + 1
    f1 = 2 * tp / (predicted + hits.sum())  # 2TP / (2TP + FP + FN)
    # Candidates run from the highest score down, so the last maximum is the lowest threshold.
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))
    return float(ranked[ends[best]])


def choose_thresholds(scores, labels, rule: str = "f1") -> np.ndarray:
    """Per-class thresholds that maximise F1 over the candidates = the unique scores (ties: the lowest).

    NaN labels are ignored. A class without a positive label gets a NaN threshold (and a warning), which the
    metric reports as F1 = ACC = NaN. Call it with VALIDATION scores/labels for the default protocol.
    """
    if rule != "f1":
        raise ValueError(f"unknown threshold rule {rule!r}; supported: 'f1'")
    scores, labels = _score_label_columns(scores, labels)
    thresholds = np.full(scores.shape[1], math.nan)
    for c in range(scores.shape[1]):
        valid = ~np.isnan(labels[:, c])
        if not labels[valid, c].any():
            warnings.warn(f"column {c}: no positive label, so no F1 threshold can be chosen (NaN)")
            continue
        thresholds[c] = _best_f1_threshold(scores[valid, c], labels[valid, c])
    return thresholds


def thresholds_for_protocol(
    protocol: str,
    test_scores,
    test_labels=None,
    val_scores=None,
    val_labels=None,
    fixed_value: float = 0.5,
) -> ThresholdChoice:
    """Thresholds for the test set under a named protocol; see the module docstring.

    ``validation`` reads only the validation arrays (test_labels is never touched); ``oracle`` reads the test
    labels and its name says so.
    """
    n_classes = 1 if np.ndim(test_scores) == 1 else np.shape(test_scores)[1]
    if protocol == "validation":
        if val_scores is None or val_labels is None:
            raise ValueError("the validation protocol needs val_scores and val_labels")
        thresholds = choose_thresholds(val_scores, val_labels)
        name = "validation (best F1 on validation labels)"
    elif protocol == "fixed":
        thresholds = np.full(n_classes, float(fixed_value))
        name = f"fixed-{fixed_value:g}"
    elif protocol == "oracle":
        if test_labels is None:
            raise ValueError("the oracle protocol needs test_labels")
        thresholds = choose_thresholds(test_scores, test_labels)
        name = "oracle (best F1 on test labels)"
    else:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    if thresholds.shape != (n_classes,):
        raise ValueError(f"{thresholds.size} thresholds for {n_classes} test classes: do the splits share classes?")
    return ThresholdChoice(thresholds=thresholds, protocol=name)


class ResampledAUC:
    """ROC-AUC of one class under bootstrap row counts, from one sort of its scores.

    A bootstrap resample is a weight (multiplicity) per row, so the AUC is the weighted Mann-Whitney statistic:
    positives score 1 per lower-scored negative and 1/2 per tied one. This avoids a sort per resample.
    """

    def __init__(self, scores: np.ndarray, labels: np.ndarray):
        valid = np.flatnonzero(~np.isnan(labels))
        order = valid[np.argsort(scores[valid], kind="stable")]
        self.rows = order
        self.positive = labels[order].astype(bool)
        ranked = scores[order]
        self.group_starts = np.r_[0, np.flatnonzero(np.diff(ranked) != 0) + 1]

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        """AUC per resample for counts [B, N] (NaN where a resample holds one label only)."""
        weights = counts[:, self.rows]
        pos = np.add.reduceat(np.where(self.positive, weights, 0), self.group_starts, axis=1)
        neg = np.add.reduceat(np.where(self.positive, 0, weights), self.group_starts, axis=1)
        wins = (pos * (np.cumsum(neg, axis=1) - 0.5 * neg)).sum(axis=1)
        pairs = pos.sum(axis=1) * neg.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(pairs > 0, wins / pairs, math.nan)


def bootstrap_auc_ci(scores, labels, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Percentile bootstrap CIs for per-class and macro AUC, resampling images (rows) with a seeded rng.

    A resample where a class holds one label only is skipped for that class, and for the macro AUC (the mean
    over the classes whose AUC is defined on the full data). Returns ``per_class`` [(low, high)] in column
    order, ``macro`` (low, high), and how many resamples each used.
    """
    scores, labels = _score_label_columns(scores, labels)
    n_rows, n_classes = scores.shape
    if n_boot < 1:
        raise ValueError("n_boot must be at least 1")
    columns = [ResampledAUC(scores[:, c], labels[:, c]) for c in range(n_classes)]
    # Classes with both labels on the full data; the others have no AUC and no interval.
    defined = np.array([col.positive.any() and not col.positive.all() for col in columns])
    rng = np.random.default_rng(seed)
    aucs = np.full((n_boot, n_classes), math.nan)
    chunk = max(1, 2_000_000 // n_rows)  # bounds the [chunk, N] count matrix in memory
    with tqdm(total=n_boot, desc="bootstrap AUC", unit="resample", leave=False) as progress:
        for start in range(0, n_boot, chunk):
            size = min(chunk, n_boot - start)
            rows = rng.integers(0, n_rows, size=(size, n_rows))
            flat = (rows + n_rows * np.arange(size)[:, None]).ravel()
            counts = np.bincount(flat, minlength=size * n_rows).reshape(size, n_rows)
            for c in np.flatnonzero(defined):
                aucs[start : start + size, c] = columns[c](counts)
            progress.update(size)

    def interval(samples: np.ndarray) -> tuple[float, float]:
        samples = samples[np.isfinite(samples)]
        if samples.size == 0:
            return (math.nan, math.nan)
        low, high = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
        return (float(low), float(high))

    macro_samples = aucs[:, defined].mean(axis=1) if defined.any() else np.full(n_boot, math.nan)
    return {
        "per_class": [interval(aucs[:, c]) for c in range(n_classes)],
        "n_used_per_class": [int(np.isfinite(aucs[:, c]).sum()) for c in range(n_classes)],
        "macro": interval(macro_samples),
        "n_used_macro": int(np.isfinite(macro_samples).sum()),
        "n_boot": n_boot,
        "seed": seed,
        "alpha": alpha,
    }


def compute_metrics(
    task: str,
    scores,
    labels,
    label_names=None,
    thresholds=None,
    protocol: str | None = None,
    n_boot: int = 0,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict:
    """Metrics from the evaluate module, plus bootstrap AUC CIs when ``n_boot > 0``.

    ``thresholds`` may be a ThresholdChoice (its protocol name is used) or an array, which then needs
    ``protocol``. For ``task="multiclass"`` the CIs are for the one-vs-rest AUCs.
    """
    if isinstance(thresholds, ThresholdChoice):
        if protocol is not None and protocol != thresholds.protocol:
            raise ValueError(f"protocol {protocol!r} contradicts the thresholds' protocol {thresholds.protocol!r}")
        thresholds, protocol = thresholds.thresholds, thresholds.protocol
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    result = load_metric().compute(
        predictions=scores,
        references=labels,
        task=task,
        label_names=label_names,
        thresholds=thresholds,
        threshold_protocol=protocol,
    )
    if n_boot:
        ci_labels = np.eye(scores.shape[1])[labels.astype(np.int64)] if task == "multiclass" else labels
        ci = bootstrap_auc_ci(scores, ci_labels, n_boot=n_boot, seed=seed, alpha=alpha)
        summary_key = SUMMARY_AUC_KEY[task]
        result[f"{summary_key}_ci"] = list(ci["macro"])
        if task != "binary":
            for name, bounds in zip(result["label_names"], ci["per_class"]):
                result["per_class"][name]["auc_ci"] = list(bounds)
        result["bootstrap"] = {key: ci[key] for key in ("n_boot", "seed", "alpha", "n_used_macro")}
    return result


def _pct(value: float, ci=None) -> str:
    """A [0, 1] metric as x100 with two decimals (as the papers report it), with its CI if any."""
    if value is None or math.isnan(value):
        return "n/a"
    text = f"{100 * value:.2f}"
    if ci is not None and not math.isnan(ci[0]):
        text += f" ({100 * ci[0]:.2f}–{100 * ci[1]:.2f})"
    return text


def _raw(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def format_report_table(metrics: dict, title: str = "Zero-shot results") -> str:
    """A markdown report of ``compute_metrics`` output; the heading names the threshold protocol."""
    task, protocol = metrics["task"], metrics["threshold_protocol"]
    decision = "prediction: argmax" if task == "multiclass" else f"thresholds: {protocol}"
    lines = [f"### {title} ({task}; {decision})", ""]
    if "oracle" in protocol.lower():
        lines += [f"*{ORACLE_CAPTION}* — not comparable with thresholds chosen on validation data.", ""]
    lines += ["AUC / F1 / ACC x100; thresholds, kappa and grade error unscaled.", ""]
    if "bootstrap" in metrics:
        boot = metrics["bootstrap"]
        lines += [f"AUC CI: {100 * (1 - boot['alpha']):g}% percentile bootstrap over images, {boot['n_boot']} resamples.", ""]
    if task == "multiclass":
        return "\n".join(lines + _multiclass_rows(metrics)) + "\n"
    header = ["class", "AUC", "F1", "ACC", "threshold", "positives / labelled"]
    if task == "binary":
        rows = [_class_row(metrics["label_names"][0], metrics, metrics.get("auc_ci"))]
    else:
        rows = [_class_row(name, m, m.get("auc_ci")) for name, m in metrics["per_class"].items()]
        counts = "classes: {} AUC, {} F1, {} ACC".format(
            metrics["n_classes_auc"], metrics["n_classes_f1"], metrics["n_classes_acc"]
        )
        macro = [_pct(metrics["auc_macro"], metrics.get("auc_macro_ci")), _pct(metrics["f1_macro"])]
        rows.append(["**macro**", *macro, _pct(metrics["acc_macro"]), "", counts])
    return "\n".join(lines + _table(header, rows)) + "\n"


def _class_row(name: str, m: dict, auc_ci) -> list[str]:
    counts = f"{m['n_pos']} / {m['n_valid']}"
    return [name, _pct(m["auc"], auc_ci), _pct(m["f1"]), _pct(m["acc"]), _raw(m["threshold"]), counts]


def _multiclass_rows(metrics: dict) -> list[str]:
    names = metrics["label_names"]
    summary = [
        ["accuracy", _pct(metrics["accuracy"])],
        ["macro F1", _pct(metrics["f1_macro"])],
        [
            f"one-vs-rest macro AUC ({metrics['n_classes_auc']} classes)",
            _pct(metrics["auc_ovr_macro"], metrics.get("auc_ovr_macro_ci")),
        ],
        ["quadratic weighted kappa", _raw(metrics["quadratic_kappa"])],
        ["ordinal error (mean absolute grade difference)", _raw(metrics["ordinal_mae"])],
    ]
    per_class = [
        [name, _pct(m["auc"], m.get("auc_ci")), _pct(m["f1"]), str(m["support"])]
        for name, m in metrics["per_class"].items()
    ]
    confusion = [[f"**{name}**", *map(str, row)] for name, row in zip(names, metrics["confusion_matrix"])]
    return (
        _table(["metric", "value"], summary)
        + [""]
        + _table(["class", "AUC (one-vs-rest)", "F1", "support"], per_class)
        + ["", "Confusion matrix (rows = true, columns = predicted):", ""]
        + _table(["true \\ predicted", *names], confusion)
    )
