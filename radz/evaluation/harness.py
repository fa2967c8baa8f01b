"""The zero-shot evaluation harness behind `evaluate_radz.py`: data, the shared scoring loop, thresholds, outputs.

One run = one method (`radz.evaluation.methods`) on one split of one dataset:

1. load the split with a `radz.datasets` reader (any reader, or one's own data through `generic`);
2. score every image with the method, in chunks written to `OUT/chunks/<split>-<settings hash>/chunk_NNNNN.parquet`;
   a rerun reuses finished chunks (a chunk is reused only when the settings hash *and* its image paths match), so
   an interrupted run resumes and gives identical predictions, while a changed setting never reads stale chunks;
3. choose F1/ACC thresholds by the protocol: `validation` (default; the validation split is scored with the same
   method and its labels choose the thresholds; the test labels are never read for them), `fixed` (0.5) or `oracle`
   (best F1 on the test labels, as MedKLIP / KAD do: labelled "oracle" in every output);
4. metrics through `radz.evaluation.metrics` (the `radz_zero_shot` evaluate module), optional bootstrap CIs;
5. write `predictions.parquet`, `metrics.json`, `report.md` and `roc_curves.png` (`outputs.py`).

With `templates`, steps 2-5 run once per template (into `OUT/template_NN/`) and the top-level outputs report the
mean and standard deviation of the summary AUC across templates (prompt sensitivity).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from radz.datasets import DATASETS, dataset_metadata, load_split

from .calibration import calibrate_checkpoint
from .distributed import Shard, current_shard
from .methods import METHODS, EvaluationError, build_scorer
from .metrics import ORACLE_CAPTION, PROTOCOLS, SUMMARY_AUC_KEY, ThresholdChoice, compute_metrics
from .metrics import thresholds_for_protocol
from .outputs import compute_record, prediction_columns, write_json, write_run_outputs
from .scorer import default_device, model_fingerprint, settings_key

# The threshold protocol of a run that asked for validation thresholds on a dataset without a validation split.
NO_VALIDATION = "none: no validation split, so no F1/ACC thresholds (AUC needs none)"


@dataclass
class EvaluationConfig:
    """Every option of `evaluate_radz.py` (see its `--help`)."""

    model: str
    dataset: str
    data_dir: str
    output_dir: Path
    split: str = "test"
    labels: list[str] | None = None
    multi_label: bool | None = None  # None: per-label scores except for multi-class sets
    use_knowledge: bool = True
    negative_template: str = "no {}"  # radz --multi_label: what each label is scored against
    method: str = "radz"
    threshold_protocol: str = "validation"
    validation_split: str | None = None  # None: the dataset's own (radz.datasets.DATASETS)
    train_split: str = "train"
    bootstrap: int = 0
    templates: list[str] | None = None
    batch_size: int = 8
    chunk_size: int = 64
    limit: int | None = None
    seed: int = 0
    device: str | None = None
    uncertain: str | None = None
    # baselines
    max_new_tokens: int = 4
    shots: int | None = None
    balance_classes: bool = False
    probe_pooling: str = "cls"
    probe_C: float = 1.0
    sft_max_samples: int | None = None
    sft_steps: int = -1
    sft_epochs: float = 1.0
    sft_batch_size: int = 4
    sft_learning_rate: float = 2e-4
    lora_r: int = 8
    lora_alpha: int = 16
    reader_kwargs: dict = field(default_factory=dict)
    calibrate: bool = False  # fit per-label Platt scaling on the validation split into the checkpoint

    def __post_init__(self):
        self.output_dir = Path(self.output_dir)
        self.device = self.device or default_device()
        if self.threshold_protocol not in PROTOCOLS:
            raise EvaluationError(f"--threshold_protocol must be one of {PROTOCOLS}, got {self.threshold_protocol!r}")
        if self.uncertain is not None:
            self.reader_kwargs = {**self.reader_kwargs, "uncertain": self.uncertain}


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class EvalData:
    """One split: image paths, labels as a `[N, C]` 1/0/NaN matrix (one-hot for multi-class) and what they mean."""

    dataset: str
    split: str
    images: list[str]
    label_matrix: np.ndarray
    label_names: list[str]
    task: str

    @property
    def targets(self) -> np.ndarray:
        """Labels as the metric module takes them: `[N, C]` multilabel, `[N]` binary, `[N]` class ids multiclass."""
        if self.task == "multiclass":
            return np.nan_to_num(self.label_matrix).argmax(axis=1)
        return self.label_matrix[:, 0] if self.task == "binary" else self.label_matrix

    def head(self, limit: int | None) -> "EvalData":
        return self if limit is None else self.rows(slice(limit))

    def without(self, images) -> "EvalData":
        """The rows whose image is not in `images`."""
        excluded = set(images)
        return self.rows([index for index, image in enumerate(self.images) if image not in excluded])

    def rows(self, index) -> "EvalData":
        images = np.asarray(self.images, dtype=object)[index].tolist()
        return EvalData(self.dataset, self.split, images, self.label_matrix[index], self.label_names, self.task)


def load_eval_data(config: EvaluationConfig, split: str) -> EvalData:
    """Read one split with `radz.datasets.load_split` and keep the requested labels (all of them by default)."""
    # A generic image folder's class folders stand for the evaluated split only, never for the validation split.
    ds = load_split(config.dataset, config.data_dir, split, labels=config.labels, whole_folder=split == config.split,
                    **config.reader_kwargs)  # fmt: skip
    meta = dataset_metadata(ds)
    names, task = list(meta["label_names"]), meta["task"]
    matrix = np.asarray(ds["labels"], dtype=np.float64).reshape(len(ds), len(names))
    if config.labels:
        unknown = [label for label in config.labels if label not in names]
        if unknown:
            raise EvaluationError(f"--labels {unknown} are not labels of {config.dataset}; it has {names}")
        if task == "multiclass" and sorted(config.labels) != sorted(names):
            raise EvaluationError(f"{config.dataset} is multi-class: score all its classes {names}, not a subset")
        matrix = matrix[:, [names.index(label) for label in config.labels]]
        names = list(config.labels)
        if task == "multilabel" and len(names) == 1:
            task = "binary"
    if len(ds) == 0:
        raise EvaluationError(f"{config.dataset} split {split!r} at {config.data_dir} holds no images")
    return EvalData(meta["dataset"], split, list(ds["image"]), matrix, names, task)


def validation_split(config: EvaluationConfig) -> tuple[str | None, str]:
    """The validation split that chooses thresholds, and how it is made when it is not an official one: an explicit
    `--validation_split` wins, else the dataset's own (`DATASETS`); None where the dataset has none."""
    if config.validation_split is not None:
        return config.validation_split, ""
    spec = DATASETS[config.dataset]
    return spec.validation_split, spec.validation_note


def load_validation(config: EvaluationConfig, task: str) -> EvalData | None:
    """The validation split for the `validation` protocol; None when no thresholds are needed, or when the dataset
    has no validation split (then AUC alone is reported: it needs no threshold).

    A validation split that is named but cannot be read is an error that says so: the run falls back to `fixed` or
    `oracle` only when asked.
    """
    if config.threshold_protocol != "validation" or task == "multiclass":
        return None
    split, _ = validation_split(config)
    advice = (
        "pass --validation_split NAME, or choose another protocol explicitly: --threshold_protocol fixed (0.5) or "
        "--threshold_protocol oracle (thresholds on the test labels, reported as oracle)"
    )
    if split is None:
        return None
    if split == config.split:
        raise EvaluationError(f"the validation split {split!r} is the evaluated split: thresholds would be oracle; "
                              f"{advice}")
    try:
        return load_eval_data(config, split).head(config.limit)
    except (FileNotFoundError, ValueError) as error:
        if isinstance(error, EvaluationError):
            raise
        raise EvaluationError(f"{config.dataset}: the validation split {split!r} cannot be read ({error}); "
                              f"{advice}") from error


# ----------------------------------------------------------------------------------------------------------------
# The shared scoring loop, chunked and resumable
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ScoringStats:
    images_scored: int = 0
    images_resumed: int = 0
    seconds: float = 0.0
    prepare_seconds: float = 0.0  # training a probe / an adapter, kept out of images/s


def score_split(scorer, data: EvalData, chunk_root: Path, settings: dict, config: EvaluationConfig,
                stats: ScoringStats, shard: Shard = Shard()) -> dict[str, np.ndarray] | None:
    """Score every image of `data`; returns `{"score": [N, C], ...}` (whatever `scorer.outputs` gives).

    Chunks of `config.chunk_size` images go to `chunk_root/<split>-<hash of settings>/`; a finished chunk is read back
    instead of recomputed when its image paths are the expected ones. With several processes (`shard`) each scores
    its own chunks and the main process gets all the predictions (`radz.evaluation.distributed`); the others get None.
    """
    chunk_dir = chunk_root / f"{data.split}-{settings_key(settings)}"
    chunk_dir.mkdir(parents=True, exist_ok=True)
    if shard.is_main:
        (chunk_dir / "settings.json").write_text(json.dumps(settings, indent=2, default=str))
    size = config.chunk_size
    mine = shard.chunks(math.ceil(len(data.images) / size))
    frames = {}
    total = sum(len(data.images[index * size : (index + 1) * size]) for index in mine)
    with tqdm(total=total, desc=f"{scorer.name} · {data.split}", unit="img", disable=not shard.is_main) as progress:
        for index in mine:
            images = data.images[index * size : (index + 1) * size]
            path = chunk_dir / f"chunk_{index:05d}.parquet"
            frame = _read_chunk(path, images)
            if frame is None:
                began = time.perf_counter()
                scorer.prepare()
                stats.prepare_seconds += time.perf_counter() - began
                began = time.perf_counter()
                frame = _score_chunk(scorer, images, data.label_names, config.batch_size, progress)
                stats.seconds += time.perf_counter() - began
                stats.images_scored += len(images)
                temporary = path.with_suffix(".tmp")
                frame.to_parquet(temporary, index=False)
                os.replace(temporary, path)  # a crash never leaves a half-written chunk behind
            else:
                stats.images_resumed += len(images)
                progress.update(len(images))
            frames[index] = frame
    frames = shard.gather(frames, stats)
    if frames is None:
        return None
    predictions = pd.concat(frames, ignore_index=True)
    kinds = sorted({column.split(":", 1)[0] for column in predictions.columns if ":" in column})
    return {kind: predictions[prediction_columns(kind, data.label_names)].to_numpy(np.float64) for kind in kinds}


def _read_chunk(path: Path, images: list[str]) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    frame = pd.read_parquet(path)
    return frame if frame["image"].tolist() == images else None


def _score_chunk(scorer, images, labels, batch_size, progress) -> pd.DataFrame:
    outputs: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        for kind, values in scorer.outputs(batch, labels).items():
            values = np.asarray(values, dtype=np.float64)
            if values.shape != (len(batch), len(labels)):
                raise ValueError(f"{scorer.name}.outputs()[{kind!r}] has shape {values.shape}, "
                                 f"expected {(len(batch), len(labels))}")
            outputs.setdefault(kind, []).append(values)
        progress.update(len(batch))
    columns = {"image": list(images)}
    for kind, parts in outputs.items():
        columns.update(zip(prediction_columns(kind, labels), np.concatenate(parts).T))
    return pd.DataFrame(columns)


# ----------------------------------------------------------------------------------------------------------------
# Thresholds and metrics
# ----------------------------------------------------------------------------------------------------------------


def evaluate_scores(task, scores, test: EvalData, protocol: str, val_scores=None, val: EvalData | None = None,
                    n_boot: int = 0, seed: int = 0) -> dict:
    """Metrics of `scores` on `test` under a threshold protocol.

    `validation` passes the validation scores and labels only: the test labels are not handed to the threshold
    choice at all. Multi-class sets predict the argmax and need no thresholds. `validation` without a validation
    split (`val` None) reports AUC alone: the thresholds are NaN, so F1/ACC are NaN.
    """
    if task == "multiclass":
        return compute_metrics(task, scores, test.targets, test.label_names, n_boot=n_boot, seed=seed)
    if protocol == "validation" and val is None:
        choice = ThresholdChoice(np.full(len(test.label_names), np.nan), NO_VALIDATION)
    else:
        choice = thresholds_for_protocol(
            protocol,
            test_scores=scores,
            test_labels=test.label_matrix if protocol == "oracle" else None,
            val_scores=val_scores,
            val_labels=None if val is None else val.label_matrix,
        )
    return compute_metrics(task, scores, test.targets, test.label_names, thresholds=choice, n_boot=n_boot, seed=seed)


def summary_auc(metrics: dict) -> float:
    """The one AUC a table compares: macro (multi-label), the AUC (binary) or one-vs-rest macro (multi-class)."""
    return metrics[SUMMARY_AUC_KEY[metrics["task"]]]


def read_metrics(path: str | os.PathLike) -> tuple[dict, dict]:
    """`(metrics.json as a whole, its metrics block)` whatever the protocol."""
    record = json.loads(Path(path).read_text())
    return record, record.get("metrics_oracle") or record.get("metrics") or {}


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def _check_config(config: EvaluationConfig, scorer) -> None:
    if config.templates and not scorer.supports_templates:
        raise EvaluationError(f"--templates: the {config.method} method takes no prompt")
    for template in config.templates or []:
        if template.count("{}") != 1:
            raise EvaluationError(f"template {template!r} must contain '{{}}' exactly once (where the label goes)")


def run_evaluation(config: EvaluationConfig) -> dict | None:
    """Evaluate `config.method` on `config.split`; write the outputs under `config.output_dir`; return metrics.json
    (None on the other processes of a multi-process run)."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    config.output_dir.mkdir(parents=True, exist_ok=True)
    test = load_eval_data(config, config.split).head(config.limit)
    if config.multi_label is None:
        config.multi_label = test.task != "multiclass"
    if test.task == "binary" and config.method == "radz" and not config.multi_label:
        raise EvaluationError("a binary set has one label: a softmax over it is always 1; use --multi_label")
    validation = load_validation(config, test.task)
    method = METHODS.get(config.method)
    train = load_eval_data(config, config.train_split) if method is not None and method.trained else None
    if train is not None and train.label_names != test.label_names:
        raise EvaluationError(f"train labels {train.label_names} differ from test labels {test.label_names}")
    if train is not None and validation is not None:
        train = train.without(validation.images)  # a validation split made from the training list (ChestX-ray14)
    shard = current_shard()
    if shard.world_size > 1 and method is not None and method.trained:
        raise EvaluationError(f"--method {config.method} trains before it scores; run it on one process "
                              "(python evaluate_radz.py), not under a multi-process launcher")
    if config.calibrate and (config.method != "radz" or not config.multi_label or validation is None
                             or len(config.templates or []) > 1):
        raise EvaluationError("--calibrate fits per-label scores of --method radz --multi_label on the validation "
                              "split (--threshold_protocol validation), for one template")
    scorer = build_scorer(config, train)
    _check_config(config, scorer)

    base = {
        "method": config.method,
        "model": str(config.model),
        "dataset": config.dataset,
        "data_dir": str(config.data_dir),
        "split": config.split,
        "validation_split": None if validation is None else validation.split,
        "validation_note": _validation_note(config, validation, test.task),
        "task": test.task,
        "label_names": test.label_names,
        "n_images": len(test.images),
        "requested_threshold_protocol": config.threshold_protocol,
    }
    templates = config.templates or [None]
    runs = []
    for index, template in enumerate(templates):
        if template is not None:
            scorer.template = template
        out_dir = config.output_dir / f"template_{index:02d}" if config.templates else config.output_dir
        runs.append(_evaluate_template(config, scorer, test, validation, out_dir, base, started, shard))
    if not shard.is_main:
        return None  # this process's predictions went to the main process, which writes the outputs
    if not config.templates:
        return runs[0]
    return _write_sensitivity(config, base, runs, started)


def _validation_note(config: EvaluationConfig, validation: EvalData | None, task: str) -> str:
    """What the report says about the split that chose the thresholds, when there is something to say."""
    if config.threshold_protocol != "validation" or task == "multiclass":
        return ""
    if validation is None:
        return f"{config.dataset} has no validation split: {NO_VALIDATION}; pass --validation_split NAME to choose one"
    note = validation_split(config)[1]
    return f"thresholds chosen on the validation split {validation.split!r}" + (f": {note}" if note else "")


def _evaluate_template(config, scorer, test, validation, out_dir, base, started, shard) -> dict | None:
    settings = {
        **scorer.settings(),
        **model_fingerprint(config.model),
        "dataset": config.dataset,
        "data_dir": str(Path(config.data_dir).resolve()),
        "reader_kwargs": config.reader_kwargs,
        "labels": test.label_names,
        "chunk_size": config.chunk_size,
    }
    stats = ScoringStats()
    chunk_root = out_dir / "chunks"
    outputs = score_split(scorer, test, chunk_root, settings, config, stats, shard)
    val_outputs = None
    if validation is not None:
        val_outputs = score_split(scorer, validation, chunk_root, settings, config, stats, shard)
    if not shard.is_main:
        return None
    val_scores = None if val_outputs is None else val_outputs["score"]
    metrics = evaluate_scores(test.task, outputs["score"], test, config.threshold_protocol, val_scores, validation,
                              config.bootstrap, config.seed)
    record = {**base, "template": scorer.template, "settings": scorer.settings(), "method_summary": scorer.summary()}
    record.update(scorer.output_metrics(outputs, test.label_matrix, test.label_names))
    record["compute"] = compute_record(stats, started)
    text = write_run_outputs(out_dir, record, metrics, test, outputs)
    if config.calibrate:
        _, markdown = calibrate_checkpoint(config.model, scorer.template, config.use_knowledge,
                                           config.negative_template, val_scores, validation, outputs["score"], test,
                                           out_dir)
        text += "\n" + markdown
        (out_dir / "report.md").write_text(text)
    return json.loads((out_dir / "metrics.json").read_text()) | {"report_text": text}


def _write_sensitivity(config, base, runs, started) -> dict:
    """Top-level metrics.json / report.md of a multi-template run: the summary AUC per template, mean and std."""
    aucs = [summary_auc(run.get("metrics_oracle") or run["metrics"]) for run in runs]
    values = np.array([np.nan if auc is None else auc for auc in aucs], dtype=np.float64)  # null = undefined AUC
    finite = values[np.isfinite(values)]
    sensitivity = {
        "templates": [run["template"] for run in runs],
        "summary_auc_key": SUMMARY_AUC_KEY[base["task"]],
        "summary_auc": values.tolist(),
        "mean": float(finite.mean()) if finite.size else None,
        "std": float(finite.std(ddof=1)) if finite.size > 1 else None,  # sample std across templates
        "runs": [str(config.output_dir / f"template_{i:02d}") for i in range(len(runs))],
    }
    oracle = any(run["oracle"] for run in runs)
    record = {**base, "threshold_protocol": runs[0]["threshold_protocol"], "oracle": oracle,
              "prompt_sensitivity": sensitivity, "compute": {"total_seconds": round(time.perf_counter() - started, 3)}}
    write_json(config.output_dir / "metrics.json", record)
    protocol = ("ORACLE thresholds — " + ORACLE_CAPTION) if oracle else f"thresholds: {record['threshold_protocol']}"
    lines = [
        f"# Prompt sensitivity: {config.method} on {config.dataset} / {config.split}",
        "",
        f"{len(runs)} templates, each evaluated separately ({protocol}). "
        f"Summary AUC = `{sensitivity['summary_auc_key']}` x100; per-template outputs in `template_NN/`.",
        "",
        "| # | template | AUC |",
        "|---|---|---|",
    ]
    for index, (template, auc) in enumerate(zip(sensitivity["templates"], values)):
        lines.append(f"| {index} | `{template}` | {'n/a' if math.isnan(auc) else f'{100 * auc:.2f}'} |")
    mean, std = sensitivity["mean"], sensitivity["std"]
    lines += ["", f"**mean ± std across templates: {_pct(mean)} ± {_pct(std)}**", ""]
    text = "\n".join(lines)
    (config.output_dir / "report.md").write_text(text)
    return record | {"report_text": text}


def _pct(value) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}"
