"""One training run of LLaVA-RadZ (DFAT + DKAM) with the transformers Trainer: build, train, save the merged
checkpoint with its model card, and push it to the hub when asked (`radz-train`, `train_radz.py`).

`--push_to_hub` uploads the final merged checkpoint only: the Trainer itself never pushes (its checkpoints hold
LoRA adapters and optimizer state, not the model users load).
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import set_seed

from radz.hub import push_checkpoint, write_model_card

from . import precision
from .args import DataArguments, ModelArguments, RadZTrainingArguments
from .data import RadZCollator, load_training_data, scan_dataset
from .lora import merged_model, prepare_for_training
from .checkpoints import resolve_resume
from .tower import run_tower_stage
from .trainer import AnchorBank, RadZTrainer

logger = logging.getLogger("radz.train")


def build_model(args: ModelArguments, training_args: RadZTrainingArguments):
    """(model, processor) from a LLaVA checkpoint (`--base_model`) or a preset (`--config`), with the knowledge;
    the base model in the precision of `--dtype` / `--bf16` / `--attn_implementation` / `--load_in_4bit`."""
    load_kwargs = precision.load_kwargs(args, training_args)
    overrides = {k: getattr(args, k) for k in ("dkam_lambda", "alignment") if getattr(args, k) is not None}
    if args.config is not None:
        from radz.presets import build_from_preset

        if args.num_cls_tokens is not None:
            overrides["num_cls_tokens"] = args.num_cls_tokens
        model, processor = build_from_preset(args.config, **overrides)
        model.llava.to(load_kwargs["dtype"])
        if args.attn_implementation is not None:
            model.set_attn_implementation(args.attn_implementation)
    else:
        from modeling_llava_radz import LlavaRadZForZeroShotClassification
        from processing_llava_radz import LlavaRadZProcessor

        cls_tokens = {"num_cls_tokens": args.num_cls_tokens} if args.num_cls_tokens is not None else {}
        processor = LlavaRadZProcessor.from_llava(args.base_model, vision_tower=args.vision_tower, **cls_tokens)
        model = LlavaRadZForZeroShotClassification.from_llava(
            args.base_model, processor=processor, load_kwargs=load_kwargs, vision_tower=args.vision_tower, **overrides
        )
    if args.knowledge is not None:
        from radz.knowledge import load_knowledge

        processor.set_knowledge(load_knowledge(args.knowledge))
    return model, processor


def train(model_args: ModelArguments, data_args: DataArguments, training_args: RadZTrainingArguments):
    """Build, train and save; returns the trainer (its `model` is the merged model afterwards)."""
    # The Trainer would push its LoRA checkpoints on every save; the merged model is pushed after save_final.
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False
    set_seed(training_args.seed)
    model, processor = build_model(model_args, training_args)

    # The main process builds the datasets cache first; the other ranks then read it.
    with training_args.main_process_first(desc="loading the data"):
        train_dataset, label_names = load_training_data(data_args, "train")
        eval_dataset, eval_label_names = load_training_data(data_args, "validation")
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
    save_final(trainer, processor, training_args.output_dir, model_args, data_args)
    if push_to_hub and trainer.is_world_process_zero():
        repo_id = training_args.hub_model_id or Path(training_args.output_dir).resolve().name
        url = push_checkpoint(
            training_args.output_dir, repo_id, private=training_args.hub_private_repo, token=training_args.hub_token
        )
        logger.info("pushed the merged model to %s", url)
    return trainer


def save_final(trainer: RadZTrainer, processor, output_dir: str, model_args=None, data_args=None):
    """The complete merged checkpoint: LoRA and token deltas folded in, processor, knowledge and model card beside
    it."""
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        model = merged_model(trainer.model)
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
        write_model_card(output_dir, model_args=model_args, data_args=data_args, training_args=trainer.args)
        logger.info("saved the merged model and its model card to %s", output_dir)
    trainer.accelerator.wait_for_everyone()
