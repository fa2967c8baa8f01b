"""Calibration of multi-label zero-shot scores: ECE, Brier score, reliability diagrams, and per-label Platt scaling.

`evaluate_radz.py --calibrate` (with `--multi_label`) fits `sigmoid(scale_k * m + bias_k)` per label on the
validation split, where `m = logit(score)` is the pipeline's margin of the label over its negation; writes the fit into
the checkpoint's `config.calibration` (plain JSON in config.json, read by `calibration_llava_radz.py` when the
pipeline is called with `calibrated=True`); and reports ECE, Brier score and a reliability diagram on the test
split before and after.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

from calibration_llava_radz import calibration_settings

DEFAULT_BINS = 10
# Scores are float32 probabilities: their logit is exact up to about ±16.
SCORE_EPSILON = 1e-7


def _known(probabilities, labels) -> tuple[np.ndarray, np.ndarray]:
    """Flattened (probability, 0/1 label) pairs whose label is known (not NaN)."""
    probabilities = np.asarray(probabilities, dtype=np.float64).ravel()
    labels = np.asarray(labels, dtype=np.float64).ravel()
    if probabilities.shape != labels.shape:
        raise ValueError(f"probabilities {probabilities.shape} and labels {labels.shape} differ in size")
    known = ~np.isnan(labels)
    return probabilities[known], labels[known]


def reliability_bins(probabilities, labels, n_bins: int = DEFAULT_BINS) -> dict:
    """Equal-width bins of [0, 1] (the last one closed): per bin, `count`, mean `confidence` (predicted probability)
    and `accuracy` (fraction of positives); NaN for empty bins. NaN labels are skipped."""
    p, y = _known(probabilities, labels)
    index = np.minimum((p * n_bins).astype(int), n_bins - 1)
    count = np.bincount(index, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(index, weights=p, minlength=n_bins) / count
        accuracy = np.bincount(index, weights=y, minlength=n_bins) / count
    return {"edges": np.linspace(0.0, 1.0, n_bins + 1), "count": count, "confidence": confidence, "accuracy": accuracy}


def expected_calibration_error(probabilities, labels, n_bins: int = DEFAULT_BINS) -> float:
    """ECE of binary predictions: `sum_b (n_b / N) |accuracy_b - confidence_b|` over equal-width bins (Naeini et
    al., 2015; Guo et al., 2017). Every (image, label) entry with a known label counts once."""
    bins = reliability_bins(probabilities, labels, n_bins)
    total = bins["count"].sum()
    if total == 0:
        return float("nan")
    filled = bins["count"] > 0
    gaps = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float((bins["count"][filled] / total * gaps).sum())


def brier_score(probabilities, labels) -> float:
    """Mean squared difference between the predicted probability and the 0/1 label, over the known entries."""
    p, y = _known(probabilities, labels)
    return float(np.mean((p - y) ** 2)) if p.size else float("nan")


def score_margins(scores) -> np.ndarray:
    """The margins `m` with `sigmoid(m) = score` of multi-label pipeline scores (clipped to ±16.1)."""
    scores = np.clip(np.asarray(scores, dtype=np.float64), SCORE_EPSILON, 1 - SCORE_EPSILON)
    return np.log(scores) - np.log1p(-scores)


def fit_platt(scores, labels) -> dict | None:
    """Platt scaling of one label: `{"scale", "bias"}` of the logistic regression of the labels on the score margins
    (NaN labels skipped), or None when the labels hold one class only."""
    m, y = _known(score_margins(scores), labels)
    if len(np.unique(y)) < 2:
        return None
    regression = LogisticRegression(C=1e4, max_iter=1000).fit(m[:, None], y.astype(int))
    return {"scale": float(regression.coef_[0, 0]), "bias": float(regression.intercept_[0])}


def apply_platt(scores, scale: float, bias: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(scale * score_margins(scores) + bias)))


def fit_calibration(val_scores, val_labels, label_names, settings: dict, fitted_on: str) -> dict:
    """The `config.calibration` record: per label its Platt fit on the validation scores (labels whose validation
    labels hold one class are left out, so they stay uncalibrated)."""
    fits = {name: fit_platt(val_scores[:, k], val_labels[:, k]) for k, name in enumerate(label_names)}
    return {
        "method": "platt",
        "settings": settings,
        "labels": {name: fit for name, fit in fits.items() if fit is not None},
        "fitted_on": fitted_on,
    }


def calibrated_scores(scores, calibration: dict, label_names) -> np.ndarray:
    """`scores` `[N, K]` through `calibration` (labels it lacks unchanged)."""
    columns = []
    for k, name in enumerate(label_names):
        fit = calibration["labels"].get(name)
        columns.append(scores[:, k] if fit is None else apply_platt(scores[:, k], fit["scale"], fit["bias"]))
    return np.stack(columns, axis=1)


def calibration_metrics(scores, labels, label_names, n_bins: int = DEFAULT_BINS) -> dict:
    """ECE and Brier score over all (image, label) entries, and per label."""
    return {
        "ece": expected_calibration_error(scores, labels, n_bins),
        "brier": brier_score(scores, labels),
        "per_class": {
            name: {"ece": expected_calibration_error(scores[:, k], labels[:, k], n_bins),
                   "brier": brier_score(scores[:, k], labels[:, k])}
            for k, name in enumerate(label_names)
        },
    }


def plot_reliability(curves: dict, path: Path, title: str, n_bins: int = DEFAULT_BINS):
    """Reliability diagram PNG: accuracy against confidence per bin for each `(scores, labels)` of `curves`
    (name → pair), the diagonal of perfect calibration, and the entries per bin below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, height_ratios=(3, 1))
    top.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="perfect calibration")
    width = 1.0 / n_bins / (len(curves) + 1)
    for offset, (name, (scores, labels)) in enumerate(curves.items()):
        bins = reliability_bins(scores, labels, n_bins)
        filled = bins["count"] > 0
        ece = expected_calibration_error(scores, labels, n_bins)
        top.plot(bins["confidence"][filled], bins["accuracy"][filled], marker="o", label=f"{name} (ECE {ece:.3f})")
        bottom.bar(bins["edges"][:-1] + (offset + 0.5) * width, bins["count"], width=width, label=name)
    top.set(ylabel="fraction positive", xlim=(0, 1), ylim=(0, 1), title=title)
    top.legend(loc="upper left", fontsize=8)
    bottom.set(xlabel="predicted probability", ylabel="entries", yscale="log")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def calibrate_checkpoint(model_dir, template, use_knowledge: bool, negative_template: str, val_scores, validation,
                         test_scores, test, out_dir: Path) -> tuple[dict, str]:
    """`--calibrate`: fit on the validation scores, write `config.calibration` into `model_dir/config.json`, and
    report ECE / Brier before and after on the test split (`calibration.json`, `reliability_diagram.png`).

    Returns the report record and its markdown. The pipeline's multi-label scores are the sigmoid of their margin,
    so the fit on `logit(score)` is the fit `calibrated=True` applies.
    """
    config_path = Path(model_dir) / "config.json"
    config = json.loads(config_path.read_text())
    settings = calibration_settings([template or config["label_template"]], use_knowledge, negative_template)
    fitted_on = f"{validation.dataset} / {validation.split} ({len(validation.images)} images)"
    calibration = fit_calibration(val_scores, validation.label_matrix, validation.label_names, settings, fitted_on)
    config["calibration"] = calibration
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    after_scores = calibrated_scores(test_scores, calibration, test.label_names)
    before = calibration_metrics(test_scores, test.label_matrix, test.label_names)
    after = calibration_metrics(after_scores, test.label_matrix, test.label_names)
    plot_reliability(
        {"before": (test_scores, test.label_matrix), "after Platt scaling": (after_scores, test.label_matrix)},
        out_dir / "reliability_diagram.png",
        f"{test.dataset} / {test.split}: all labels",
    )
    record = {"calibration": calibration, "before": before, "after": after, "written_to": str(config_path)}
    (out_dir / "calibration.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"## Calibration (Platt scaling per label, fitted on {fitted_on}; measured on {test.split})",
        "",
        "| label | ECE before | ECE after | Brier before | Brier after |",
        "|---|---|---|---|---|",
    ]
    for name in test.label_names:
        b, a = before["per_class"][name], after["per_class"][name]
        fitted = "" if name in calibration["labels"] else " (not fitted: one class in validation)"
        lines.append(f"| {name}{fitted} | {b['ece']:.3f} | {a['ece']:.3f} | {b['brier']:.3f} | {a['brier']:.3f} |")
    lines.append(f"| **all labels** | **{before['ece']:.3f}** | **{after['ece']:.3f}** | "
                 f"**{before['brier']:.3f}** | **{after['brier']:.3f}** |")
    lines += ["", f"Reliability diagram: `reliability_diagram.png`. Saved in `{config_path}` (config.calibration).", ""]
    return record, "\n".join(lines)
