"""The scoring methods of `evaluate_radz.py --method`: a registry of builders, each making a `Scorer` from one
evaluation config.

`radz` is LLaVA-RadZ through its zero-shot pipeline, registered here. The baselines (`vqa`, `vision_probe`, `sft`)
live in `radz.baselines`, which imports this module and registers them when it is imported: evaluation owns the
protocol and never imports a baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from transformers import AutoConfig, pipeline

from .scorer import Scorer

TASK = "zero-shot-image-classification"


@dataclass(frozen=True)
class Method:
    """How to build a method's scorer: `build(config, train)`; `trained` methods get the training split."""

    build: Callable
    trained: bool = False


METHODS: dict[str, Method] = {}


def register_method(name: str, build: Callable, trained: bool = False) -> None:
    """Make `evaluate_radz.py --method name` build its scorer with `build(config, train)`."""
    METHODS[name] = Method(build, trained)


class EvaluationError(ValueError):
    """A run that cannot go ahead as asked (no validation split, a checkpoint the method cannot use...); the message
    says why and what to pass instead. The CLI reports it as a usage error."""


class RadZScorer(Scorer):
    """LLaVA-RadZ zero-shot scores through `pipeline("zero-shot-image-classification", model=dir, ...)`.

    `multi_label`: each label against its negation, `negative_template` ("no {label}"), a probability per label;
    otherwise a softmax over the labels. `template` is the pipeline's `hypothesis_template` (None: the model's
    `config.label_template`).
    """

    name = "radz"
    supports_templates = True

    def __init__(self, model_dir: str, multi_label: bool, use_knowledge: bool, batch_size: int, device: str,
                 negative_template: str = "no {}"):
        model_type = AutoConfig.from_pretrained(model_dir, trust_remote_code=True).model_type
        if model_type != "llava_radz":
            raise EvaluationError(
                f"--method radz needs a LLaVA-RadZ checkpoint; {model_dir} holds model_type {model_type!r} "
                "(use --method vqa / vision_probe / sft for a plain LLaVA model)"
            )
        self.pipe = pipeline(TASK, model=model_dir, trust_remote_code=True, device=device)
        self.multi_label, self.use_knowledge, self.batch_size = multi_label, use_knowledge, batch_size
        self.negative_template = negative_template
        self.anchored: dict[str, bool] = {}

    def settings(self) -> dict:
        settings = {**super().settings(), "multi_label": self.multi_label, "use_knowledge": self.use_knowledge}
        return settings | ({"negative_template": self.negative_template} if self.multi_label else {})

    def score(self, images, labels) -> np.ndarray:
        results = self.pipe(
            list(images),
            candidate_labels=list(labels),
            multi_label=self.multi_label,
            use_knowledge=self.use_knowledge,
            negative_template=self.negative_template,
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
    if config.method not in METHODS:
        raise EvaluationError(
            f"unknown method {config.method!r}; registered: {list(METHODS)} (importing radz.baselines registers "
            "vqa, vision_probe and sft)"
        )
    return METHODS[config.method].build(config, train)


def build_radz(config, train=None) -> RadZScorer:
    return RadZScorer(config.model, config.multi_label, config.use_knowledge, config.batch_size, config.device,
                      config.negative_template)


register_method("radz", build_radz)
