"""LLaVA-RadZ configuration: the single source of every LLaVA-RadZ default (the processor and the presets read theirs
from here).

A strict dataclass config in the transformers v5 style: the choices are `Literal` fields and the ranges field
validators, checked at init and on every assignment; the `validate_*` methods check fields against each other, at
init and again in `save_pretrained`, so an inconsistent config is never written.

This file is remote code: `save_pretrained` copies it into every checkpoint. It imports only transformers (and
huggingface_hub, which transformers requires) and the tower it registers (vision_llava_radz.py).
"""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import LlavaConfig
from transformers.utils.type_validators import interval, probability

try:  # registers the convolutional tower with AutoConfig, so that a vision_config naming it loads
    from .vision_llava_radz import LlavaRadZConvVisionConfig  # noqa: F401
except ImportError:
    from vision_llava_radz import LlavaRadZConvVisionConfig  # noqa: F401


def format_cls_tokens(token_format: str, num_cls_tokens: int) -> list[str]:
    """`"<ImgCls_{}>"`, 3 → `["<ImgCls_0>", "<ImgCls_1>", "<ImgCls_2>"]`."""
    return [token_format.format(i) for i in range(num_cls_tokens)]


@strict
class LlavaRadZConfig(LlavaConfig):
    r"""
    Configuration of [`LlavaRadZForZeroShotClassification`]: a LLaVA model (vision tower, projector, LLM) read
    as a CLIP-style dual encoder through special tokens. All fields of [`LlavaConfig`] apply; the additions are:

    Args:
        num_cls_tokens (`int`, defaults to 8):
            Special tokens per modality: `<ImgCls_0>`…`<ImgCls_{n-1}>` end the image pass, `<TxtCls_*>` the text
            pass. The paper's ablation shows both too few and too many hurt.
        feature_layer (`int`, defaults to -2):
            Index into the LLM's `hidden_states` tuple (length `num_layers + 1`) whose states are read.
            -2 is the output of the penultimate decoder layer; -1 is the last layer after the final norm.
        pooling (`str`, defaults to `"mean"`):
            How the `num_cls_tokens` states become one vector: `"mean"`, `"last"` or `"concat"`.
        projection_dim (`int`, defaults to 512):
            Size of the global/local/anchor embeddings produced by the MLP heads.
        head_hidden_dim (`int`, *optional*):
            Hidden width of the MLP heads; defaults to the LLM's hidden size.
        contrastive_temperature (`float`, defaults to 0.07):
            Initial InfoNCE temperature τ; the model keeps `logit_scale = log(1/τ)`.
        learnable_temperature (`bool`, defaults to `True`):
            Train `logit_scale` (clamped at 100, as CLIP) or keep it fixed.
        alignment (`str`, defaults to `"global"`):
            `"global"`: image-global ↔ text-global InfoNCE. `"cross"`: the paper's cross-level alignment,
            the mean of image-global ↔ text-local and image-local ↔ text-global. Global is the default because
            anchors and label prompts are scored in the global space that it trains (docs/learning.md).
        dkam_lambda (`float`, defaults to 0.5):
            λ in `λ·L_CA + (1−λ)·L_CG` (alignment loss vs DKAM category loss).
        anchor_head (`str`, defaults to `"shared"`):
            What maps a category's pooled description states to its anchor: `"separate"`, an MLP of its own (the
            paper's); `"shared"`, the text-global head that reports go through, so that the anchor of a category no
            training label names still lies where reports describing it lie (docs/learning.md).
        category_loss (`str`, defaults to `"softmax"`):
            Form of L_CG: `"softmax"` over categories with the sample's positives as soft targets, or
            `"sigmoid"`, an independent binary loss per category (see `category_loss` in the modeling file).
        image_prompt_template (`str`):
            Prompt of the image pass; `{image}` marks where the image tokens go. The `<ImgCls_*>` tokens follow it.
        text_prompt_template (`str`):
            Prompt of the text pass; `{text}` marks the report or label text. The `<TxtCls_*>` tokens follow it.
        label_template (`str`, defaults to `"IMPRESSION: {}."`):
            How the zero-shot classifier writes a label without an anchor (`{}` is the label), unless the caller
            gives templates. In the reports' own style: a bare name such as "Pleural Effusion" is closest to the
            reports that say "no pleural effusion", and scores inverted (docs/learning.md).
        image_cls_token_format / text_cls_token_format (`str`):
            Token strings, formatted with the token's index.
        image_cls_token_ids / text_cls_token_ids (`list[int]`):
            Vocabulary ids of those tokens; set by `from_llava` or the processor.
    """

    model_type = "llava_radz"

    num_cls_tokens: int = interval(min=1)(default=8)
    feature_layer: int = -2
    pooling: Literal["mean", "last", "concat"] = "mean"
    projection_dim: int = interval(min=1)(default=512)
    head_hidden_dim: int | None = None
    contrastive_temperature: float | int = interval(min=0, exclude_min=True)(default=0.07)
    learnable_temperature: bool = True
    alignment: Literal["global", "cross"] = "global"
    dkam_lambda: float | int = probability(default=0.5)
    anchor_head: Literal["separate", "shared"] = "shared"
    category_loss: Literal["softmax", "sigmoid"] = "softmax"
    image_prompt_template: str = "{image}\nDescribe the findings of this chest radiograph."
    text_prompt_template: str = "Radiology report: {text}"
    label_template: str = "IMPRESSION: {}."
    image_cls_token_format: str = "<ImgCls_{}>"
    text_cls_token_format: str = "<TxtCls_{}>"
    image_cls_token_ids: list[int] | None = None
    text_cls_token_ids: list[int] | None = None

    def validate_feature_layer(self):
        """`feature_layer` indexes the LLM's `num_hidden_layers + 1` hidden states."""
        num_states = self.text_config.num_hidden_layers + 1
        if not -num_states <= self.feature_layer < num_states:
            raise ValueError(
                f"LlavaRadZConfig.feature_layer={self.feature_layer} is outside the LLM's {num_states} hidden states"
            )

    def validate_templates(self):
        """Each prompt template holds its placeholder exactly once."""
        for field, placeholder in (("image_prompt_template", "{image}"), ("text_prompt_template", "{text}")):
            if getattr(self, field).count(placeholder) != 1:
                raise ValueError(f"LlavaRadZConfig.{field} must contain {placeholder} exactly once")
        if self.label_template.count("{}") != 1:
            raise ValueError(f"LlavaRadZConfig.label_template={self.label_template!r} must contain '{{}}' exactly once")

    def validate_cls_tokens(self):
        """The special-token ids, when set, are one per token."""
        for field in ("image_cls_token_ids", "text_cls_token_ids"):
            ids = getattr(self, field)
            if ids is not None and len(ids) != self.num_cls_tokens:
                raise ValueError(
                    f"LlavaRadZConfig.{field} has {len(ids)} ids but num_cls_tokens={self.num_cls_tokens}"
                )

    def cls_tokens(self, modality: str) -> list[str]:
        """The special-token strings of one modality (`"image"` or `"text"`)."""
        fmt = self.image_cls_token_format if modality == "image" else self.text_cls_token_format
        return format_cls_tokens(fmt, self.num_cls_tokens)


__all__ = ["LlavaRadZConfig"]
