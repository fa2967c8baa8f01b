"""Zero-shot evaluation of LLaVA-RadZ and its baselines on any radiology dataset reader.

    python evaluate_radz.py --model CKPT --dataset chexpert --data_dir /data/CheXpert-v1.0-small --split valid \\
        --threshold_protocol fixed --bootstrap 1000 --output_dir outputs/eval

Methods (`--method`): `radz` (LLaVA-RadZ through its zero-shot pipeline), `vqa` (ask the LLaVA model yes/no),
`vision_probe` (the vision tower alone + a logistic-regression probe on the training split), `sft` (LoRA fine-tuning
with trl's SFTTrainer, then scored as vqa). Thresholds for F1/ACC: chosen on a validation split (default), fixed 0.5,
or the oracle (test labels; always labelled "oracle"). Outputs in --output_dir: predictions.parquet, metrics.json,
report.md, roc_curves.png; predictions are written in chunks under chunks/, so a rerun resumes. See
radz/evaluation/harness.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from radz.datasets import READERS
from radz.evaluation.harness import EvaluationConfig, EvaluationError, run_evaluation
from radz.evaluation.methods import METHODS
from radz.evaluation.metrics import PROTOCOLS


def read_templates(path: str) -> list[str]:
    """One template per non-empty line, each with one `{}` where the label goes."""
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    templates = [line for line in lines if line and not line.startswith("#")]
    if not templates:
        raise EvaluationError(f"{path}: no templates (one per line, with '{{}}' for the label)")
    return templates


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evaluate_radz.py", description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument("--model", required=True, help="checkpoint directory (LLaVA-RadZ, or plain LLaVA for baselines)")
    data.add_argument("--dataset", required=True, choices=sorted(READERS))
    data.add_argument("--data_dir", required=True, help="dataset folder (generic: a table file or a folder)")
    data.add_argument("--split", default="test")
    data.add_argument("--labels", help="comma-separated label names to evaluate (default: all of the dataset's)")
    data.add_argument("--uncertain", choices=("ones", "zeros", "ignore"), help="CheXpert/MIMIC -1 policy")
    data.add_argument("--limit", type=int, help="evaluate only the first N images (of the test and validation splits)")
    data.add_argument("--output_dir", required=True, type=Path)

    method = parser.add_argument_group("method")
    method.add_argument("--method", choices=METHODS, default="radz")
    method.add_argument("--multi_label", action=argparse.BooleanOptionalAction, default=None,
                        help="radz: score each label against 'no {label}' (default for binary/multi-label sets) "
                             "instead of a softmax over the labels (default for multi-class sets)")
    knowledge = method.add_mutually_exclusive_group()
    knowledge.add_argument("--use_knowledge", dest="use_knowledge", action="store_true", default=True,
                           help="radz: score labels with DKAM anchors where the knowledge base has them (default)")
    knowledge.add_argument("--no_knowledge", dest="use_knowledge", action="store_false")
    method.add_argument("--templates", help="file with one prompt template per line ('{}' = label): each is "
                                            "evaluated separately; reports mean/std of the AUC across them")
    method.add_argument("--batch_size", type=int, default=8)
    method.add_argument("--chunk_size", type=int, default=64, help="images per resumable prediction chunk")
    method.add_argument("--device", help="default: cuda when available, else cpu")
    method.add_argument("--seed", type=int, default=0)
    method.add_argument("--max_new_tokens", type=int, default=4, help="vqa/sft: length of the generated answer")

    thresholds = parser.add_argument_group("thresholds and statistics")
    thresholds.add_argument("--threshold_protocol", choices=PROTOCOLS, default="validation")
    thresholds.add_argument("--validation_split", help="default: the reader's own (valid, val, validation...)")
    thresholds.add_argument("--bootstrap", type=int, default=0, help="resamples for 95%% AUC confidence intervals")
    thresholds.add_argument("--calibrate", action="store_true",
                            help="radz --multi_label: fit per-label Platt scaling on the validation split, save it "
                                 "in the checkpoint (config.calibration, for pipeline(..., calibrated=True)) and "
                                 "report ECE, Brier score and a reliability diagram before and after")

    training = parser.add_argument_group("trained baselines (vision_probe, sft)")
    training.add_argument("--train_split", default="train")
    training.add_argument("--shots", type=int, help="label budget: at most K training items per class")
    training.add_argument("--balance_classes", action="store_true",
                          help="cut every class to the smallest one (default: the natural class mix)")
    training.add_argument("--probe_pooling", choices=("cls", "mean"), default="cls")
    training.add_argument("--probe_C", type=float, default=1.0, help="inverse L2 strength of the probe")
    training.add_argument("--sft_max_samples", type=int, help="sft: at most this many training questions")
    training.add_argument("--sft_steps", type=int, default=-1, help="sft: optimizer steps (-1: --sft_epochs)")
    training.add_argument("--sft_epochs", type=float, default=1.0)
    training.add_argument("--sft_batch_size", type=int, default=4)
    training.add_argument("--sft_learning_rate", type=float, default=2e-4)
    training.add_argument("--lora_r", type=int, default=8)
    training.add_argument("--lora_alpha", type=int, default=16)
    return parser


def config_from_args(args: argparse.Namespace) -> EvaluationConfig:
    options = vars(args).copy()
    options["labels"] = [label.strip() for label in args.labels.split(",") if label.strip()] if args.labels else None
    options["templates"] = read_templates(args.templates) if args.templates else None
    return EvaluationConfig(**options)


def main(argv: list[str] | None = None) -> dict:
    """Run one evaluation; returns the metrics.json record (with `report_text`). Errors that need the user to
    choose (no validation split, unknown labels...) exit with status 2 and say what to pass."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        record = run_evaluation(config_from_args(args))
    except EvaluationError as error:
        parser.exit(2, f"evaluate_radz.py: error: {error}\n")
    print(record["report_text"])
    protocol = record["threshold_protocol"]
    if record["oracle"]:
        print(f"threshold protocol: {protocol} — ORACLE: thresholds chosen on the test labels")
    else:
        print(f"threshold protocol: {protocol}")
    print(f"outputs: {args.output_dir}")
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
