"""LLaVA-RadZ configuration.

This file is remote code: `save_pretrained` copies it into every checkpoint. It imports only
transformers and the tower it registers (vision_llava_radz.py).
"""

from transformers import LlavaConfig

try:  # registers the convolutional tower with AutoConfig, so that a vision_config naming it loads
    from .vision_llava_radz import LlavaRadZConvVisionConfig  # noqa: F401
except ImportError:
    from vision_llava_radz import LlavaRadZConvVisionConfig  # noqa: F401


ALIGNMENT_MODES = ("global", "cross")
POOLING_MODES = ("mean", "last", "concat")
CATEGORY_LOSSES = ("softmax", "sigmoid")
ANCHOR_HEADS = ("separate", "shared")


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

    num_cls_tokens: int = 8
    feature_layer: int = -2
    pooling: str = "mean"
    projection_dim: int = 512
    head_hidden_dim: int | None = None
    contrastive_temperature: float = 0.07
    learnable_temperature: bool = True
    alignment: str = "global"
    dkam_lambda: float = 0.5
    anchor_head: str = "shared"
    category_loss: str = "softmax"
    image_prompt_template: str = "{image}\nDescribe the findings of this chest radiograph."
    text_prompt_template: str = "Radiology report: {text}"
    label_template: str = "IMPRESSION: {}."
    image_cls_token_format: str = "<ImgCls_{}>"
    text_cls_token_format: str = "<TxtCls_{}>"
    image_cls_token_ids: list[int] | None = None
    text_cls_token_ids: list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_radz()

    def validate_radz(self):
        """Raise a `ValueError` naming the field for any inconsistent LLaVA-RadZ setting."""
        choices = {
            "alignment": ALIGNMENT_MODES,
            "pooling": POOLING_MODES,
            "category_loss": CATEGORY_LOSSES,
            "anchor_head": ANCHOR_HEADS,
        }
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"LlavaRadZConfig.{field}={getattr(self, field)!r}; expected one of {allowed}")
        if self.num_cls_tokens < 1:
            raise ValueError(f"LlavaRadZConfig.num_cls_tokens must be >= 1, got {self.num_cls_tokens}")
        if not 0.0 <= self.dkam_lambda <= 1.0:
            raise ValueError(f"LlavaRadZConfig.dkam_lambda must lie in [0, 1], got {self.dkam_lambda}")
        if self.contrastive_temperature <= 0:
            raise ValueError(f"LlavaRadZConfig.contrastive_temperature must be > 0, got {self.contrastive_temperature}")
        num_states = self.text_config.num_hidden_layers + 1
        if not -num_states <= self.feature_layer < num_states:
            raise ValueError(
                f"LlavaRadZConfig.feature_layer={self.feature_layer} is outside the LLM's {num_states} hidden states"
            )
        for field, placeholder in (("image_prompt_template", "{image}"), ("text_prompt_template", "{text}")):
            if getattr(self, field).count(placeholder) != 1:
                raise ValueError(f"LlavaRadZConfig.{field} must contain {placeholder} exactly once")
        if self.label_template.count("{}") != 1:
            raise ValueError(f"LlavaRadZConfig.label_template={self.label_template!r} must contain '{{}}' exactly once")
        for field in ("image_cls_token_ids", "text_cls_token_ids"):
            ids = getattr(self, field)
            if ids is not None and len(ids) != self.num_cls_tokens:
                raise ValueError(
                    f"LlavaRadZConfig.{field} has {len(ids)} ids but num_cls_tokens={self.num_cls_tokens}"
                )

    def cls_tokens(self, modality: str) -> list[str]:
        """The special-token strings of one modality (`"image"` or `"text"`)."""
        fmt = self.image_cls_token_format if modality == "image" else self.text_cls_token_format
        return [fmt.format(i) for i in range(self.num_cls_tokens)]


__all__ = ["LlavaRadZConfig"]
