"""The files of an evaluation run: predictions.parquet, metrics.json (strict JSON), report.md and roc_curves.png."""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .metrics import ORACLE_CAPTION, format_report_table


def prediction_columns(kind: str, labels: list[str]) -> list[str]:
    """Column names of one output kind in the predictions: `score:<label>`, `answer:<label>`."""
    return [f"{kind}:{label}" for label in labels]


def is_oracle(metrics: dict) -> bool:
    return "oracle" in str(metrics.get("threshold_protocol", "")).lower()


def metrics_key(metrics: dict) -> str:
    """The key of the metrics block in metrics.json: `metrics_oracle` when the thresholds came from test labels."""
    return "metrics_oracle" if is_oracle(metrics) else "metrics"


def _json_safe(value):
    """NaN / inf → null and numpy scalars → Python, so metrics.json is strict JSON."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    return value


def write_json(path: Path, record: dict) -> None:
    path.write_text(json.dumps(_json_safe(record), indent=2) + "\n")


def plot_roc_curves(scores: np.ndarray, data, path: Path, title: str) -> None:
    """One ROC curve per class (one-vs-rest for multi-class), in one PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    figure, axes = plt.subplots(figsize=(6, 6))
    for column, name in enumerate(data.label_names):
        truth = data.label_matrix[:, column]
        known = ~np.isnan(truth)
        if len(np.unique(truth[known])) < 2:
            continue  # no ROC curve without both labels
        fpr, tpr, _ = roc_curve(truth[known], scores[known, column])
        auc = roc_auc_score(truth[known], scores[known, column])
        axes.plot(fpr, tpr, label=f"{name} (AUC {100 * auc:.1f})")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    axes.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1))
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def compute_record(stats, started: float) -> dict:
    """Throughput, time and peak memory of a run (`stats`: a harness `ScoringStats`)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    record = {
        "images_scored": stats.images_scored,
        "images_resumed": stats.images_resumed,
        "scoring_seconds": round(stats.seconds, 3),
        "training_seconds": round(stats.prepare_seconds, 3),
        "images_per_second": round(stats.images_scored / stats.seconds, 3) if stats.seconds > 0 else None,
        "total_seconds": round(time.perf_counter() - started, 3),
        "peak_rss_mib": round(peak, 1),
    }
    if torch.cuda.is_available():
        record["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return record


def _compute_lines(compute: dict) -> list[str]:
    speed = compute["images_per_second"]
    return [
        "Compute: {} images scored ({} resumed from chunks), {} images/s, total {:.1f} s, peak RSS {:.0f} MiB.".format(
            compute["images_scored"], compute["images_resumed"], "n/a" if speed is None else f"{speed:.2f}",
            compute["total_seconds"], compute["peak_rss_mib"],
        ),
        "",
    ]


def _answer_lines(answers: dict) -> list[str]:
    return [
        "Generated answers (parsed as yes/no): parsed rate {:.1f}%, accuracy {:.2f}, F1 {:.2f} (macro x100; "
        "unparsed answers count as wrong / as no).".format(
            100 * answers["parsed_rate_macro"], 100 * answers["accuracy_macro"], 100 * (answers["f1_macro"] or 0.0)
        ),
        "",
    ]


def write_run_outputs(out_dir: Path, record: dict, metrics: dict, test, outputs: dict) -> str:
    """predictions.parquet, metrics.json, report.md, roc_curves.png for one scored run; returns the report text."""
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions = pd.DataFrame({"image": test.images})
    for kind, values in outputs.items():
        predictions = pd.concat([predictions, pd.DataFrame(values, columns=prediction_columns(kind, test.label_names))], axis=1)
    predictions.to_parquet(out_dir / "predictions.parquet", index=False)
    oracle = is_oracle(metrics)
    title = f"{record['method']} on {record['dataset']} / {record['split']}"
    title += " — ORACLE thresholds" if oracle else ""
    plot_roc_curves(outputs["score"], test, out_dir / "roc_curves.png", title)

    record = {**record, "threshold_protocol": metrics["threshold_protocol"], "oracle": oracle}
    if oracle:
        record["oracle_warning"] = ORACLE_CAPTION
    record[metrics_key(metrics)] = metrics
    record["outputs"] = {name: str(out_dir / name) for name in ("predictions.parquet", "report.md", "roc_curves.png")}
    write_json(out_dir / "metrics.json", record)

    lines = [f"# {title}", ""]
    if oracle:
        lines += [f"**ORACLE** — {ORACLE_CAPTION}; F1/ACC are optimistic and not comparable with validation "
                  "thresholds.", ""]
    lines += [f"Model: `{record['model']}` · method `{record['method']}` · {len(test.images)} images", ""]
    if record.get("validation_note"):
        lines += [f"Validation: {record['validation_note']}.", ""]
    lines += _compute_lines(record["compute"])
    if "generated_answers" in record:
        lines += _answer_lines(record["generated_answers"])
    heading = f"{record['method']} — {'ORACLE thresholds' if oracle else 'zero-shot results'}"
    text = "\n".join(lines) + "\n" + format_report_table(metrics, title=heading)
    (out_dir / "report.md").write_text(text)
    return text
