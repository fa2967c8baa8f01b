"""`RadZTrainer`: the DFAT + DKAM objective `λ·L_CA + (1−λ)·L_CG` on the transformers `Trainer`.

The model's forward computes the loss, once, with its loss module (`loss_llava_radz.LlavaRadZLoss`). Under data
parallel with `--gather_negatives` the trainer gives the model a loss module that gathers the embeddings and labels
of every rank, so that each rank computes the loss of the global batch, with gradients whose average over the ranks
is the global-batch gradient under DDP, FSDP and DeepSpeed alike (the loss module's docstring says how).
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict

import numpy as np
import torch
import torch.distributed as dist
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer import TRAINING_ARGS_NAME

from loss_llava_radz import LlavaRadZLoss
from zero_shot_llava_radz import build_zero_shot_classifier

from .checkpoints import STAGING_DIR, clear_staging, publish_checkpoint
from .data import BalancedClassSampler, RadZCollator, balance_keys
from .lora import NON_ADAPTER_FILE, non_adapter_state, unwrap


VISION_PARAMETER = re.compile(r"(^|\.)(vision_tower|multi_modal_projector)\.")


def distributed_world() -> int:
    """The data-parallel world size (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# ----------------------------------------------------------------------------------------------------------------
# DKAM anchors
# ----------------------------------------------------------------------------------------------------------------


class AnchorBank:
    """The tokenised knowledge descriptions of the label categories, for re-encoding the anchors every step.

    `sample(step)` picks at most `per_step` descriptions per category (all with `per_step=0`), at random but
    determined by `(seed, step)`: every data-parallel rank and a resumed run pick the same ones. Sampling keeps
    the anchor pass cheap (categories × per_step sequences per step) while every description is used over a run.
    """

    def __init__(self, processor, categories: list[str], per_step: int = 0, seed: int = 0):
        try:
            encoded = processor.encode_anchors(categories)
        except ValueError as error:
            raise ValueError(
                f"{error}. L_CG needs a description of every label {categories}: pass --knowledge with a knowledge "
                "file that covers them, or --dkam_lambda 1 to train with L_CA only"
            ) from error
        self.categories = list(categories)
        self.input_ids = encoded["anchor_input_ids"]
        self.attention_mask = encoded["anchor_attention_mask"]
        self.category_ids = encoded["anchor_category_ids"]
        self.members = [torch.nonzero(self.category_ids == c).flatten() for c in range(len(categories))]
        self.per_step, self.seed = per_step, seed

    def sample(self, step: int | None = None) -> dict[str, torch.Tensor]:
        """`anchor_input_ids`, `anchor_attention_mask`, `anchor_category_ids` for the model (all rows if step=None)."""
        if step is None or not self.per_step:
            rows = torch.arange(len(self.input_ids))
        else:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            picks = [m[torch.randperm(len(m), generator=generator)[: self.per_step]] for m in self.members]
            rows = torch.cat(picks).sort().values
        length = int(self.attention_mask[rows].sum(dim=1).max())  # right-padded: trim the common padding
        return {
            "anchor_input_ids": self.input_ids[rows, :length],
            "anchor_attention_mask": self.attention_mask[rows, :length],
            "anchor_category_ids": self.category_ids[rows],
        }


# ----------------------------------------------------------------------------------------------------------------
# Zero-shot evaluation
# ----------------------------------------------------------------------------------------------------------------


def mean_auc(scores: np.ndarray, labels: np.ndarray, label_names: list[str]) -> dict[str, float]:
    """Per-label ROC AUC over the known (non-NaN) entries and their mean; a label with one class only is NaN."""
    from sklearn.metrics import roc_auc_score

    result = {}
    for column, name in enumerate(label_names):
        known = ~np.isnan(labels[:, column])
        truth = labels[known, column]
        result[f"auc_{name}"] = (
            float(roc_auc_score(truth, scores[known, column])) if len(np.unique(truth)) == 2 else math.nan
        )
    defined = [v for v in result.values() if not math.isnan(v)]
    result["mean_auc"] = float(np.mean(defined)) if defined else math.nan
    return result


@torch.no_grad()
def zero_shot_scores(
    model, processor, dataset, label_names, batch_size: int, device="cpu", use_knowledge=True, multi_label=False
):
    """`[N, C]` zero-shot probabilities of the readable images against the labels, and their `[N, C]` labels.

    The classifier is the zero-shot pipeline's, with its defaults (`build_zero_shot_classifier`): a label found in
    the processor's knowledge base is scored against its DKAM anchor (with `use_knowledge`), any other by the text
    pass of its name; a softmax over the labels, or each label against "no {label}" with `multi_label`.
    """
    was_training = model.training
    model.eval()
    classifier = build_zero_shot_classifier(
        model, processor, label_names, multi_label=multi_label, use_knowledge=use_knowledge, batch_size=batch_size
    )
    collator = RadZCollator(processor, max_bad_fraction=1.0, require_report=False)
    scores, labels = [], []
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = collator(rows)
        labels.append(batch["labels"].numpy())
        image = model.get_image_features(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
        scores.append(classifier.probabilities(image).cpu().numpy())
    model.train(was_training)
    return np.concatenate(scores), np.concatenate(labels)


# ----------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------


class BadSampleCallback(TrainerCallback):
    """At the end of every epoch, enforce `--max_bad_fraction` on all samples seen, however few."""

    def __init__(self, collator: RadZCollator):
        self.collator = collator

    def on_epoch_end(self, args, state, control, **kwargs):
        self.collator.bad_log.check(final=True)


class RadZTrainer(Trainer):
    """Trainer for LlavaRadZForZeroShotClassification (plain or peft-wrapped).

    Extra arguments: `anchor_bank` (an `AnchorBank` over the training label names, for L_CG; None trains L_CA
    only), and for `evaluate`, `eval_label_names`.
    Logs `loss_alignment`, `loss_category` (with its image-side and text-side terms `loss_category_image` and
    `loss_category_text`), `temperature` (1/scale) and `retrieval_top1` (image→text top-1 on this rank's batch) next
    to `loss`.
    """

    # compute_loss returns a per-batch mean, so the Trainer must divide it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, anchor_bank=None, eval_label_names=None, **kwargs):
        self._staging_dir = None  # the temporary run directory while a checkpoint is written
        super().__init__(*args, **kwargs)
        self.anchor_bank = anchor_bank
        self.eval_label_names = list(eval_label_names or [])
        self._metric_sums = defaultdict(float)
        self._metric_steps = 0
        if isinstance(self.data_collator, RadZCollator):
            self.add_callback(BadSampleCallback(self.data_collator))
        if self.args.gather_negatives and self.accelerator.num_processes > 1:
            self._radz_model().loss_fn = LlavaRadZLoss(
                local_loss=self.args.local_loss,
                gather_with_grad=self.args.gather_with_grad,
                rank=self.accelerator.process_index,
                world_size=self.accelerator.num_processes,
            )

    # -- loss ------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        if labels is not None and self.anchor_bank is not None and self._radz_model().config.dkam_lambda < 1:
            anchors = self.anchor_bank.sample(self.state.global_step)
            inputs.update({k: v.to(self.args.device) for k, v in anchors.items()}, labels=labels)
        outputs = model(**inputs, return_loss=True)
        if model.training:
            self._record_metrics(outputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _radz_model(self):
        """The LlavaRadZForZeroShotClassification inside the engine and peft wrappers."""
        return unwrap(self.accelerator.unwrap_model(self.model))

    @torch.no_grad()
    def _record_metrics(self, outputs):
        sums = self._metric_sums
        sums["loss_alignment"] += float(outputs.loss_alignment)
        if outputs.loss_category is not None:
            sums["loss_category"] += float(outputs.loss_category)
            sums["loss_category_image"] += float(outputs.loss_category_image)
            sums["loss_category_text"] += float(outputs.loss_category_text)
        sums["temperature"] += 1.0 / float(outputs.logit_scale)
        logits = outputs.logits_per_image
        targets = torch.arange(len(logits), device=logits.device)
        sums["retrieval_top1"] += float((logits.argmax(dim=1) == targets).float().mean())
        self._metric_steps += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # The training log line (it carries "loss") gets the averages since the previous one.
        if "loss" in logs and self._metric_steps:
            logs.update({k: round(v / self._metric_steps, 6) for k, v in self._metric_sums.items()})
            self._metric_sums.clear()
            self._metric_steps = 0
        super().log(logs, start_time)

    # -- optimiser -------------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """The Trainer's optimiser; with `--vision_learning_rate`, the vision tower and the projector get their
        own learning rate (a tower trained from scratch wants a larger one than the LoRA weights)."""
        optimizer = super().create_optimizer(model)
        vision_lr = self.args.vision_learning_rate
        if vision_lr is None:
            return optimizer
        model = self.model if model is None else model
        vision = {id(p) for n, p in model.named_parameters() if VISION_PARAMETER.search(n)}
        groups = []
        for group in optimizer.param_groups:
            for is_vision in (False, True):
                params = [p for p in group["params"] if (id(p) in vision) == is_vision]
                if params:
                    groups.append({**group, "params": params, **({"lr": vision_lr} if is_vision else {})})
        optimizer.param_groups = groups
        return optimizer

    # -- sampling --------------------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        if not self.args.balance_classes:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return BalancedClassSampler(balance_keys(dataset["labels"]), seed=seed)

    # -- checkpoints -----------------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint, written under a temporary name and renamed when complete (`checkpoints.py`)."""
        run_dir = self._get_output_dir(trial)
        if self.args.should_save:
            clear_staging(run_dir)
        self.accelerator.wait_for_everyone()
        self._staging_dir = os.path.join(run_dir, STAGING_DIR)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()  # every rank's shards are written
        if self.args.should_save:
            publish_checkpoint(run_dir, self.state.global_step, self.state, self.args.save_total_limit)
        self.accelerator.wait_for_everyone()

    def _get_output_dir(self, trial):
        return self._staging_dir or super()._get_output_dir(trial)

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        if isinstance(self.model, PeftModel):
            # Under DeepSpeed ZeRO-3 the parameters are partitions: the Trainer passes their gathered values.
            trainable = non_adapter_state(self.model)
            source = state_dict or trainable
            state = {name: source[name].contiguous().cpu() for name in trainable if name in source}
            save_file(state, os.path.join(output_dir, NON_ADAPTER_FILE), metadata={"format": "pt"})
        # Checkpoint files are safetensors and JSON: the Trainer's pickled TrainingArguments becomes JSON.
        pickled = os.path.join(output_dir, TRAINING_ARGS_NAME)
        if os.path.isfile(pickled):
            os.remove(pickled)
        with open(os.path.join(output_dir, "training_args.json"), "w") as handle:
            handle.write(self.args.to_json_string())

    def _load_non_adapter(self, checkpoint: str, model=None):
        model = model if model is not None else self.model
        if not isinstance(model, PeftModel):
            return  # a plain model's checkpoint holds every weight
        path = os.path.join(checkpoint, NON_ADAPTER_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{checkpoint} lacks {NON_ADAPTER_FILE} (projector, heads, logit_scale)")
        state = load_file(path)
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
        missing = sorted(set(non_adapter_state(model)) - set(state))
        if unexpected or missing:
            raise ValueError(
                f"{path} does not match the trainable weights of this model (unexpected {unexpected[:3]}, missing "
                f"{missing[:3]}); resume with the same --lora_r / --train_vision_tower / --train_llm flags"
            )
        for name, param in model.named_parameters():
            if name in state:
                param.requires_grad_(True)  # loading the adapter must not freeze them again

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if not self.is_fsdp_enabled:  # FSDP's sharded checkpoint already holds every parameter
            self._load_non_adapter(resume_from_checkpoint, model)

    def _load_best_model(self):
        super()._load_best_model()
        self._load_non_adapter(self.state.best_model_checkpoint)

    # -- zero-shot evaluation --------------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Zero-shot AUC on the labelled validation set: the probabilities of the zero-shot pipeline's classifier
        (`zero_shot_scores`, with `--eval_use_knowledge` and `--eval_multi_label`), `roc_auc_score` per label over
        known entries. Runs on the main process; the metrics are broadcast so that every rank can use them (e.g.
        `metric_for_best_model`)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None or not self.eval_label_names:
            raise ValueError("evaluate needs a labelled validation set (--validation_file with labels)")
        if self.is_fsdp_enabled or is_deepspeed_zero3_enabled():
            # The main process alone cannot run a model whose parameters are sharded across the ranks.
            raise ValueError(
                "the zero-shot evaluation during training runs on the main process, which cannot use parameters "
                "sharded by FSDP or ZeRO-3: train with --eval_strategy no and evaluate the saved model with "
                "`accelerate launch evaluate_radz.py`"
            )
        names = self.eval_label_names
        values = torch.full((len(names) + 1,), math.nan, device=self.args.device)
        if self.is_world_process_zero():
            scores, labels = zero_shot_scores(
                unwrap(self.model), self.processing_class, dataset, names, self.args.per_device_eval_batch_size,
                self.args.device, use_knowledge=self.args.eval_use_knowledge, multi_label=self.args.eval_multi_label,
            )
            aucs = mean_auc(scores, labels, names)
            values = torch.tensor([aucs["mean_auc"]] + [aucs[f"auc_{n}"] for n in names], device=self.args.device)
        if distributed_world() > 1:
            dist.broadcast(values, src=0)
        keys = ["mean_auc"] + [f"auc_{n}" for n in names]
        metrics = {f"{metric_key_prefix}_{k}": float(v) for k, v in zip(keys, values.tolist())}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
