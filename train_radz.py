"""Train LLaVA-RadZ (DFAT + DKAM) with the transformers Trainer.

    accelerate launch train_radz.py --config tiny --train_file data.jsonl --knowledge chest.json \
        --output_dir out --max_steps 100 --per_device_train_batch_size 8 --report_to none
    accelerate launch train_radz.py --base_model llava-hf/llava-1.5-7b-hf --dataset_name mimic_cxr \
        --data_dir /data/mimic-cxr --knowledge chest --bf16 --output_dir out ...
    python train_radz.py generate-knowledge ...      # radz.knowledge.cli: write category descriptions

Every `TrainingArguments` flag works (`--save_steps`, `--resume_from_checkpoint`, `--gradient_accumulation_steps`,
`--use_cpu`, ...); `--resume_from_checkpoint latest` takes the newest complete checkpoint in `--output_dir`, or starts
fresh without one, so that one command starts and resumes a preemptible run. The output directory receives a
complete merged checkpoint (model, processor, knowledge) that loads with
`AutoModel`/`AutoProcessor.from_pretrained(dir, trust_remote_code=True)`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch.distributed as dist
from transformers import HfArgumentParser, set_seed

from radz.training import (
    AnchorBank,
    DataArguments,
    ModelArguments,
    RadZCollator,
    RadZTrainer,
    RadZTrainingArguments,
    load_split,
    merged_model,
    prepare_for_training,
    resolve_resume,
    run_tower_stage,
    scan_dataset,
)

logger = logging.getLogger("train_radz")


def load_knowledge_arg(name_or_path: str) -> dict:
    """A knowledge JSON file, or a set bundled with `radz.knowledge`."""
    from processing_llava_radz import read_knowledge_file

    if Path(name_or_path).suffix == ".json" or Path(name_or_path).is_file():
        return read_knowledge_file(name_or_path)
    from radz.knowledge import load_knowledge

    return load_knowledge(name_or_path)


def build_model(args: ModelArguments):
    """(model, processor) from a LLaVA checkpoint (`--base_model`) or a preset (`--config`), with the knowledge."""
    overrides = {k: getattr(args, k) for k in ("dkam_lambda", "alignment") if getattr(args, k) is not None}
    if args.config is not None:
        from radz.presets import build_from_preset

        if args.num_cls_tokens is not None:
            overrides["num_cls_tokens"] = args.num_cls_tokens
        model, processor = build_from_preset(args.config, **overrides)
    else:
        from modeling_llava_radz import LlavaRadZForZeroShotClassification
        from processing_llava_radz import LlavaRadZProcessor

        processor = LlavaRadZProcessor.from_llava(args.base_model, num_cls_tokens=args.num_cls_tokens or 8)
        model = LlavaRadZForZeroShotClassification.from_llava(args.base_model, processor=processor, **overrides)
    if args.knowledge is not None:
        processor.set_knowledge(load_knowledge_arg(args.knowledge))
    return model, processor


def train(model_args: ModelArguments, data_args: DataArguments, training_args: RadZTrainingArguments):
    """Build, train and save; returns the trainer (its `model` is the merged model afterwards)."""
    set_seed(training_args.seed)
    model, processor = build_model(model_args)

    # The main process builds the datasets cache first; the other ranks then read it.
    with training_args.main_process_first(desc="loading the data"):
        train_dataset, label_names = load_split(data_args, "train")
        eval_dataset, eval_label_names = load_split(data_args, "validation")
    train_dataset, _ = scan_dataset(train_dataset, training_args.max_bad_fraction)
    if training_args.balance_classes and not label_names:
        raise ValueError("--balance_classes needs labelled training data (--label_columns or --class_names)")

    anchor_bank = None
    if label_names and model.config.dkam_lambda < 1:
        anchor_bank = AnchorBank(
            processor, label_names, training_args.anchor_descriptions_per_step, seed=training_args.seed
        )
    elif model.config.dkam_lambda < 1:
        logger.warning("the training data has no labels: training with L_CA only (no DKAM category loss)")

    collator = RadZCollator(
        processor,
        max_bad_fraction=training_args.max_bad_fraction,
        min_samples=training_args.bad_check_min_samples,
        fallback_dataset=train_dataset,
        seed=training_args.seed,
    )
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    if training_args.tower_pretraining_steps > 0:
        run_tower_stage(model, processor, train_dataset, training_args, resuming=resume is not None)
    if training_args.calibration_samples > 0:
        # Deterministic (the first rows, the initial weights), so a resumed run recomputes the same buffers.
        rows = [train_dataset[i] for i in range(min(training_args.calibration_samples, len(train_dataset)))]
        batch = RadZCollator(processor, max_bad_fraction=1.0)(rows)
        model.calibrate_heads(batch, batch)
    model = prepare_for_training(model, model_args)
    trainer = RadZTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=processor,
        anchor_bank=anchor_bank,
        eval_label_names=eval_label_names,
    )
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    save_final(trainer, processor, training_args.output_dir)
    return trainer


def save_final(trainer: RadZTrainer, processor, output_dir: str):
    """The complete merged checkpoint: LoRA and token deltas folded in, processor and knowledge beside it."""
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        model = merged_model(trainer.model)
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
        logger.info("saved the merged model to %s", output_dir)
    trainer.accelerator.wait_for_everyone()


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "generate-knowledge":
        from radz.knowledge.cli import main as knowledge_main

        return knowledge_main(argv[1:])
    parser = HfArgumentParser((ModelArguments, DataArguments, RadZTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        train(model_args, data_args, training_args)
        return 0
    finally:
        # Without it a rank of a multi-process run sometimes aborts at exit (a known torch.distributed teardown race).
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
