"""The zero-shot classifier of LLaVA-RadZ: the label side of a label set, and the scores of images against it.

One builder, `build_zero_shot_classifier` (as open_clip's), serves the zero-shot pipeline and `RadZTrainer.evaluate`,
so that the validation AUC measures the classifier users get. Per label: its DKAM anchor when the processor's
knowledge base has the label, else the normalised mean over the prompt templates of its text embeddings; with
`multi_label`, also the embeddings of its negation ("no {label}", or "Finding" for "No Finding": `negation`).

This file is remote code: `LlavaRadZForZeroShotClassification.save_pretrained` copies it into every checkpoint,
beside the pipeline that imports it. It depends only on torch and transformers (docs/design.md, "Remote code").
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    from .modeling_llava_radz import alignment_logits
except ImportError:
    from modeling_llava_radz import alignment_logits


@dataclass
class ZeroShotClassifier:
    """The label side of K labels, for the features of `model.get_image_features`.

    Args:
        labels (`tuple[str]`): the K labels.
        anchored (`torch.BoolTensor` of shape `(K,)`): which labels are scored against their DKAM anchor.
        embeds (`torch.FloatTensor` of shape `(K, projection_dim)`): label k's anchor where `anchored[k]`, else the
            normalised mean over the templates of the global text embeddings of its prompts.
        local_embeds (`torch.FloatTensor` of shape `(K, projection_dim)`): likewise for the local embeddings; zero
            for anchored labels, which are compared with the image's global embedding alone.
        logit_scale (`torch.FloatTensor` of shape `()`): the model's `scale()`.
        alignment (`str`): the model's `config.alignment`: how prompts are compared with images (`alignment_logits`).
        negative_embeds / negative_local_embeds (`torch.FloatTensor` of shape `(K, projection_dim)`, multi-label
            only): the same for the negated prompts (`negation` of each label, inside every template).
    """

    labels: tuple
    anchored: torch.Tensor
    embeds: torch.Tensor
    local_embeds: torch.Tensor
    logit_scale: torch.Tensor
    alignment: str
    negative_embeds: torch.Tensor | None = None
    negative_local_embeds: torch.Tensor | None = None

    @property
    def multi_label(self) -> bool:
        return self.negative_embeds is not None

    def logits(self, image) -> torch.Tensor:
        """Scaled similarities of n images (`LlavaRadZFeatures`) with the labels: `(n, K)`, or `(n, K, 2)` (label,
        negation) for a multi-label classifier. Anchored labels compare the anchor with the image's global embedding."""
        positive = self._similarities(image, self.embeds, self.local_embeds)
        if self.anchored.any():
            positive = torch.where(self.anchored, self.logit_scale * image.embeds @ self.embeds.t(), positive)
        if not self.multi_label:
            return positive
        negative = self._similarities(image, self.negative_embeds, self.negative_local_embeds)
        return torch.stack([positive, negative], dim=-1)

    def probabilities(self, image) -> torch.Tensor:
        """`(n, K)` float32 scores of n images: the softmax over the labels, or per label
        `softmax([s(label), s(negation)])[0]` for a multi-label classifier."""
        probabilities = self.logits(image).float().softmax(dim=-1)
        return probabilities[..., 0] if self.multi_label else probabilities

    def _similarities(self, image, embeds, local_embeds) -> torch.Tensor:
        scale, alignment = self.logit_scale, self.alignment
        return alignment_logits(image.embeds, embeds, image.local_embeds, local_embeds, scale, alignment)


def negation(label: str, negative_template: str = "no {}") -> str:
    """The text a multi-label classifier scores `label` against: `negative_template` around the label (a template
    without `{}` is one text for every label, such as "No Finding"), except for a label that is itself a negation
    ("No Finding", "No acute disease"), whose negation is the label without its leading "no" ("Finding"). "no No
    Finding" reads as a normal study again: it inverted that label's scores (AUC 0.00 on the demo model without
    anchors, 1.00 with this rule; docs/learning.md)."""
    first, _, rest = label.strip().partition(" ")
    return rest.strip() if first.lower() == "no" and rest.strip() else negative_template.format(label)


def label_categories(processor, labels, use_knowledge: bool = True) -> list:
    """Per label, the knowledge category that anchors it (`processor.match_category`), or None; all None without
    `use_knowledge`."""
    return [processor.match_category(label) if use_knowledge else None for label in labels]


@torch.no_grad()
def build_zero_shot_classifier(
    model,
    processor,
    labels,
    templates=None,
    multi_label: bool = False,
    use_knowledge: bool = True,
    negative_template: str = "no {}",
    batch_size: int = 8,
) -> ZeroShotClassifier:
    """The `ZeroShotClassifier` of `labels` for `model` (a `LlavaRadZForZeroShotClassification`, in eval mode).

    Args:
        processor: the model's `LlavaRadZProcessor`; its knowledge base gives the anchors.
        labels: the label names, plain text.
        templates: prompt templates with `{}` for the label; a label's prompt embeddings are the normalised mean over
            them (the processor's text prompt wraps each). None: `model.config.label_template`.
        multi_label: also embed each label's `negation` (`negative_template` around it), inside every template.
        use_knowledge: anchor the labels that `processor.match_category` finds; otherwise every label is a prompt.
        batch_size: prompts per text pass.
    Raises a `ValueError` naming the label or template that holds one of the tokenizer's special tokens: user text
    never becomes `<TxtCls_*>`, `<image>`, `</s>`...
    """
    labels = tuple(labels)
    templates = (model.config.label_template,) if templates is None else tuple(templates)
    _check_plain_text(processor, labels, templates + ((negative_template,) if multi_label else ()))
    categories = label_categories(processor, labels, use_knowledge)
    device = model.device
    # The heads' dtype (float32 beside a 16-bit LLM), not the LLM's.
    embeds = torch.zeros(len(labels), model.config.projection_dim, device=device, dtype=model.logit_scale.dtype)
    local_embeds = torch.zeros_like(embeds)
    prompt_rows = [k for k, c in enumerate(categories) if c is None]
    if prompt_rows:
        texts = [labels[k] for k in prompt_rows]
        embeds[prompt_rows], local_embeds[prompt_rows] = _encode_prompts(model, processor, texts, templates, batch_size)
    anchor_rows = [k for k, c in enumerate(categories) if c is not None]
    if anchor_rows:
        encoded = processor.encode_anchors([labels[k] for k in anchor_rows]).to(device)
        embeds[anchor_rows] = model.get_anchor_features(**encoded, num_categories=len(anchor_rows))
    negatives = (None, None)
    if multi_label:
        texts = [negation(label, negative_template) for label in labels]
        negatives = _encode_prompts(model, processor, texts, templates, batch_size)
    anchored = torch.tensor([c is not None for c in categories], device=device)
    return ZeroShotClassifier(labels, anchored, embeds, local_embeds, model.scale(), model.config.alignment, *negatives)


def _encode_prompts(model, processor, texts, templates, batch_size) -> tuple[torch.Tensor, torch.Tensor]:
    """Per text, the normalised mean over `templates` of the global and of the local text embeddings."""
    prompts = [template.format(text) for text in texts for template in templates]
    embeds, local_embeds = [], []
    for start in range(0, len(prompts), batch_size):
        encoded = processor(text=prompts[start : start + batch_size]).to(model.device)
        features = model.get_text_features(encoded["input_ids"], encoded["attention_mask"])
        embeds.append(features.embeds)
        local_embeds.append(features.local_embeds)
    shape = (len(texts), len(templates), -1)
    mean_embeds = torch.cat(embeds).view(shape).mean(dim=1)
    mean_local = torch.cat(local_embeds).view(shape).mean(dim=1)
    return F.normalize(mean_embeds, dim=-1), F.normalize(mean_local, dim=-1)


def _check_plain_text(processor, labels, templates):
    """The `ValueError` of `build_zero_shot_classifier` for a label or template holding a special token."""
    tokenizer = processor.tokenizer
    special = {*tokenizer.all_special_tokens, *processor.cls_tokens("image"), *processor.cls_tokens("text")}
    special = sorted(token for token in {*special, processor.image_token} if token)
    for kind, texts in (("label", labels), ("template", templates)):
        for text in texts:
            found = [token for token in special if token in text]
            if found:
                raise ValueError(
                    f"{kind} {text!r} holds the special token {found[0]!r}; labels and templates are plain text "
                    "(the processor adds the special tokens itself)"
                )


__all__ = ["ZeroShotClassifier", "build_zero_shot_classifier", "label_categories"]
