"""Parameter-efficient setup of LLaVA-RadZ (the paper's DFAT recipe) and the final merged save.

Trainable: the projector, LoRA on the LLM, the rows of the new `<ImgCls_*>`/`<TxtCls_*>` tokens, the global, local
and anchor heads, `logit_scale` (and the sigmoid category bias). Frozen: the vision tower (unless
`--train_vision_tower`) and every other LLM weight, including the old embedding rows.

peft freezes every parameter that is not an adapter. The projector, heads and `logit_scale` are switched back on
*after* `get_peft_model`, as ordinary parameters (not `modules_to_save` copies, which cannot hold a bare parameter
like `logit_scale`); the trainer saves them beside the adapter in `NON_ADAPTER_FILE`.
"""

from __future__ import annotations

import re

import torch
from peft import LoraConfig, PeftModel, TrainableTokensConfig, get_peft_model, prepare_model_for_kbit_training

from modeling_llava_radz import HEAD_MODULES

from .args import ModelArguments
from .precision import check_trainable_4bit, is_quantized

# Parameter-name markers of peft's own trainable tensors (LoRA matrices, trainable-token deltas).
ADAPTER_MARKERS = ("lora_", "trainable_tokens_")
NON_ADAPTER_FILE = "non_adapter_trainable.safetensors"


def lora_target_regex(module_names, num_layers: int | None = None) -> str:
    """A peft `target_modules` regex matching `module_names` inside the LLM only (the CLIP tower has q_proj too);
    it fits LLaVA-RadZ (`llava.model.language_model…`) and a plain LLaVA (`model.language_model…`). With
    `num_layers`, only in the first `num_layers` decoder layers."""
    names = "|".join(re.escape(name) for name in module_names)
    layers = r"\d+" if num_layers is None else "|".join(str(i) for i in range(num_layers))
    return rf"(.*\.)?language_model\.layers\.({layers})\..*\.({names})"


def _set_outside_llm_trainable(model, train_vision_tower: bool):
    inner = model.llava.model
    inner.multi_modal_projector.requires_grad_(True)
    inner.vision_tower.requires_grad_(train_vision_tower)
    for name in HEAD_MODULES:
        if getattr(model, name) is not None:  # anchor_head="shared" has no anchor head of its own
            getattr(model, name).requires_grad_(True)
    model.logit_scale.requires_grad_(model.config.learnable_temperature)
    if model.category_bias is not None:
        model.category_bias.requires_grad_(True)


def prepare_for_training(model, args: ModelArguments):
    """Freeze and wrap `model` (a LlavaRadZForZeroShotClassification) as `args` say; returns the model to train:

    - `lora_r > 0`: a peft `PeftModel` with LoRA on `lora_target_modules` of the LLM and trainable special-token rows;
    - `lora_r == 0`: a peft `PeftModel` training only the special-token rows of the LLM, or, with `train_llm`,
      the plain model with the whole LLM trainable.
    """
    token_ids = list(model.config.image_cls_token_ids) + list(model.config.text_cls_token_ids)
    if is_quantized(model):
        # QLoRA: every weight that is not 4-bit goes to float32 (peft's recipe); gradient checkpointing is the
        # Trainer's `--gradient_checkpointing`.
        check_trainable_4bit(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        # The trainable token rows are deltas in the embedding's dtype: a float32 embedding keeps them float32.
        model.get_input_embeddings().float()
    model.requires_grad_(False)
    if args.lora_r > 0:
        targets = [name.strip() for name in args.lora_target_modules.split(",") if name.strip()]
        config = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            # Only the layers that the passes run (those up to feature_layer): LoRA on later ones never trains.
            target_modules=lora_target_regex(targets, model.feature_layer_count()),
            trainable_token_indices={"embed_tokens": token_ids},
        )
        model = get_peft_model(model, config)
    elif not args.train_llm:
        model = get_peft_model(model, TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=token_ids))
    else:
        model.llava.model.language_model.requires_grad_(True)
    _set_outside_llm_trainable(unwrap(model), args.train_vision_tower)
    for param in model.parameters():  # float32 master weights under a 16-bit base model (the AMP recipe)
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def unwrap(model):
    """The LlavaRadZForZeroShotClassification inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def non_adapter_state(model) -> dict:
    """Trainable parameters of a peft-wrapped model that its adapter checkpoint does not hold (projector, heads,
    `logit_scale`, a trainable vision tower), by their names in `model`."""
    return {
        name: param.detach()
        for name, param in model.named_parameters()
        if param.requires_grad and not any(marker in name for marker in ADAPTER_MARKERS)
    }


def merged_model(model):
    """The plain LlavaRadZForZeroShotClassification with LoRA and token deltas folded into the base weights, its
    LLaVA model back in the dtype it was loaded in (trained weights are float32 during training).

    A 4-bit (QLoRA) model is de-quantised first, so that LoRA merges into bfloat16 weights (merging into 4-bit
    would quantise the sum a second time): the result is a bfloat16 model. The heads stay float32.
    """
    if not isinstance(model, PeftModel):
        # --train_llm: float32 master weights everywhere, so the loaded dtype is the one the config recorded.
        loaded = model.llava.config.dtype
        loaded = getattr(torch, loaded) if isinstance(loaded, str) else loaded
        if isinstance(loaded, torch.dtype) and loaded != torch.float32:
            model.llava.to(loaded)
        return model
    base = unwrap(model)
    if is_quantized(base):
        dtype = torch.bfloat16
        base.llava.dequantize(dtype=dtype)
    else:
        dtype = base.llava.model.language_model.norm.weight.dtype  # frozen, so still in the loaded dtype
    merged = model.merge_and_unload()
    merged.llava.to(dtype)
    return merged
