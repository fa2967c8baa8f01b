"""The generative VQA baseline: ask the LLaVA model "Does this chest X-ray show {label}? Answer yes or no."

Two readouts of one greedy generation per (image, label):
- score = sigmoid(logit(yes) − logit(no)) at the first answer token (so an AUC exists, and 0.5 means a tie);
- the generated answer, parsed as yes / no / unparsed, as the papers' VQA rows do (LLaVA-RadZ Table 1: F1/ACC from
  parsed answers; the knee-OA study: prompt-only answers collapse onto one grade).
"""

from __future__ import annotations

import re

import jinja2
import numpy as np
import torch

from radz.checkpoints import LoadedCheckpoint
from radz.evaluation.scorer import Scorer

from .base import pixel_values

DEFAULT_QUESTION = "Does this chest X-ray show {}? Answer yes or no."
KNEE_QUESTION = "Does this knee X-ray show {}? Answer yes or no."
# Surface forms whose first token counts as "yes" / "no"; their logits are pooled with logsumexp.
YES_FORMS = ("yes", "Yes", " yes", " Yes", "YES")
NO_FORMS = ("no", "No", " no", " No", "NO")
_ANSWER = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


def default_question(dataset: str) -> str:
    """The yes/no question for a dataset's radiographs (knee sets are not chest X-rays)."""
    return KNEE_QUESTION if dataset.startswith("knee") else DEFAULT_QUESTION


def _mean(values) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else np.nan


def parse_answer(text: str) -> float:
    """1.0 for an answer starting with yes, 0.0 for no, NaN for anything else."""
    match = _ANSWER.match(text)
    return np.nan if match is None else float(match.group(1).lower() == "yes")


class VQAPrompt:
    """Token ids of "[image tokens] + question" for a LLaVA model, in the model's chat format.

    The image token is expanded to `num_image_tokens` copies by id (not by text), so no tokenizer can merge it. The
    chat template comes from the processor (LLaVA-hf style, structured content), else the tokenizer, else LLaVA-1.5's
    plain "USER: <image>\\n... ASSISTANT:" format.
    """

    def __init__(self, checkpoint: LoadedCheckpoint):
        self.checkpoint = checkpoint
        tokenizer = checkpoint.tokenizer
        self.yes_ids, self.no_ids = self._answer_ids(tokenizer)

    @staticmethod
    def _answer_ids(tokenizer) -> tuple[list[int], list[int]]:
        def first_ids(forms):
            ids = {tokenizer.encode(form, add_special_tokens=False)[0] for form in forms}
            return ids - {tokenizer.unk_token_id}

        yes, no = first_ids(YES_FORMS), first_ids(NO_FORMS)
        shared = yes & no  # e.g. a bare space token: it says nothing about the answer
        yes, no = sorted(yes - shared), sorted(no - shared)
        if not yes or not no:
            raise ValueError("the tokenizer has no distinct first token for 'yes' and 'no'; the VQA score is undefined")
        return yes, no

    def text(self, question: str) -> tuple[str, bool]:
        """The prompt text with one image token, and whether the tokenizer should add its special tokens."""
        checkpoint = self.checkpoint
        image = checkpoint.image_token
        if checkpoint.chat_template:
            content = [{"type": "image"}, {"type": "text", "text": question}]
            try:
                rendered = checkpoint.processor.apply_chat_template(
                    [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
                )
            except (TypeError, jinja2.TemplateError):
                rendered = ""  # a text-only template (e.g. an LLM's ChatML) cannot render structured content
            if image in rendered:
                return rendered, True  # LlavaProcessor tokenizes its rendered template with special tokens
        if getattr(checkpoint.tokenizer, "chat_template", None):
            rendered = checkpoint.tokenizer.apply_chat_template(
                [{"role": "user", "content": f"{image}\n{question}"}], add_generation_prompt=True, tokenize=False
            )
            return rendered, False  # the template writes its own special tokens
        return f"USER: {image}\n{question}\nASSISTANT:", True

    def ids(self, question: str) -> list[int]:
        checkpoint = self.checkpoint
        text, special = self.text(question)
        before, image, after = text.partition(checkpoint.image_token)
        if not image:
            raise ValueError(f"the chat template dropped the image token {checkpoint.image_token!r}")
        tokenizer = checkpoint.tokenizer
        ids = tokenizer(before, add_special_tokens=special)["input_ids"]
        ids += [checkpoint.image_token_id] * checkpoint.num_image_tokens
        return ids + tokenizer(after, add_special_tokens=False)["input_ids"]


class VQAScorer(Scorer):
    """Prompt-only VQA with the LLaVA model of a checkpoint (`model.llava` of LLaVA-RadZ, or a plain LLaVA)."""

    name = "vqa"
    supports_templates = True

    def __init__(self, checkpoint: LoadedCheckpoint, question: str = DEFAULT_QUESTION, max_new_tokens: int = 4):
        self.checkpoint = checkpoint
        self.prompt = VQAPrompt(checkpoint)
        self.template = question
        self.max_new_tokens = max_new_tokens

    @property
    def model(self):
        return self.checkpoint.llava

    def settings(self) -> dict:
        return {**super().settings(), "max_new_tokens": self.max_new_tokens}

    def score(self, images, labels) -> np.ndarray:
        return self.outputs(images, labels)["score"]

    @torch.inference_mode()
    def outputs(self, images, labels) -> dict[str, np.ndarray]:
        """`score`: sigmoid(logit(yes) − logit(no)) at the first answer token, P(yes | yes or no), so the fixed 0.5
        threshold means "yes beats no"; `answer`: the parsed generated answers (1 / 0 / NaN)."""
        model, tokenizer = self.model, self.checkpoint.tokenizer
        pixels = pixel_values(self.checkpoint.image_processor, images, model.device, model.dtype)
        scores = np.zeros((len(images), len(labels)))
        answers = np.full((len(images), len(labels)), np.nan)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        for column, label in enumerate(labels):
            # One question per label, identical for every image of the batch: no padding needed.
            ids = torch.tensor(self.prompt.ids(self.template.format(label)), device=model.device)
            input_ids = ids.expand(len(images), -1)
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                pixel_values=pixels,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=pad_id,
            )
            first = generated.logits[0].float()
            yes = torch.logsumexp(first[:, self.prompt.yes_ids], dim=-1)
            no = torch.logsumexp(first[:, self.prompt.no_ids], dim=-1)
            scores[:, column] = torch.sigmoid(yes - no).cpu().numpy()
            texts = tokenizer.batch_decode(generated.sequences[:, input_ids.shape[1] :], skip_special_tokens=True)
            answers[:, column] = [parse_answer(text) for text in texts]
        return {"score": scores, "answer": answers}

    def output_metrics(self, outputs, label_matrix, label_names) -> dict:
        return {"generated_answers": answer_metrics(outputs["answer"], label_matrix, label_names)}


def answer_metrics(answers: np.ndarray, labels: np.ndarray, label_names: list[str]) -> dict:
    """How the parsed answers fare against 1/0/NaN labels, per label and macro.

    `parsed_rate`: fraction of answers that are yes or no. `accuracy`: over labelled pairs, an unparsed answer
    counts as wrong. `f1`: an unparsed answer counts as "no" (it names no finding).
    """
    per_label = {}
    for column, name in enumerate(label_names):
        known = ~np.isnan(labels[:, column])
        truth, answer = labels[known, column], answers[known, column]
        said_yes = answer == 1.0
        tp = float((said_yes & (truth == 1)).sum())
        predicted, positives = float(said_yes.sum()), float((truth == 1).sum())
        per_label[name] = {
            "parsed_rate": float((~np.isnan(answers[:, column])).mean()),
            "accuracy": float((answer == truth).mean()) if known.any() else np.nan,
            "f1": 2 * tp / (predicted + positives) if predicted + positives else np.nan,
            "yes_rate": float((answers[:, column] == 1.0).mean()),
        }
    macro = {key: _mean([m[key] for m in per_label.values()]) for key in ("parsed_rate", "accuracy", "f1", "yes_rate")}
    return {**{f"{key}_macro": value for key, value in macro.items()}, "per_label": per_label}
