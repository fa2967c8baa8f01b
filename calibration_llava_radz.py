"""Calibrated multi-label probabilities of LLaVA-RadZ: per-label Platt scaling of the zero-shot margin.

A multi-label score is `sigmoid(m)`, where `m = s(label) - s(no label)` is the margin of the label's prompt (or
anchor) over its negation: a similarity, not a frequency. Platt scaling per label, `sigmoid(scale_k * m + bias_k)`,
fitted on a validation split (`evaluate_radz.py --calibrate`, `radz/evaluation/calibration.py`), makes it one. The fit
is saved in `config.calibration` (plain JSON inside config.json):

    {"method": "platt", "settings": {"use_knowledge": true, "templates": ["IMPRESSION: {}."],
     "negative_template": "no {}"}, "labels": {"Cardiomegaly": {"scale": 1.3, "bias": -0.8}, ...}, "fitted_on": "..."}

The pipeline applies it with `calibrated=True`, for the scoring settings it was fitted with only.

This file is remote code: `LlavaRadZForZeroShotClassification.save_pretrained` copies it into every checkpoint,
beside the pipeline that imports it. It depends only on torch and transformers (docs/design.md, "Remote code").
"""

import torch
from transformers.utils import logging

try:
    from .knowledge_llava_radz import normalize_label
except ImportError:
    from knowledge_llava_radz import normalize_label

logger = logging.get_logger(__name__)


class CalibrationError(ValueError):
    """`calibrated=True` cannot apply: no calibration in the checkpoint, or other scoring settings."""


def calibration_settings(templates, use_knowledge, negative_template="no {}") -> dict:
    """The scoring settings a calibration is fitted for (JSON-ready)."""
    return {"use_knowledge": bool(use_knowledge), "templates": list(templates), "negative_template": negative_template}


def resolve_calibration(config, options: dict):
    """The pipeline's `calibrated` option: None when off; else `config.calibration`, checked to hold for the call's
    `options` (multi-label, same templates, knowledge and negation), or a `CalibrationError` saying what differs."""
    if not options["calibrated"]:
        return None
    if options["calibrated"] is not True:
        raise TypeError(f"calibrated must be True or False, got {options['calibrated']!r}")
    calibration = getattr(config, "calibration", None)
    if not calibration:
        raise CalibrationError(
            "calibrated=True: this checkpoint holds no calibration; fit one with "
            "`evaluate_radz.py --model DIR ... --multi_label --calibrate` (it writes config.calibration)"
        )
    if calibration.get("method") != "platt":
        raise CalibrationError(f"config.calibration: unknown method {calibration.get('method')!r}; expected 'platt'")
    if not options["multi_label"]:
        raise CalibrationError("calibrated=True calibrates per-label scores: pass multi_label=True as well")
    templates = options["templates"] or (config.label_template,)
    settings = calibration_settings(templates, options["use_knowledge"], options["negative_template"])
    fitted = calibration.get("settings", {})
    for key, value in settings.items():
        if fitted.get(key) != value:
            raise CalibrationError(
                f"calibrated=True: the calibration was fitted with {key}={fitted.get(key)!r}, this call scores with "
                f"{key}={value!r}; score with the fitted settings, or refit"
            )
    return calibration


def margins(classifier, features) -> torch.Tensor:
    """`[n, K]` margins `s(label) - s(no label)` of a multi-label `ZeroShotClassifier` (float32)."""
    logits = classifier.logits(features).float()
    return logits[..., 0] - logits[..., 1]


def platt_parameters(calibration: dict, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Per label, `(scale, bias)` of `calibration["labels"]` (matched as `normalize_label` does); a label it lacks
    keeps scale 1, bias 0 (its uncalibrated score), with a warning."""
    fitted = {normalize_label(name): value for name, value in calibration["labels"].items()}
    scales, biases = [], []
    for label in labels:
        value = fitted.get(normalize_label(label))
        if value is None:
            logger.warning_once(f"calibrated=True: the calibration has no {label!r}; its score is uncalibrated")
            value = {"scale": 1.0, "bias": 0.0}
        scales.append(float(value["scale"]))
        biases.append(float(value["bias"]))
    return torch.tensor(scales), torch.tensor(biases)


def calibrated_probabilities(classifier, features, calibration: dict) -> torch.Tensor:
    """`[n, K]` `sigmoid(scale_k * m + bias_k)` of n images (`LlavaRadZFeatures`) against a multi-label classifier."""
    m = margins(classifier, features)
    scales, biases = platt_parameters(calibration, classifier.labels)
    return torch.sigmoid(m * scales.to(m.device) + biases.to(m.device))


__all__ = [
    "CalibrationError",
    "calibrated_probabilities",
    "calibration_settings",
    "margins",
    "platt_parameters",
    "resolve_calibration",
]
