"""The scoring methods of `evaluate_radz.py --method`, built from one evaluation config.

`radz` is LLaVA-RadZ through its zero-shot pipeline; the baselines (`vqa`, `vision_probe`, `sft`) live in
`radz.baselines`. Every method is a `radz.baselines.Scorer`, so the harness runs them through the same loop.
"""

from __future__ import annotations

import numpy as np
from transformers import AutoConfig, pipeline

from radz.baselines import Scorer, SFTScorer, VisionProbeScorer, VQAScorer, default_question, load_checkpoint

TASK = "zero-shot-image-classification"
METHODS = ("radz", "vqa", "vision_probe", "sft")
TRAINED_METHODS = ("vision_probe", "sft")


class EvaluationError(ValueError):
    """A run that cannot go ahead as asked (no validation split, a checkpoint the method cannot use...); the message
    says why and what to pass instead. The CLI reports it as a usage error."""


class RadZScorer(Scorer):
    """LLaVA-RadZ zero-shot scores through `pipeline("zero-shot-image-classification", model=dir, ...)`.

    `multi_label`: each label against "no {label}" (a probability per label); otherwise a softmax over the labels.
    `template` is the pipeline's `hypothesis_template` (None: the model's `config.label_template`).
    """

    name = "radz"
    supports_templates = True

    def __init__(self, model_dir: str, multi_label: bool, use_knowledge: bool, batch_size: int, device: str):
        model_type = AutoConfig.from_pretrained(model_dir, trust_remote_code=True).model_type
        if model_type != "llava_radz":
            raise EvaluationError(
                f"--method radz needs a LLaVA-RadZ checkpoint; {model_dir} holds model_type {model_type!r} "
                "(use --method vqa / vision_probe / sft for a plain LLaVA model)"
            )
        self.pipe = pipeline(TASK, model=model_dir, trust_remote_code=True, device=device)
        self.multi_label, self.use_knowledge, self.batch_size = multi_label, use_knowledge, batch_size
        self.anchored: dict[str, bool] = {}

    def settings(self) -> dict:
        return {**super().settings(), "multi_label": self.multi_label, "use_knowledge": self.use_knowledge}

    def score(self, images, labels) -> np.ndarray:
        results = self.pipe(
            list(images),
            candidate_labels=list(labels),
            multi_label=self.multi_label,
            use_knowledge=self.use_knowledge,
            hypothesis_template=self.template,
            batch_size=self.batch_size,
            return_anchors=True,
        )
        scores = np.zeros((len(images), len(labels)))
        column = {label: c for c, label in enumerate(labels)}
        for row, ranked in enumerate(results):
            for item in ranked:
                scores[row, column[item["label"]]] = item["score"]
                self.anchored[item["label"]] = bool(item["anchor"])
        return scores

    def summary(self) -> dict:
        return {"anchored_labels": [label for label, anchored in self.anchored.items() if anchored]}


def build_scorer(config, train=None) -> Scorer:
    """The `config.method` scorer. `train` (an `EvalData` of the training split) is needed by the trained methods."""
    if config.method == "radz":
        return RadZScorer(config.model, config.multi_label, config.use_knowledge, config.batch_size, config.device)
    if config.method not in METHODS:
        raise EvaluationError(f"unknown method {config.method!r}; choose one of {METHODS}")
    checkpoint = load_checkpoint(config.model, config.device)
    # The question asked: the first template, else the dataset's default. sft trains on it once; further
    # --templates only vary the question at scoring time.
    question = (config.templates or [default_question(config.dataset)])[0]
    if config.method == "vqa":
        return VQAScorer(checkpoint, question=question, max_new_tokens=config.max_new_tokens)
    if train is None:
        raise EvaluationError(f"--method {config.method} trains on the training split, which was not loaded")
    if config.method == "vision_probe":
        return VisionProbeScorer(
            checkpoint,
            train.images,
            train.label_matrix,
            train.label_names,
            train.task,
            pooling=config.probe_pooling,
            shots=config.shots,
            balance_classes=config.balance_classes,
            seed=config.seed,
            C=config.probe_C,
            batch_size=config.batch_size,
            save_path=config.output_dir / "vision_probe.safetensors",
        )
    return SFTScorer(
        checkpoint,
        train.images,
        train.label_matrix,
        train.label_names,
        output_dir=config.output_dir / "sft_adapter",
        question=question,
        shots=config.shots,
        balance_classes=config.balance_classes,
        max_samples=config.sft_max_samples,
        seed=config.seed,
        steps=config.sft_steps,
        epochs=config.sft_epochs,
        batch_size=config.sft_batch_size,
        learning_rate=config.sft_learning_rate,
        lora_r=config.lora_r,
        lora_alpha=config.lora_alpha,
        max_new_tokens=config.max_new_tokens,
    )
