"""The metric layer: values equal scikit-learn's, threshold protocols are honest, reports label the oracle."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score
from sklearn.metrics import cohen_kappa_score
from sklearn.metrics import f1_score
from sklearn.metrics import roc_auc_score

from radz.evaluation import ORACLE_CAPTION
from radz.evaluation import ThresholdChoice
from radz.evaluation import bootstrap_auc_ci
from radz.evaluation import choose_thresholds
from radz.evaluation import compute_metrics
from radz.evaluation import format_report_table
from radz.evaluation import load_metric
from radz.evaluation import thresholds_for_protocol
from radz.evaluation.metrics import ResampledAUC

REPO_ROOT = Path(__file__).resolve().parents[1]
NAN = math.nan
FINDINGS = ["Atelectasis", "Cardiomegaly", "Effusion"]

# 8 images x 3 findings; NaN = not labelled (CheXpert blank), which must be ignored per class.
SCORES = np.array(
    [
        [0.91, 0.20, 0.55],
        [0.15, 0.85, 0.80],
        [0.62, 0.70, 0.90],
        [0.40, 0.10, 0.35],
        [0.75, 0.68, 0.60],
        [0.30, 0.45, 0.20],
        [0.80, 0.30, 0.75],
        [0.05, 0.65, 0.10],
    ]
)
LABELS = np.array(
    [
        [1, 0, 1],
        [0, 1, NAN],
        [1, 1, 1],
        [NAN, 0, 0],
        [1, 0, 1],
        [0, NAN, 0],
        [0, 0, 1],
        [0, 1, NAN],
    ]
)
THRESHOLDS = np.array([0.5, 0.6, 0.5])


@pytest.fixture(scope="module")
def metric():
    return load_metric()


def _sklearn_class_metrics(scores, labels, threshold):
    valid = ~np.isnan(labels)
    y, s = labels[valid].astype(int), scores[valid]
    pred = (s >= threshold).astype(int)
    return roc_auc_score(y, s), f1_score(y, pred), accuracy_score(y, pred)


def _synthetic(n, n_classes, seed, prevalence=0.3):
    """Scores that carry signal about 1/0 labels, as a model's would."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, n_classes)) < prevalence).astype(float)
    scores = 1 / (1 + np.exp(-(1.5 * labels - 0.75 + rng.normal(size=(n, n_classes)))))
    return scores, labels


class _Untouchable:
    """Stands in for test labels that a protocol must not read."""

    def __array__(self, *args, **kwargs):
        raise AssertionError("test labels were read")

    def __getitem__(self, key):
        raise AssertionError("test labels were read")

    def __len__(self):
        raise AssertionError("test labels were read")


def test_multilabel_matches_sklearn_and_ignores_nan_labels(metric):
    out = metric.compute(
        predictions=SCORES,
        references=LABELS,
        label_names=FINDINGS,
        thresholds=THRESHOLDS,
        threshold_protocol="fixed-0.5",
    )
    assert out["task"] == "multilabel" and out["threshold_protocol"] == "fixed-0.5"
    expected = [_sklearn_class_metrics(SCORES[:, c], LABELS[:, c], THRESHOLDS[c]) for c in range(3)]
    for name, (auc, f1, acc), labels in zip(FINDINGS, expected, LABELS.T):
        got = out["per_class"][name]
        assert got["auc"] == pytest.approx(auc)
        assert got["f1"] == pytest.approx(f1)
        assert got["acc"] == pytest.approx(acc)
        assert got["n_valid"] == int((~np.isnan(labels)).sum())
        assert got["n_pos"] == int(np.nansum(labels))
    # Non-trivial case: Effusion's AUC would drop if its NaN rows were counted as negatives.
    nan_as_negative = roc_auc_score(np.nan_to_num(LABELS[:, 2]), SCORES[:, 2])
    assert out["per_class"]["Effusion"]["auc"] == 1.0 > nan_as_negative
    for i, key in enumerate(("auc", "f1", "acc")):
        assert out[f"{key}_macro"] == pytest.approx(np.mean([e[i] for e in expected]))
        assert out[f"n_classes_{key}"] == 3


def test_one_label_column_gives_nan_auc_with_a_warning(metric):
    labels = LABELS.copy()
    labels[:, 1] = np.where(np.isnan(labels[:, 1]), NAN, 0.0)  # Cardiomegaly: negatives only
    with pytest.warns(UserWarning, match="Cardiomegaly"):
        out = metric.compute(predictions=SCORES, references=labels, label_names=FINDINGS)
    assert math.isnan(out["per_class"]["Cardiomegaly"]["auc"])
    assert out["n_classes_auc"] == 2
    expected = [roc_auc_score(labels[~np.isnan(labels[:, c]), c], SCORES[~np.isnan(labels[:, c]), c]) for c in (0, 2)]
    assert out["auc_macro"] == pytest.approx(np.mean(expected))
    # Without thresholds only AUC is computed, and the protocol says so.
    assert out["threshold_protocol"] == "none (AUC only)" and out["n_classes_f1"] == 0 and math.isnan(out["f1_macro"])


def test_binary_matches_sklearn(metric):
    scores, labels = SCORES[:, 2], LABELS[:, 2]
    out = metric.compute(
        predictions=scores, references=labels, task="binary", label_names="Pneumonia",
        thresholds=0.5, threshold_protocol="fixed-0.5",
    )  # fmt: skip
    auc, f1, acc = _sklearn_class_metrics(scores, labels, 0.5)
    assert (out["auc"], out["f1"], out["acc"]) == pytest.approx((auc, f1, acc))
    assert out["label_names"] == ["Pneumonia"] and out["n_valid"] == 6 and out["n_pos"] == 4


def test_multiclass_knee_kl_grades(metric):
    true = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    pred = np.array([0, 1, 1, 2, 2, 2, 3, 2, 4, 3])  # mostly right, errors are one grade off
    rng = np.random.default_rng(0)
    probs = 0.1 + 0.5 * np.eye(5)[pred] + 0.05 * rng.random((10, 5))
    probs /= probs.sum(axis=1, keepdims=True)
    names = [f"KL{k}" for k in range(5)]
    out = metric.compute(predictions=probs, references=true, task="multiclass", label_names=names)
    assert out["confusion_matrix"] == [
        [1, 1, 0, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 2, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    assert out["ordinal_mae"] == pytest.approx(0.4)  # four knees one grade off, out of ten
    assert out["accuracy"] == pytest.approx(0.6)
    assert out["f1_macro"] == pytest.approx(f1_score(true, pred, average="macro"))
    assert out["quadratic_kappa"] == pytest.approx(cohen_kappa_score(true, pred, weights="quadratic"))
    assert out["auc_ovr_macro"] == pytest.approx(roc_auc_score(true, probs, multi_class="ovr", average="macro"))
    assert out["n_classes_auc"] == 5 and out["per_class"]["KL2"]["support"] == 2


def test_multiclass_auc_skips_a_grade_without_images(metric):
    true = np.array([0, 1, 1, 2, 0, 2])
    scores = np.array([[3, 1, 0, 0], [0, 2, 1, 0], [1, 3, 0, 0], [0, 0, 2, 1], [2, 1, 1, 0], [0, 1, 3, 0]], float)
    with pytest.warns(UserWarning, match="'3'"):
        out = metric.compute(predictions=scores, references=true, task="multiclass")
    assert math.isnan(out["per_class"]["3"]["auc"]) and out["n_classes_auc"] == 3
    ovr = [roc_auc_score(true == k, scores[:, k]) for k in range(3)]
    assert out["auc_ovr_macro"] == pytest.approx(np.mean(ovr))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"predictions": [], "references": []}, "empty"),
        ({"predictions": [[0.1, 0.2]], "references": [[1.0]]}, "differ in shape"),
        ({"predictions": [[0.1, 0.2], [0.3]], "references": [[1.0, 0.0], [0.0, 1.0]]}, "rectangular"),
        ({"predictions": [[0.1, 0.2], [0.3, 0.4]], "references": [1, 0]}, r"task='multilabel' needs .* \[N, C\]"),
        ({"predictions": [[0.1], [0.2]], "references": [[1.0], [-1.0]]}, "CheXpert -1"),
        ({"predictions": [[0.1], [0.2]], "references": [[1.0], [0.0]], "thresholds": [0.5]}, "threshold_protocol"),
        (
            {"predictions": [[0.1, 0.2]], "references": [[1.0, 0.0]], "thresholds": [0.5] * 3,
             "threshold_protocol": "fixed-0.5"},
            "3 thresholds for 2 classes",
        ),  # fmt: skip
        ({"predictions": [[0.1, 0.9]], "references": [2], "task": "multiclass"}, r"integers in 0\.\.1"),
        ({"predictions": [0.1, 0.2], "references": [1.0, 0.0], "task": "regression"}, "task must be one of"),
    ],
)
def test_bad_inputs_raise_value_errors_that_say_what_is_wrong(metric, kwargs, message):
    with pytest.raises(ValueError, match=message):
        metric.compute(**kwargs)


def test_choose_thresholds_maximises_f1_over_unique_scores():
    scores, labels = _synthetic(120, 3, seed=1)
    labels[::7, 0] = NAN
    chosen = choose_thresholds(scores, labels)
    for c in range(3):
        valid = ~np.isnan(labels[:, c])
        y, s = labels[valid, c], scores[valid, c]
        f1s = {t: f1_score(y, s >= t) for t in np.unique(s)}
        best = max(f1s.values())
        assert chosen[c] in f1s and f1s[chosen[c]] == pytest.approx(best)
    # Ties: 0.9 and 0.4 both give F1 = 2/3; the lowest candidate wins.
    tie_scores, tie_labels = np.array([0.9, 0.6, 0.5, 0.4]), np.array([1, 0, 0, 1])
    assert f1_score(tie_labels, tie_scores >= 0.9) == pytest.approx(f1_score(tie_labels, tie_scores >= 0.4))
    assert choose_thresholds(tie_scores, tie_labels).tolist() == [0.4]


def test_choose_thresholds_without_positives_is_nan_with_a_warning():
    with pytest.warns(UserWarning, match="no positive label"):
        chosen = choose_thresholds([[0.2, 0.9], [0.4, 0.1]], [[0, 1], [0, NAN]])
    assert math.isnan(chosen[0]) and chosen[1] == 0.9


def test_validation_protocol_never_reads_test_labels():
    test_scores, test_labels = _synthetic(300, 3, seed=2)
    val_scores, val_labels = _synthetic(300, 3, seed=3)
    guarded = thresholds_for_protocol("validation", test_scores, _Untouchable(), val_scores, val_labels)
    assert np.array_equal(guarded.thresholds, choose_thresholds(val_scores, val_labels))
    permuted = np.random.default_rng(0).permutation(test_labels)
    for labels in (test_labels, permuted, 1 - test_labels):
        again = thresholds_for_protocol("validation", test_scores, labels, val_scores, val_labels)
        assert np.array_equal(again.thresholds, guarded.thresholds)
    assert "validation" in guarded.protocol and "oracle" not in guarded.protocol
    # The oracle, by contrast, follows the test labels.
    oracle = thresholds_for_protocol("oracle", test_scores, test_labels)
    oracle_permuted = thresholds_for_protocol("oracle", test_scores, permuted)
    assert np.array_equal(oracle.thresholds, choose_thresholds(test_scores, test_labels))
    assert not np.array_equal(oracle.thresholds, oracle_permuted.thresholds)


def test_fixed_protocol_and_unknown_protocol():
    fixed = thresholds_for_protocol("fixed", SCORES)
    assert fixed.protocol == "fixed-0.5" and fixed.thresholds.tolist() == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="unknown protocol"):
        thresholds_for_protocol("best", SCORES)
    with pytest.raises(ValueError, match="needs val_scores"):
        thresholds_for_protocol("validation", SCORES, LABELS)


def test_oracle_is_labelled_in_the_result_and_the_table():
    scores, labels = _synthetic(120, 3, seed=4)
    oracle = thresholds_for_protocol("oracle", scores, labels)
    assert "oracle" in oracle.protocol
    out = compute_metrics("multilabel", scores, labels, FINDINGS, oracle)
    assert out["threshold_protocol"] == oracle.protocol
    table = format_report_table(out)
    heading = table.splitlines()[0]
    assert heading.startswith("### ") and oracle.protocol in heading
    assert ORACLE_CAPTION in table
    auc = out["per_class"]["Effusion"]["auc"]
    assert f"| Effusion | {100 * auc:.2f} |" in table
    assert "classes: 3 AUC, 3 F1, 3 ACC" in table
    # An array of thresholds needs its protocol named; a ThresholdChoice carries its own.
    with pytest.raises(ValueError, match="threshold_protocol"):
        compute_metrics("multilabel", scores, labels, FINDINGS, oracle.thresholds)
    with pytest.raises(ValueError, match="contradicts"):
        compute_metrics("multilabel", scores, labels, FINDINGS, oracle, protocol="validation")

    val_scores, val_labels = _synthetic(120, 3, seed=5)
    validation = thresholds_for_protocol("validation", scores, None, val_scores, val_labels)
    honest = format_report_table(compute_metrics("multilabel", scores, labels, FINDINGS, validation))
    assert "oracle" not in honest and validation.protocol in honest.splitlines()[0]


def test_multiclass_and_binary_tables():
    true = np.array([0, 1, 2, 2, 1, 0])
    probs = np.eye(3)[[0, 1, 2, 1, 1, 0]] * 0.7 + 0.1
    table = format_report_table(compute_metrics("multiclass", probs, true, ["KL0", "KL1", "KL2"]))
    assert "| **KL2** | 0 | 1 | 1 |" in table  # row = true KL2: one called KL1, one KL2
    assert "| ordinal error (mean absolute grade difference) | 0.1667 |" in table
    fixed = ThresholdChoice(np.array([0.5]), "fixed-0.5")
    binary = compute_metrics("binary", SCORES[:, 0], LABELS[:, 0], "Pneumonia", fixed)
    line = [row for row in format_report_table(binary).splitlines() if row.startswith("| Pneumonia")][0]
    values = " | ".join(f"{100 * binary[key]:.2f}" for key in ("auc", "f1", "acc"))
    assert line == f"| Pneumonia | {values} | 0.5 | 3 / 7 |"


def test_bootstrap_ci_contains_the_point_auc_and_is_deterministic():
    scores, labels = _synthetic(300, 3, seed=6)
    out = compute_metrics("multilabel", scores, labels, FINDINGS, n_boot=500, seed=7)
    for name in FINDINGS:
        low, high = out["per_class"][name]["auc_ci"]
        assert low < out["per_class"][name]["auc"] < high
    low, high = out["auc_macro_ci"]
    assert low < out["auc_macro"] < high and high - low < 0.15
    assert out["bootstrap"] == {"n_boot": 500, "seed": 7, "alpha": 0.05, "n_used_macro": 500}

    first = bootstrap_auc_ci(scores, labels, n_boot=200, seed=7)
    assert bootstrap_auc_ci(scores, labels, n_boot=200, seed=7) == first
    assert bootstrap_auc_ci(scores, labels, n_boot=200, seed=8) != first


def test_bootstrap_skips_resamples_with_one_label_only():
    scores, labels = _synthetic(40, 2, seed=8, prevalence=0.5)
    labels[:, 1] = 0.0
    labels[[3, 17], 1] = 1.0  # two positives: many resamples draw neither
    ci = bootstrap_auc_ci(scores, labels, n_boot=300, seed=0)
    assert ci["n_used_per_class"][0] == 300
    assert 0 < ci["n_used_per_class"][1] < 300 and ci["n_used_macro"] == ci["n_used_per_class"][1]
    assert all(0 <= bound <= 1 for bound in ci["per_class"][1])


def test_resampled_auc_equals_sklearn_with_sample_weights():
    rng = np.random.default_rng(9)
    scores = np.round(rng.random(60), 1)  # many ties
    labels = (rng.random(60) < 0.4).astype(float)
    labels[::9] = NAN
    counts = rng.integers(0, 3, size=(4, 60))
    valid = ~np.isnan(labels)
    expected = [roc_auc_score(labels[valid], scores[valid], sample_weight=row[valid]) for row in counts]
    assert ResampledAUC(scores, labels)(counts) == pytest.approx(expected)


def test_evaluate_load_by_path_works_alone_offline(tmp_path):
    """A fresh process, from the repo root, with no hub and an empty HF_HOME, as a user would run it."""
    code = (
        "import json\n"
        "import evaluate\n"
        "m = evaluate.load('./radz/evaluation/radz_zero_shot')\n"
        "out = m.compute(predictions=[[0.9, 0.6], [0.2, 0.8], [0.7, 0.5]], references=[[1, 0], [0, 1], [0, 1]],\n"
        "                thresholds=0.5, threshold_protocol='fixed-0.5')\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["per_class"]["class_1"]["auc"] == pytest.approx(roc_auc_score([0, 1, 1], [0.6, 0.8, 0.5]))  # 0.5
    assert out["auc_macro"] == pytest.approx(0.75)
    assert out["threshold_protocol"] == "fixed-0.5"
    assert (tmp_path / "hf" / "modules").is_dir()  # the module was cached under the temporary HF_HOME
