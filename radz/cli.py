"""The command-line entry points of llava-radz (`[project.scripts]` in pyproject.toml).

    radz-train ...        train (DFAT + DKAM); `accelerate launch train_radz.py ...` for several processes
    radz-evaluate ...     zero-shot evaluation and the baselines (`evaluate_radz.py`)
    radz-knowledge ...    write DKAM category descriptions with an LLM
    radz-compare ...      LLaVA-RadZ against the baselines on SYNTHETIC phantoms, one table
    radz-push DIR REPO    upload a saved checkpoint (merged model, processor, knowledge, card) to the hub

Every `--help` lists the options with their defaults.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The default after each option's help, unless the help already says it or there is none; the description's own
    line breaks kept."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# ----------------------------------------------------------------------------------------------------------------
# radz-train
# ----------------------------------------------------------------------------------------------------------------


def train(argv: list[str] | None = None) -> int:
    """`radz-train` / `train_radz.py`: parse the Trainer-style flags and train; returns the exit status.
    `radz-train generate-knowledge ...` is `radz-knowledge ...`."""
    import torch.distributed as dist
    from transformers import HfArgumentParser

    from radz.training import DataArguments, ModelArguments, RadZTrainingArguments
    from radz.training.run import train as run_training

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "generate-knowledge":
        return knowledge(argv[1:])
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, RadZTrainingArguments),
        prog="radz-train",
        description="Train LLaVA-RadZ (DFAT + DKAM) with the transformers Trainer. Every TrainingArguments flag "
        "works; --push_to_hub uploads the final merged checkpoint (with its processor, knowledge and model card) "
        "to --hub_model_id.",
    )
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        run_training(model_args, data_args, training_args)
        return 0
    finally:
        # Without it a rank of a multi-process run sometimes aborts at exit (a known torch.distributed teardown race).
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# radz-evaluate
# ----------------------------------------------------------------------------------------------------------------

EVALUATE_DESCRIPTION = """Zero-shot evaluation of LLaVA-RadZ and its baselines on any radiology dataset reader.

    radz-evaluate --model CKPT --dataset chexpert --data_dir /data/CheXpert-v1.0-small --split valid \\
        --threshold_protocol fixed --bootstrap 1000 --output_dir outputs/eval

Methods (--method): radz (LLaVA-RadZ through its zero-shot pipeline), vqa (ask the LLaVA model yes/no), vision_probe
(the vision tower alone + a logistic-regression probe on the training split), sft (LoRA fine-tuning with trl's
SFTTrainer, then scored as vqa). Thresholds for F1/ACC: chosen on a validation split (default), fixed 0.5, or the
oracle (test labels; always labelled "oracle"). Outputs in --output_dir: predictions.parquet, metrics.json, report.md,
roc_curves.png; predictions are written in chunks under chunks/, so a rerun resumes. --update_card adds the results to
the checkpoint's model card (README.md)."""


def read_templates(path: str) -> list[str]:
    """One template per non-empty line, each with one `{}` where the label goes."""
    from radz.evaluation.harness import EvaluationError

    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    templates = [line for line in lines if line and not line.startswith("#")]
    if not templates:
        raise EvaluationError(f"{path}: no templates (one per line, with '{{}}' for the label)")
    return templates


def evaluate_parser() -> argparse.ArgumentParser:
    import radz.baselines  # noqa: F401  (registers the baseline methods)
    from radz.datasets import DATASETS
    from radz.evaluation.methods import METHODS
    from radz.evaluation.metrics import PROTOCOLS

    parser = argparse.ArgumentParser(
        prog="radz-evaluate", description=EVALUATE_DESCRIPTION, formatter_class=HelpFormatter
    )
    data = parser.add_argument_group("data")
    data.add_argument("--model", required=True, help="checkpoint directory (LLaVA-RadZ, or plain LLaVA for baselines)")
    data.add_argument("--dataset", required=True, choices=sorted(DATASETS), help="the dataset reader")
    data.add_argument("--data_dir", required=True, help="dataset folder (generic: a table file or a folder)")
    data.add_argument("--split", default="test", help="the split scored")
    data.add_argument("--labels", help="comma-separated label names to evaluate (default: all of the dataset's)")
    data.add_argument("--uncertain", choices=("ones", "zeros", "ignore"), help="CheXpert/MIMIC -1 policy")
    data.add_argument("--limit", type=int, help="evaluate only the first N images (of the test and validation splits)")
    data.add_argument("--output_dir", required=True, type=Path, help="where the outputs go")

    method = parser.add_argument_group("method")
    method.add_argument("--method", choices=list(METHODS), default="radz", help="the scoring method")
    method.add_argument("--multi_label", action=argparse.BooleanOptionalAction, default=None,
                        help="radz: score each label against 'no {label}' (default for binary/multi-label sets) "
                             "instead of a softmax over the labels (default for multi-class sets)")
    knowledge_group = method.add_mutually_exclusive_group()
    knowledge_group.add_argument("--use_knowledge", dest="use_knowledge", action="store_true", default=True,
                                 help="radz: score labels with DKAM anchors where the knowledge base has them")
    knowledge_group.add_argument("--no_knowledge", dest="use_knowledge", action="store_false",
                                 default=argparse.SUPPRESS,  # the default is --use_knowledge's
                                 help="radz: score every label by its prompt")
    method.add_argument("--negative_template", default="no {}",
                        help="radz --multi_label: what each label is scored against, '{}' = the label; without '{}', "
                             "one text for every label, e.g. 'No Finding' (each finding against a normal study)")
    method.add_argument("--templates", help="file with one prompt template per line ('{}' = label): each is "
                                            "evaluated separately; reports mean/std of the AUC across them")
    method.add_argument("--batch_size", type=int, default=8, help="images per forward pass")
    method.add_argument("--chunk_size", type=int, default=64, help="images per resumable prediction chunk")
    method.add_argument("--device", help="default: cuda when available, else cpu")
    method.add_argument("--seed", type=int, default=0, help="random seed")
    method.add_argument("--max_new_tokens", type=int, default=4, help="vqa/sft: length of the generated answer")

    thresholds = parser.add_argument_group("thresholds and statistics")
    thresholds.add_argument("--threshold_protocol", choices=PROTOCOLS, default="validation",
                            help="how F1/ACC thresholds are chosen")
    thresholds.add_argument("--validation_split", help="default: the dataset's own (valid, val, validation...); "
                                                            "ChestX-ray14: a patient-disjoint part of train_val_list")
    thresholds.add_argument("--bootstrap", type=int, default=0, help="resamples for 95%% AUC confidence intervals")
    thresholds.add_argument("--calibrate", action="store_true",
                            help="radz --multi_label: fit per-label Platt scaling on the validation split, save it "
                                 "in the checkpoint (config.calibration, for pipeline(..., calibrated=True)) and "
                                 "report ECE, Brier score and a reliability diagram before and after")

    training = parser.add_argument_group("trained baselines (vision_probe, sft)")
    training.add_argument("--train_split", default="train", help="the split the baselines train on")
    training.add_argument("--shots", type=int, help="label budget: at most K training items per class")
    training.add_argument("--balance_classes", action="store_true",
                          help="cut every class to the smallest one (otherwise the natural class mix)")
    training.add_argument("--probe_pooling", choices=("cls", "mean"), default="cls", help="vision_probe pooling")
    training.add_argument("--probe_C", type=float, default=1.0, help="inverse L2 strength of the probe")
    training.add_argument("--sft_max_samples", type=int, help="sft: at most this many training questions")
    training.add_argument("--sft_steps", type=int, default=-1, help="sft: optimizer steps (-1: --sft_epochs)")
    training.add_argument("--sft_epochs", type=float, default=1.0, help="sft: epochs when --sft_steps is -1")
    training.add_argument("--sft_batch_size", type=int, default=4, help="sft: batch size")
    training.add_argument("--sft_learning_rate", type=float, default=2e-4, help="sft: learning rate")
    training.add_argument("--lora_r", type=int, default=8, help="sft: LoRA rank")
    training.add_argument("--lora_alpha", type=int, default=16, help="sft: LoRA alpha")

    card = parser.add_argument_group("model card")
    card.add_argument("--update_card", action="store_true",
                      help="add the results to the model card (README.md) of --model")
    return parser


def evaluate_main(argv: list[str] | None = None) -> dict | None:
    """Run one evaluation; returns the metrics.json record (with `report_text`; None on the other processes of a
    multi-process run, `accelerate launch ... radz-evaluate`, which shards the chunks across the processes).
    Errors that need the user to choose (no validation split, unknown labels...) exit with status 2 and say what to
    pass."""
    import torch.distributed as dist

    from radz.evaluation.harness import EvaluationConfig, EvaluationError, run_evaluation

    parser = evaluate_parser()
    args = parser.parse_args(argv)
    options = vars(args).copy()
    update_card = options.pop("update_card")
    options["labels"] = [label.strip() for label in args.labels.split(",") if label.strip()] if args.labels else None
    try:
        options["templates"] = read_templates(args.templates) if args.templates else None
        record = run_evaluation(EvaluationConfig(**options))
    except EvaluationError as error:
        parser.exit(2, f"radz-evaluate: error: {error}\n")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if record is None:
        return None  # another process of a multi-process run; the main process reports
    print(record["report_text"])
    protocol = record["threshold_protocol"]
    if record["oracle"]:
        print(f"threshold protocol: {protocol} — ORACLE: thresholds chosen on the test labels")
    else:
        print(f"threshold protocol: {protocol}")
    if update_card:
        from radz.hub import CARD_FILE, update_model_card

        update_model_card(args.model, [record])
        print(f"model card updated: {Path(args.model) / CARD_FILE}")
    print(f"outputs: {args.output_dir}")
    return record


def evaluate(argv: list[str] | None = None) -> int:
    """`radz-evaluate`: `evaluate_main`, returning the exit status."""
    evaluate_main(argv)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# radz-knowledge, radz-compare, radz-push
# ----------------------------------------------------------------------------------------------------------------


def knowledge(argv: list[str] | None = None) -> int:
    """`radz-knowledge`: write a DKAM knowledge file with an LLM (radz.knowledge.cli)."""
    from radz.knowledge.cli import main

    main(argv)
    return 0


def compare(argv: list[str] | None = None) -> int:
    """`radz-compare`: the four methods on SYNTHETIC phantoms, one table (radz.compare)."""
    from radz.compare import main

    main(argv)
    return 0


def push_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="radz-push",
        description="Upload a saved LLaVA-RadZ checkpoint (merged model, processor, knowledge, model card) to the "
        "Hugging Face hub. The folder is checked first; Trainer checkpoints and pickled files are never uploaded.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("directory", type=Path, help="the checkpoint directory (the output of radz-train)")
    parser.add_argument("repo_id", help="the hub repository, 'user/name' or 'org/name'")
    parser.add_argument("--private", action=argparse.BooleanOptionalAction, default=None,
                        help="create the repository private (default: the hub's default)")
    parser.add_argument("--token", help="a hub token (default: the one `hf auth login` stored)")
    parser.add_argument("--commit_message", default="Upload LLaVA-RadZ checkpoint", help="the commit message")
    return parser


def push(argv: list[str] | None = None) -> int:
    """`radz-push DIR REPO_ID`: check and upload a saved checkpoint."""
    from radz.hub import CheckpointError, push_checkpoint

    parser = push_parser()
    args = parser.parse_args(argv)
    try:
        url = push_checkpoint(args.directory, args.repo_id, private=args.private, token=args.token,
                              commit_message=args.commit_message)
    except CheckpointError as error:
        parser.exit(2, f"radz-push: error: {error}\n")
    print(f"pushed {args.directory} to {url}")
    return 0
