"""LLaVA-RadZ: a LLaVA model read as a CLIP-style zero-shot classifier (arXiv 2503.07487).

DFAT: the image pass (`<image>` tokens + prompt + `<ImgCls_*>`) and the text pass (prompt + report + `<TxtCls_*>`)
run through the same LLM; the states of the special tokens at `config.feature_layer` are pooled and mapped by MLP
heads to global embeddings, the content-token states to local embeddings, and InfoNCE aligns them.
DKAM: category descriptions run through the text pass, are pooled per category and mapped by the anchor head to
category anchors; `category_loss` (L_CG) pulls each sample's global embeddings towards its categories' anchors.

This file is remote code: `save_pretrained` copies it into every checkpoint (docs/design.md, "Remote code").
"""

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, LlavaForConditionalGeneration, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.utils import ModelOutput

try:
    from .configuration_llava_radz import LlavaRadZConfig
    from .convert_llava_radz import add_token_rows, convert_original_llava, read_original_config
    from .loss_llava_radz import LlavaRadZLoss, alignment_logits, alignment_loss, category_loss, clip_loss
except ImportError:
    from configuration_llava_radz import LlavaRadZConfig
    from convert_llava_radz import add_token_rows, convert_original_llava, read_original_config
    from loss_llava_radz import LlavaRadZLoss, alignment_logits, alignment_loss, category_loss, clip_loss

# `save_pretrained` copies the pipeline file (and the modules it imports) into the checkpoint and
# declares it in `config.custom_pipelines`.
PIPELINE_FILES = (
    "pipeline_llava_radz.py", "zero_shot_llava_radz.py", "knowledge_llava_radz.py", "explain_llava_radz.py",
    "calibration_llava_radz.py",
)
# The MLP heads of LlavaRadZForZeroShotClassification (everything trainable outside the LLaVA model but the
# temperature and the sigmoid bias).
HEAD_MODULES = ("image_global_head", "text_global_head", "image_local_head", "text_local_head", "anchor_head")
PIPELINE_INFO = {"impl": "pipeline_llava_radz.LlavaRadZZeroShotImageClassificationPipeline", "pt": ["AutoModel"]}

# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LlavaRadZFeatures(ModelOutput):
    """
    Features of one pass (image or text).

    Args:
        embeds (`torch.FloatTensor` of shape `(batch, projection_dim)`): L2-normalised global embeddings
            (special-token states → pooling → global MLP head).
        local_embeds (`torch.FloatTensor` of shape `(batch, projection_dim)`): L2-normalised local embeddings
            (mean of the content-token states → local MLP head).
        pooled_cls_states (`torch.FloatTensor` of shape `(batch, hidden)` or `(batch, num_cls_tokens*hidden)`):
            the pooled special-token states before the head (the input of the anchor head for descriptions).
    """

    embeds: torch.FloatTensor | None = None
    local_embeds: torch.FloatTensor | None = None
    pooled_cls_states: torch.FloatTensor | None = None


@dataclass
class LlavaRadZOutput(ModelOutput):
    """
    Output of [`LlavaRadZForZeroShotClassification.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, with `return_loss=True`): `λ·loss_alignment + (1−λ)·loss_category`,
            or `loss_alignment` alone when no labels are given.
        loss_alignment (`torch.FloatTensor` of shape `()`): L_CA, the DFAT InfoNCE.
        loss_category (`torch.FloatTensor` of shape `()`): L_CG, the DKAM category loss (with labels): the mean of
            `loss_category_image` and `loss_category_text`, its image-side and text-side terms.
        logits_per_image (`torch.FloatTensor` of shape `(n_images, n_texts)`): scaled image-text similarities.
        logits_per_text (`torch.FloatTensor` of shape `(n_texts, n_images)`): the transpose.
        image_embeds / text_embeds (`torch.FloatTensor` of shape `(n, projection_dim)`): L2-normalised global
            embeddings.
        image_local_embeds / text_local_embeds (`torch.FloatTensor` of shape `(n, projection_dim)`): L2-normalised
            local embeddings.
        anchor_embeds (`torch.FloatTensor` of shape `(num_categories, projection_dim)`): the category anchors used.
        logit_scale (`torch.FloatTensor` of shape `()`): the clamped `exp(logit_scale)` applied to the similarities.
    """

    loss: torch.FloatTensor | None = None
    loss_alignment: torch.FloatTensor | None = None
    loss_category: torch.FloatTensor | None = None
    loss_category_image: torch.FloatTensor | None = None
    loss_category_text: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_local_embeds: torch.FloatTensor | None = None
    text_local_embeds: torch.FloatTensor | None = None
    anchor_embeds: torch.FloatTensor | None = None
    logit_scale: torch.FloatTensor | None = None


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


class LlavaRadZHead(nn.Module):
    """MLP head: standardise → LayerNorm → Linear → activation → Linear.

    Decoder states share a large per-dimension offset across all inputs (the "massive activations" of LLMs), so raw
    states of different inputs are nearly parallel (cosine ≈ 0.998 for SmolLM2) and a contrastive loss starts
    collapsed. `input_mean` / `input_std`, set by `LlavaRadZForZeroShotClassification.calibrate_heads` from a
    calibration batch, remove that offset per dimension (diagonal BERT-whitening); they are fixed buffers, so
    training and inference, and every data-parallel rank, see the same transform.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, activation: str = "gelu"):
        super().__init__()
        self.register_buffer("input_mean", torch.zeros(in_dim))
        self.register_buffer("input_std", torch.ones(in_dim))
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = ACT2FN[activation]
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    @torch.no_grad()
    def set_input_statistics(self, states: torch.Tensor):
        """Standardise with the mean and std of `states` `[n, in_dim]`; stds below 1% of the median are raised
        to it, so that near-constant dimensions are not blown up."""
        std = states.float().std(dim=0)
        self.input_mean.copy_(states.float().mean(dim=0))
        self.input_std.copy_(std.clamp(min=0.01 * float(std.median()) + 1e-8))

    def forward(self, hidden_states):
        # The head computes in float32 under a 16-bit or 4-bit LLM and under the Trainer's autocast: its weights
        # are kept float32 (`_keep_in_fp32_modules_strict`), and so are the embeddings it gives the InfoNCE.
        with torch.autocast(hidden_states.device.type, enabled=False):
            hidden_states = (hidden_states.to(self.input_mean.dtype) - self.input_mean) / self.input_std
            return self.fc2(self.act(self.fc1(self.norm(hidden_states))))


class LlavaRadZPreTrainedModel(PreTrainedModel):
    config_class = LlavaRadZConfig
    config: LlavaRadZConfig
    base_model_prefix = "llava"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    # The heads and the temperature stay in float32 when the LLM loads in bf16/fp16: the InfoNCE logits are
    # `exp(logit_scale)·cos` with scales up to 100, where bf16 keeps 2-3 significant digits.
    _keep_in_fp32_modules_strict = [*HEAD_MODULES, "logit_scale", "category_bias"]
    # No `_no_split_modules` here: `post_init` collects those of the wrapped LLaVA (its LLM's decoder layer, its
    # tower's encoder layer), so device maps and FSDP wrap Mistral, Llama or any other backbone right.

    def _init_weights(self, module):
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, LlavaRadZForZeroShotClassification):
            init.constant_(module.logit_scale, math.log(1.0 / self.config.contrastive_temperature))
            if module.category_bias is not None:
                init.zeros_(module.category_bias)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, LlavaRadZHead):
            init.zeros_(module.input_mean)
            init.ones_(module.input_std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class LlavaRadZForZeroShotClassification(LlavaRadZPreTrainedModel):
    """A LLaVA model with DFAT special-token readout, MLP heads and DKAM anchors.

    `self.llava` is a plain transformers `LlavaForConditionalGeneration`, so `generate` keeps working (DKAM's
    knowledge writing and the VQA baseline use it).
    """

    def __init__(self, config: LlavaRadZConfig, llava: LlavaForConditionalGeneration | None = None):
        super().__init__(config)
        self.llava = llava if llava is not None else LlavaForConditionalGeneration(config)
        hidden = config.text_config.hidden_size
        head_hidden = config.head_hidden_dim or hidden
        pooled = hidden * config.num_cls_tokens if config.pooling == "concat" else hidden
        self.image_global_head = LlavaRadZHead(pooled, head_hidden, config.projection_dim)
        self.text_global_head = LlavaRadZHead(pooled, head_hidden, config.projection_dim)
        self.image_local_head = LlavaRadZHead(hidden, head_hidden, config.projection_dim)
        self.text_local_head = LlavaRadZHead(hidden, head_hidden, config.projection_dim)
        self.anchor_head = (
            LlavaRadZHead(pooled, head_hidden, config.projection_dim) if config.anchor_head == "separate" else None
        )
        # One-element parameters, not 0-d ones: FSDP (both versions) refuses scalar parameters.
        self.logit_scale = nn.Parameter(
            torch.full((1,), math.log(1.0 / config.contrastive_temperature)), requires_grad=config.learnable_temperature
        )
        self.category_bias = nn.Parameter(torch.zeros(1)) if config.category_loss == "sigmoid" else None
        # The loss of the batch; RadZTrainer swaps in one that gathers across ranks under data parallel.
        self.loss_fn = LlavaRadZLoss()
        self.post_init()

    @property
    def dtype(self) -> torch.dtype:
        """The LLaVA model's dtype (what inputs are cast to and `save_pretrained` records), not the float32 heads'."""
        return self.llava.dtype

    # -- embeddings, generation ------------------------------------------------------------------------------
    def get_input_embeddings(self):
        return self.llava.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.llava.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.llava.get_output_embeddings()

    def generate(self, *args, **kwargs):
        """`LlavaForConditionalGeneration.generate` of the underlying LLaVA model."""
        return self.llava.generate(*args, **kwargs)

    # -- feature extraction ----------------------------------------------------------------------------------
    def _cls_ids(self, modality: str) -> torch.Tensor:
        ids = self.config.image_cls_token_ids if modality == "image" else self.config.text_cls_token_ids
        if ids is None:
            raise ValueError(
                f"config.{modality}_cls_token_ids is not set; build the model with "
                "LlavaRadZForZeroShotClassification.from_llava(...) or set the ids from the processor"
            )
        return torch.tensor(ids, device=self.llava.device)

    def _read_states(self, modality, input_ids, attention_mask, pixel_values=None, return_states=False):
        """One LLM pass up to `feature_layer`; the pooled special-token states and the mean content-token state
        (and, with `return_states`, the input embeddings and the `feature_layer` states, `[batch, sequence, hidden]`)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        cls_mask = torch.isin(input_ids, self._cls_ids(modality)) & attention_mask.bool()
        counts = cls_mask.sum(dim=1)
        n = self.config.num_cls_tokens
        if not bool((counts == n).all()):
            row = int((counts != n).nonzero()[0])
            raise ValueError(
                f"{modality} pass: row {row} holds {int(counts[row])} special tokens, expected {n}; "
                "build the inputs with LlavaRadZProcessor"
            )
        if return_states:
            input_states = self._input_embeds(input_ids, pixel_values)
            states = self._llm_states(input_ids, attention_mask, inputs_embeds=input_states)
        else:
            states = self._llm_states(input_ids, attention_mask, pixel_values)
        cls_states = states[cls_mask].view(len(states), n, -1)
        if self.config.pooling == "mean":
            pooled = cls_states.mean(dim=1)
        elif self.config.pooling == "last":
            pooled = cls_states[:, -1]
        else:
            pooled = cls_states.flatten(1)

        if modality == "image":
            content = input_ids == self.config.image_token_id
        else:
            content = attention_mask.bool() & ~cls_mask
        weights = content.unsqueeze(-1).to(states.dtype)
        local = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return (pooled, local, input_states, states) if return_states else (pooled, local)

    def feature_layer_count(self) -> int:
        """How many decoder layers the image and text passes run: `hidden_states[i]` is the output of layer i."""
        return self.config.feature_layer % (self.config.text_config.num_hidden_layers + 1)

    def _input_embeds(self, input_ids, pixel_values=None):
        """The LLM's input embeddings, the projected image features in place of the `<image>` tokens."""
        inner = self.llava.model
        inputs_embeds = inner.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            features = inner.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
            features = torch.cat(features, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
            image_mask = inner.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=features)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask, features)
        return inputs_embeds

    def _llm_states(self, input_ids, attention_mask, pixel_values=None, inputs_embeds=None):
        """`hidden_states[feature_layer]` of the LLM, running only the decoder layers it needs (from `inputs_embeds`
        when given, else from `_input_embeds`).

        The steps of `LlavaModel.forward` (image features in place of the `<image>` tokens) and of
        `LlamaModel.forward` / `MistralModel.forward` (mask, rotary embeddings, layers), stopped at `feature_layer`:
        with the default -2 the last layer and the LM head are never computed, and no other layer's states are
        kept. Index `num_layers` (-1) is the last layer's output after the final norm.
        """
        if inputs_embeds is None:
            inputs_embeds = self._input_embeds(input_ids, pixel_values)
        language_model = self.llava.model.language_model
        num_layers, stop = language_model.config.num_hidden_layers, self.feature_layer_count()
        position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0)
        sliding = getattr(language_model.config, "sliding_window", None) is not None
        mask_function = create_sliding_window_causal_mask if sliding else create_causal_mask
        mask = mask_function(
            config=language_model.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=None,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = language_model.rotary_emb(hidden_states, position_ids=position_ids)
        for decoder_layer in language_model.layers[:stop]:
            hidden_states = decoder_layer(
                hidden_states,  # positional: gradient checkpointing replays the layer from its positional inputs
                attention_mask=mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=None,
                use_cache=False,
            )
        return language_model.norm(hidden_states) if stop == num_layers else hidden_states

    def _encode(self, modality, input_ids, attention_mask, pixel_values=None) -> LlavaRadZFeatures:
        pooled, local = self._read_states(modality, input_ids, attention_mask, pixel_values)
        global_head = self.image_global_head if modality == "image" else self.text_global_head
        local_head = self.image_local_head if modality == "image" else self.text_local_head
        return LlavaRadZFeatures(
            embeds=F.normalize(global_head(pooled), dim=-1),
            local_embeds=F.normalize(local_head(local), dim=-1),
            pooled_cls_states=pooled,
        )

    @torch.no_grad()
    def calibrate_heads(self, image_inputs=None, text_inputs=None):
        """Set the heads' input standardisation from a calibration batch (at least 2 samples per pass).

        `image_inputs` / `text_inputs` are `processor(images=...)` / `processor(text=...)` outputs: a sample of
        the training images and reports is best; `processor.calibration_inputs()` gives a generic one.
        The anchor head shares the text-global statistics, as descriptions run through the text pass.
        """
        if image_inputs is not None:
            pixel_values = image_inputs["pixel_values"].to(self.llava.device, self.llava.dtype)
            pooled, local = self._read_states(
                "image", image_inputs["image_input_ids"], image_inputs.get("image_attention_mask"), pixel_values
            )
            self.image_global_head.set_input_statistics(pooled)
            self.image_local_head.set_input_statistics(local)
        if text_inputs is not None:
            pooled, local = self._read_states("text", text_inputs["input_ids"], text_inputs.get("attention_mask"))
            self.text_global_head.set_input_statistics(pooled)
            if self.anchor_head is not None:
                self.anchor_head.set_input_statistics(pooled)
            self.text_local_head.set_input_statistics(local)

    def get_image_features(self, pixel_values, image_input_ids, image_attention_mask=None, **unused):
        """Image pass: `[image tokens] + image prompt + <ImgCls_*>` → `LlavaRadZFeatures`.

        Takes the image keys of `processor(images=...)`; `embeds` are the global image embeddings.
        """
        if pixel_values is None or image_input_ids is None:
            raise ValueError("get_image_features needs pixel_values and image_input_ids (from processor(images=...))")
        pixel_values = pixel_values.to(self.llava.device, self.llava.dtype)
        return self._encode("image", image_input_ids, image_attention_mask, pixel_values)

    def get_image_hidden_states(self, pixel_values, image_input_ids, image_attention_mask=None, **unused):
        """The image pass of `get_image_features`, for explanations: `(features, input_states, feature_states)`,
        the LLM's input embeddings (image tokens from the projector) and its `feature_layer` states, each
        `[batch, sequence, hidden]`."""
        pixel_values = pixel_values.to(self.llava.device, self.llava.dtype)
        pooled, local, input_states, feature_states = self._read_states(
            "image", image_input_ids, image_attention_mask, pixel_values, return_states=True
        )
        features = LlavaRadZFeatures(
            embeds=F.normalize(self.image_global_head(pooled), dim=-1),
            local_embeds=F.normalize(self.image_local_head(local), dim=-1),
            pooled_cls_states=pooled,
        )
        return features, input_states, feature_states

    def get_text_features(self, input_ids, attention_mask=None, **unused):
        """Text pass: `text prompt + text + <TxtCls_*>`, without an image → `LlavaRadZFeatures`."""
        if input_ids is None:
            raise ValueError("get_text_features needs input_ids (from processor(text=...))")
        return self._encode("text", input_ids, attention_mask)

    def get_anchor_features(
        self, anchor_input_ids, anchor_attention_mask, anchor_category_ids, num_categories: int | None = None
    ) -> torch.Tensor:
        """DKAM anchors `[num_categories, projection_dim]` (L2-normalised).

        Each description runs through the text pass; its pooled special-token states are averaged per category
        (`anchor_category_ids` says which category each description belongs to) and the anchor head maps the mean
        to the anchor: the text-global head with `anchor_head="shared"`, an MLP of its own with `"separate"`. Call it
        inside the training step to re-encode anchors as the LoRA weights change, or once under `torch.no_grad()` and
        pass the result as `anchor_embeds` for inference.
        """
        pooled = self.get_text_features(anchor_input_ids, anchor_attention_mask).pooled_cls_states
        num_categories = num_categories or int(anchor_category_ids.max()) + 1
        category_ids = anchor_category_ids.to(pooled.device)
        sums = pooled.new_zeros(num_categories, pooled.shape[-1]).index_add(0, category_ids, pooled)
        counts = torch.bincount(category_ids, minlength=num_categories).to(pooled.dtype)
        if bool((counts == 0).any()):
            missing = (counts == 0).nonzero().flatten().tolist()
            raise ValueError(f"get_anchor_features: categories {missing} have no descriptions")
        head = self.text_global_head if self.anchor_head is None else self.anchor_head
        return F.normalize(head(sums / counts.unsqueeze(1)), dim=-1)

    def scale(self) -> torch.Tensor:
        """`exp(logit_scale)`, clamped at 100 as in CLIP (shape `()`)."""
        return self.logit_scale.exp().clamp(max=100.0).squeeze(0)

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        image_input_ids: torch.LongTensor | None = None,
        image_attention_mask: torch.LongTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        labels: torch.FloatTensor | None = None,
        anchor_input_ids: torch.LongTensor | None = None,
        anchor_attention_mask: torch.LongTensor | None = None,
        anchor_category_ids: torch.LongTensor | None = None,
        anchor_embeds: torch.FloatTensor | None = None,
        return_loss: bool | None = None,
    ) -> LlavaRadZOutput:
        r"""
        Args:
            pixel_values, image_input_ids, image_attention_mask: the image pass, from `processor(images=...)`.
            input_ids, attention_mask: the text pass (reports or label prompts), from `processor(text=...)`.
            labels (`(batch, num_categories)`, 1/0/NaN): category labels of the pairs, for L_CG.
            anchor_input_ids, anchor_attention_mask, anchor_category_ids: category descriptions, from
                `processor.encode_anchors(categories)`; encoded with gradients.
            anchor_embeds (`(num_categories, projection_dim)`): precomputed anchors, instead of the above.
            return_loss: compute `λ·L_CA + (1−λ)·L_CG` (L_CA alone without labels). Row i of the images is
                paired with row i of the texts.
        """
        image = text = None
        if pixel_values is not None:
            image = self.get_image_features(pixel_values, image_input_ids, image_attention_mask)
        if input_ids is not None:
            text = self.get_text_features(input_ids, attention_mask)
        if anchor_embeds is None and anchor_input_ids is not None:
            anchor_embeds = self.get_anchor_features(anchor_input_ids, anchor_attention_mask, anchor_category_ids)
        scale = self.scale()

        logits_per_image = None
        if image is not None and text is not None:
            logits_per_image = alignment_logits(
                image.embeds, text.embeds, image.local_embeds, text.local_embeds, scale, self.config.alignment
            )

        terms = None
        if return_loss:
            if image is None or text is None:
                raise ValueError("return_loss=True needs both images and texts")
            if len(image.embeds) != len(text.embeds):
                raise ValueError(
                    f"return_loss=True pairs image i with text i, but got {len(image.embeds)} images "
                    f"and {len(text.embeds)} texts"
                )
            if labels is not None:
                if anchor_embeds is None:
                    raise ValueError("labels need anchors: pass anchor_input_ids/... or anchor_embeds")
                if labels.shape != (len(image.embeds), len(anchor_embeds)):
                    raise ValueError(
                        f"labels have shape {tuple(labels.shape)}, expected (batch={len(image.embeds)}, "
                        f"num_categories={len(anchor_embeds)})"
                    )
            # Inside the forward, so that DDP, FSDP and ZeRO-3 see every parameter the loss uses.
            terms = self.loss_fn(
                image.embeds, text.embeds, image.local_embeds, text.local_embeds, scale,
                alignment=self.config.alignment, anchor_embeds=anchor_embeds, labels=labels,
                category_kind=self.config.category_loss, category_bias=self.category_bias,
                dkam_lambda=self.config.dkam_lambda,
            )  # fmt: skip

        return LlavaRadZOutput(
            **(terms or {}),
            logits_per_image=logits_per_image,
            logits_per_text=None if logits_per_image is None else logits_per_image.t(),
            image_embeds=None if image is None else image.embeds,
            text_embeds=None if text is None else text.embeds,
            image_local_embeds=None if image is None else image.local_embeds,
            text_local_embeds=None if text is None else text.local_embeds,
            anchor_embeds=anchor_embeds,
            logit_scale=scale,
        )

    def category_loss(self, image_embeds, text_embeds, anchor_embeds, labels) -> torch.Tensor:
        """L_CG: the mean of the image-side and text-side `category_loss`."""
        labels = labels.to(image_embeds.device, image_embeds.dtype)
        kind, scale, bias = self.config.category_loss, self.scale(), self.category_bias
        image_side = category_loss(image_embeds, anchor_embeds, labels, scale, kind, bias)
        return (image_side + category_loss(text_embeds, anchor_embeds, labels, scale, kind, bias)) / 2.0

    # -- conversion from LLaVA -------------------------------------------------------------------------------
    @classmethod
    def from_llava(
        cls, llava_dir_or_model, processor=None, load_kwargs: dict | None = None, vision_tower=None, **config_overrides
    ):
        """Turn a transformers `LlavaForConditionalGeneration` (object, hub id or directory) into LLaVA-RadZ; or an
        original-layout LLaVA-1.5 / LLaVA-Med v1.5 directory (`llava_llama`, `llava_mistral`), converted by
        convert_llava_radz.py with its CLIP tower from `mm_vision_tower` or `vision_tower` (e.g. a local directory).

        Adds `<ImgCls_*>`/`<TxtCls_*>` (ids from `processor`, or from `LlavaRadZProcessor.from_llava` on the
        same checkpoint), resizes the embeddings where needed and sets the new rows to the mean embedding;
        initialises the heads; keeps every pretrained weight. `load_kwargs` go to `from_pretrained` (e.g.
        `{"dtype": torch.bfloat16}` for a 7B model); `config_overrides` set LlavaRadZConfig
        fields.
        """
        try:
            from .processing_llava_radz import LlavaRadZProcessor
        except ImportError:
            from processing_llava_radz import LlavaRadZProcessor

        num = config_overrides.get("num_cls_tokens", LlavaRadZConfig.num_cls_tokens)
        if isinstance(llava_dir_or_model, LlavaForConditionalGeneration):
            llava = llava_dir_or_model
            if processor is None:
                raise ValueError("from_llava(model_object) needs processor=LlavaRadZProcessor.from_llava(...)")
        elif not isinstance(llava_dir_or_model, (str, Path)):
            raise TypeError(
                f"from_llava expects a LlavaForConditionalGeneration or a checkpoint id/directory, "
                f"got {type(llava_dir_or_model).__name__}"
            )
        elif read_original_config(llava_dir_or_model) is not None:
            source = str(llava_dir_or_model)
            unsupported = set(load_kwargs or {}) - {"dtype", "attn_implementation"}
            if unsupported:
                raise ValueError(
                    f"{source}: an original-layout checkpoint converts in memory with dtype/attn_implementation "
                    f"only, not {sorted(unsupported)}; write it converted first (python convert_llava_radz.py "
                    f"{source} OUTPUT_DIR) and load OUTPUT_DIR"
                )
            llava, _ = convert_original_llava(source, vision_tower, **(load_kwargs or {}))
            if processor is None:
                processor = LlavaRadZProcessor.from_llava(source, num_cls_tokens=num, vision_tower=vision_tower)
        else:
            source = str(llava_dir_or_model)
            try:
                found = AutoConfig.from_pretrained(source).model_type
            except (OSError, ValueError) as error:
                raise ValueError(f"{source}: cannot read a model config from it ({error})") from error
            if found != "llava":
                raise ValueError(
                    f"{source}: expected a LLaVA checkpoint (model_type 'llava', or the original layout's "
                    f"'llava_llama' / 'llava_mistral'), found {found!r}"
                )
            llava = LlavaForConditionalGeneration.from_pretrained(source, **(load_kwargs or {}))
            if processor is None:
                processor = LlavaRadZProcessor.from_llava(source, num_cls_tokens=num)

        image_ids, text_ids = processor.cls_token_ids("image"), processor.cls_token_ids("text")
        add_token_rows(llava, image_ids + text_ids)

        settings = llava.config.to_dict()
        for key in ("model_type", "architectures", "auto_map", "transformers_version"):
            settings.pop(key, None)
        settings.update(config_overrides)
        settings.update(processor.config_kwargs())
        config = LlavaRadZConfig(**settings)
        # One config object for the wrapper and the wrapped model, as when built from a config.
        config.vision_config, config.text_config = llava.config.vision_config, llava.config.text_config
        llava.config = llava.model.config = config
        with torch.device(llava.device):  # the heads beside the LLM, in float32 whatever the LLM's dtype
            model = cls(config, llava=llava)
        model.calibrate_heads(*processor.calibration_inputs())
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        # register_for_auto_class registers one auto class; the zero-shot one is added by hand.
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map["AutoModelForZeroShotImageClassification"] = f"{__name__.split('.')[-1]}.{type(self).__name__}"
        self.config.auto_map = auto_map
        # The zero-shot pipeline travels with every checkpoint: beside this file in the package, or in the
        # checkpoint this model was loaded from (remote code is cached per file, so not always beside it).
        sources = [Path(__file__).parent] + ([Path(self.name_or_path)] if self.name_or_path else [])
        pipeline_dir = next((d for d in sources if all((d / f).is_file() for f in PIPELINE_FILES)), None)
        if pipeline_dir is not None:
            self.config.custom_pipelines = {"zero-shot-image-classification": dict(PIPELINE_INFO)}
        elif getattr(self.config, "custom_pipelines", None):
            self.config.custom_pipelines = {}  # declare no pipeline whose code the checkpoint would lack
        result = super().save_pretrained(save_directory, *args, **kwargs)
        for name in PIPELINE_FILES if pipeline_dir is not None else ():
            target = Path(save_directory) / name
            if not (target.exists() and target.samefile(pipeline_dir / name)):
                shutil.copyfile(pipeline_dir / name, target)
        return result


LlavaRadZConfig.register_for_auto_class()
LlavaRadZForZeroShotClassification.register_for_auto_class("AutoModel")

__all__ = [
    "LlavaRadZForZeroShotClassification",
    "LlavaRadZOutput",
    "LlavaRadZFeatures",
    "alignment_loss",
    "category_loss",
    "clip_loss",
]
