"""Calibration: ECE, Brier score and reliability bins (radz/evaluation/calibration.py), the Platt fit, and the
round trip `evaluate_radz.py --calibrate` → config.calibration → `pipeline(..., calibrated=True)`
(calibration_llava_radz.py; its CalibrationError comes from the checkpoint's copy of the module: a ValueError)."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from transformers import pipeline

import evaluate_radz
from radz.evaluation.calibration import (
    apply_platt,
    brier_score,
    calibrated_scores,
    expected_calibration_error,
    fit_platt,
    reliability_bins,
    score_margins,
)
from radz.phantom import write_phantom_dataset

LABELS = ["Cardiomegaly", "Nodule", "No Finding"]


def test_ece_and_brier_by_hand():
    p = np.array([0.1, 0.2, 0.7, 0.9, 0.4])
    y = np.array([0, 1, 1, 1, np.nan])  # the NaN entry is unknown: skipped
    # Two bins: [0, .5) holds .1, .2 (confidence .15, accuracy .5); [.5, 1] holds .7, .9 (.8 and 1.0).
    assert expected_calibration_error(p, y, n_bins=2) == pytest.approx(0.5 * 0.35 + 0.5 * 0.2)
    assert brier_score(p, y) == pytest.approx((0.01 + 0.64 + 0.09 + 0.01) / 4)
    bins = reliability_bins(p, y, n_bins=2)
    np.testing.assert_allclose(bins["count"], [2, 2])
    np.testing.assert_allclose(bins["confidence"], [0.15, 0.8])
    np.testing.assert_allclose(bins["accuracy"], [0.5, 1.0])
    # A probability of exactly 1 falls in the last bin; empty bins are NaN and do not count.
    bins = reliability_bins([1.0, 0.05], [1, 0], n_bins=4)
    np.testing.assert_allclose(bins["count"], [1, 0, 0, 1])
    assert np.isnan(bins["accuracy"][1])
    assert expected_calibration_error([1.0, 0.05], [1, 0], n_bins=4) == pytest.approx(0.025)
    # Perfect confident predictions: no error.
    assert expected_calibration_error([0.0, 1.0], [0, 1]) == 0 and brier_score([0.0, 1.0], [0, 1]) == 0
    with pytest.raises(ValueError, match="differ in size"):
        brier_score([0.5, 0.5], [1])


def test_platt_recovers_a_known_miscalibration():
    rng = np.random.default_rng(0)
    margin = rng.normal(0, 2, 20000)
    labels = (rng.random(margin.size) < 1 / (1 + np.exp(-(0.5 * margin - 1.0)))).astype(float)
    scores = 1 / (1 + np.exp(-margin))  # overconfident and biased: the truth is sigmoid(0.5 m - 1)
    np.testing.assert_allclose(score_margins(scores), margin, atol=1e-6)
    fit = fit_platt(scores, labels)
    assert fit["scale"] == pytest.approx(0.5, abs=0.05) and fit["bias"] == pytest.approx(-1.0, abs=0.08)
    after = apply_platt(scores, **fit)
    assert expected_calibration_error(after, labels) < 0.02 < 0.1 < expected_calibration_error(scores, labels)
    assert brier_score(after, labels) < brier_score(scores, labels)
    assert fit_platt(scores[:10], np.ones(10)) is None  # one class: nothing to fit


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(directory, n_train=0, n_validation=24, n_test=12, size=64, seed=0)
    return directory


def test_calibrate_writes_the_checkpoint_and_the_pipeline_applies_it(tiny_checkpoint, phantom_dir, tmp_path):
    checkpoint = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, checkpoint)
    out = tmp_path / "eval"
    argv = ["--model", str(checkpoint), "--dataset", "generic", "--data_dir", str(phantom_dir), "--output_dir",
            str(out), "--labels", ",".join(LABELS), "--multi_label", "--batch_size", "4", "--chunk_size", "8"]
    record = evaluate_radz.main(argv + ["--calibrate"])
    assert "ECE before" in record["report_text"] and (out / "reliability_diagram.png").is_file()
    assert Image.open(out / "reliability_diagram.png").size[0] > 300
    report = json.loads((out / "calibration.json").read_text())
    calibration = json.loads((checkpoint / "config.json").read_text())["calibration"]
    assert calibration == report["calibration"] and calibration["method"] == "platt"
    assert calibration["settings"] == {"use_knowledge": True, "templates": ["IMPRESSION: {}."],
                                       "negative_template": "no {}"}
    assert set(calibration["labels"]) <= set(LABELS) and calibration["labels"]
    for name in ("before", "after"):
        assert 0 <= report[name]["ece"] <= 1 and 0 <= report[name]["brier"] <= 1
    # The pipeline's calibrated scores are the harness's Platt-scaled test predictions.
    predictions = pd.read_parquet(out / "predictions.parquet")
    raw = predictions[[f"score:{label}" for label in LABELS]].to_numpy()
    expected = calibrated_scores(raw, calibration, LABELS)
    clf = pipeline("zero-shot-image-classification", model=str(checkpoint), trust_remote_code=True)
    images = predictions["image"].tolist()
    results = clf(images, candidate_labels=LABELS, multi_label=True, calibrated=True, batch_size=4)
    got = np.array([[{r["label"]: r["score"] for r in ranked}[label] for label in LABELS] for ranked in results])
    np.testing.assert_allclose(got, expected, atol=2e-5)
    uncalibrated = clf(images[:2], candidate_labels=LABELS, multi_label=True)
    assert not np.allclose([r["score"] for r in uncalibrated[0]], [r["score"] for r in results[0]])

    # Only for the settings it was fitted with, and only for per-label scores.
    with pytest.raises(ValueError, match="templates"):
        clf(images[0], candidate_labels=LABELS, multi_label=True, calibrated=True, hypothesis_template="a {}")
    with pytest.raises(ValueError, match="use_knowledge"):
        clf(images[0], candidate_labels=LABELS, multi_label=True, calibrated=True, use_knowledge=False)
    with pytest.raises(ValueError, match="multi_label=True"):
        clf(images[0], candidate_labels=LABELS, calibrated=True)


def test_calibrated_needs_a_calibration_and_calibrate_needs_multi_label(tiny_checkpoint, phantom_dir, tmp_path):
    clf = pipeline("zero-shot-image-classification", model=str(tiny_checkpoint), trust_remote_code=True)
    with pytest.raises(ValueError, match="holds no calibration.*--calibrate"):
        clf(np.zeros((32, 32), np.uint8), candidate_labels=LABELS, multi_label=True, calibrated=True)
    argv = ["--model", str(tiny_checkpoint), "--dataset", "generic", "--data_dir", str(phantom_dir),
            "--output_dir", str(tmp_path), "--labels", ",".join(LABELS), "--calibrate", "--no-multi_label"]
    with pytest.raises(SystemExit) as exit_info:
        evaluate_radz.main(argv)
    assert exit_info.value.code == 2
