"""The supervised fine-tuning baseline: LoRA on the LLaVA model's LLM with trl's `SFTTrainer`, then scored as VQA.

Training data are VQA conversations built from the training split's labels: for each (image, label) with a known
label, the question "Does this chest X-ray show {label}? Answer yes or no." and the answer "yes" or "no". The loss is
on the answer tokens only (completion-only). The label budget reproduces the knee-OA study's comparison (arXiv
2601.02443: LoRA on 500 class-balanced images works, 5,778 imbalanced images collapse): `balance_classes` gives every
(label, answer) pair the same number of questions, `max_samples` caps the number of questions, `shots` caps each
(label, answer) pair.

trl's own vision collator calls `processor(images=..., text=...)`, which a LLaVA-RadZ processor answers with its
DFAT passes, not a chat prompt; so `SFTTrainer` gets `VQACollator`, which builds the LLaVA prompt ids itself (the
same `VQAPrompt` the VQA baseline scores with) and masks the prompt out of the labels.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import numpy as np
import torch

from radz.training.lora import lora_target_regex

from radz.checkpoints import LoadedCheckpoint
from radz.evaluation.scorer import model_fingerprint, settings_key

from .base import pixel_values, select_rows, training_data_key
from .vqa import DEFAULT_QUESTION, VQAPrompt, VQAScorer

logger = logging.getLogger(__name__)
ADAPTER_FILE = "adapter_model.safetensors"
IGNORE_INDEX = -100


def vqa_training_items(labels: np.ndarray, label_names: list[str], shots, balance, max_samples, seed) -> list[tuple]:
    """`(row, label name, answer)` triples under the label budget; `labels` is `[N, C]` of 1/0/NaN.

    Each question's class is its (label, answer) pair, so `balance` evens out both the labels and yes/no.
    """
    rows, columns = np.nonzero(~np.isnan(labels))
    answers = labels[rows, columns].astype(np.int64)
    chosen = select_rows(columns * 2 + answers, shots, balance, max_samples, seed)
    return [(int(rows[i]), label_names[columns[i]], "yes" if answers[i] else "no") for i in chosen]


class VQACollator:
    """Batches of `{"image", "prompt", "completion"}` → LLaVA inputs with labels on the completion tokens only."""

    def __init__(self, prompt: VQAPrompt):
        self.prompt = prompt
        self.checkpoint = prompt.checkpoint

    def __call__(self, examples: list[dict]) -> dict:
        tokenizer = self.checkpoint.tokenizer
        sequences, targets = [], []
        for example in examples:
            prompt_ids = self.prompt.ids(example["prompt"])
            answer_ids = tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
            answer_ids = answer_ids + [tokenizer.eos_token_id]  # learn to stop after the answer
            sequences.append(prompt_ids + answer_ids)
            targets.append([IGNORE_INDEX] * len(prompt_ids) + answer_ids)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
        labels = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, (ids, target) in enumerate(zip(sequences, targets)):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(target)
            attention_mask[row, : len(ids)] = 1
        pixels = pixel_values(
            self.checkpoint.image_processor, [e["image"] for e in examples], "cpu", self.checkpoint.llava.dtype
        )
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "pixel_values": pixels}


class SFTScorer(VQAScorer):
    """LoRA-fine-tuned LLaVA, scored as `VQAScorer`. The adapter is cached under `output_dir/<settings hash>/`, so a
    rerun with the same settings, model and training data loads it instead of training again."""

    name = "sft"

    def __init__(
        self,
        checkpoint: LoadedCheckpoint,
        train_images: list[str],
        train_labels: np.ndarray,
        label_names: list[str],
        output_dir: str | Path,
        question: str = DEFAULT_QUESTION,
        shots: int | None = None,
        balance_classes: bool = False,
        max_samples: int | None = None,
        seed: int = 0,
        steps: int = -1,
        epochs: float = 1.0,
        batch_size: int = 4,
        learning_rate: float = 2e-4,
        lora_r: int = 8,
        lora_alpha: int = 16,
        max_new_tokens: int = 4,
    ):
        super().__init__(checkpoint, question=question, max_new_tokens=max_new_tokens)
        self.train_images, self.train_labels = list(train_images), np.asarray(train_labels, dtype=np.float64)
        self.label_names, self.question, self.output_dir = list(label_names), question, Path(output_dir)
        self.shots, self.balance_classes, self.max_samples, self.seed = shots, balance_classes, max_samples, seed
        self.steps, self.epochs, self.batch_size, self.learning_rate = steps, epochs, batch_size, learning_rate
        self.lora_r, self.lora_alpha = lora_r, lora_alpha
        self.train_data = training_data_key(self.train_images, self.train_labels)
        self.trained = False
        self.n_questions = 0
        self.train_log: list[dict] = []

    def settings(self) -> dict:
        keys = ("question", "shots", "balance_classes", "max_samples", "seed", "steps", "epochs", "batch_size",
                "learning_rate", "lora_r", "lora_alpha", "train_data")
        return {**super().settings(), **{key: getattr(self, key) for key in keys}}

    @property
    def adapter_dir(self) -> Path:
        training = {k: v for k, v in self.settings().items() if k not in ("template", "max_new_tokens")}
        return self.output_dir / settings_key({**training, **model_fingerprint(self.checkpoint.path)})

    def training_set(self) -> datasets.Dataset:
        items = vqa_training_items(
            self.train_labels, self.label_names, self.shots, self.balance_classes, self.max_samples, self.seed
        )
        if not items:
            raise ValueError("sft: the training split has no labelled (image, label) pair within the budget")
        return datasets.Dataset.from_dict(
            {
                "image": [self.train_images[row] for row, _, _ in items],
                "prompt": [self.question.format(label) for _, label, _ in items],
                "completion": [answer for _, _, answer in items],
            }
        )

    def prepare(self) -> None:
        if self.trained:
            return
        from peft import PeftModel

        adapter_dir = self.adapter_dir
        if (adapter_dir / ADAPTER_FILE).is_file():
            logger.info("sft: loading the cached adapter %s", adapter_dir)
            tuned = PeftModel.from_pretrained(self.checkpoint.llava, adapter_dir)
            self.train_log = json.loads((adapter_dir / "train_log.json").read_text())
        else:
            tuned = self._train(adapter_dir)
        self.checkpoint.llava = tuned.merge_and_unload().eval()
        self.n_questions = int(self.train_log[-1].get("questions", 0)) if self.train_log else 0
        self.trained = True

    def _train(self, adapter_dir: Path):
        from peft import LoraConfig
        from trl import SFTConfig, SFTTrainer

        train_set = self.training_set()
        use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        config = SFTConfig(
            output_dir=str(adapter_dir),
            max_steps=self.steps,
            num_train_epochs=self.epochs,
            per_device_train_batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            seed=self.seed,
            data_seed=self.seed,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            bf16=use_bf16,
            gradient_checkpointing=False,
            remove_unused_columns=False,  # the collator reads image / prompt / completion
            dataloader_pin_memory=False,
            completion_only_loss=True,  # VQACollator masks the prompt; stated for the record
            dataset_kwargs={"skip_prepare_dataset": True},
            max_length=None,
        )
        peft_config = LoraConfig(
            r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=0.0, target_modules=lora_target_regex(("q_proj", "v_proj")),
            task_type="CAUSAL_LM",
        )
        self.checkpoint.llava.train()
        trainer = SFTTrainer(
            model=self.checkpoint.llava,
            args=config,
            train_dataset=train_set,
            processing_class=self.checkpoint.processor,
            data_collator=VQACollator(self.prompt),
            peft_config=peft_config,
        )
        trainer.train()
        answers = np.array(train_set["completion"])
        self.train_log = [entry for entry in trainer.state.log_history if "loss" in entry]
        self.train_log.append({"questions": len(train_set), "yes_fraction": float((answers == "yes").mean())})
        trainer.model.save_pretrained(str(adapter_dir))
        (adapter_dir / "train_log.json").write_text(json.dumps(self.train_log, indent=2))
        return trainer.model

    def outputs(self, images, labels) -> dict[str, np.ndarray]:
        self.prepare()
        return super().outputs(images, labels)

    def summary(self) -> dict:
        return {"sft_adapter": str(self.adapter_dir), "sft_training_questions": self.n_questions,
                "sft_train_log": self.train_log}
