"""Precision of the base model from the `train_radz.py` flags: its dtype, its attention kernel, and 4-bit NF4
quantisation (QLoRA, bitsandbytes).

The frozen weights take `--dtype` (or are quantised with `--load_in_4bit`); the trainable ones (projector, LoRA,
the new token rows, the heads, `logit_scale`) are kept in float32 by `radz.training.lora`, and the Trainer's
`--bf16` / `--fp16` autocast runs the mixed matmuls.
"""

from __future__ import annotations

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")
# Kept out of 4-bit (module names in LlavaForConditionalGeneration): the vision tower (frozen; LLaVA loads it apart
# from the LLM, in 16-bit), the projector (trained) and the LM head (read only by `generate`).
NOT_QUANTIZED = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


def base_model_dtype(model_args, training_args) -> torch.dtype:
    """`--dtype`, or by default the dtype of the Trainer's mixed precision (`--bf16`, `--fp16`), else float32.

    A 16-bit base model needs the autocast of `--bf16`/`--fp16`: its float32 trainable weights meet 16-bit
    activations (the projector reads the tower's features).
    """
    amp = "bfloat16" if training_args.bf16 else "float16" if training_args.fp16 else None
    name = model_args.dtype or amp or "float32"
    if name != "float32" and amp is None and not model_args.load_in_4bit:
        raise ValueError(
            f"--dtype {name} trains float32 adapters, projector and heads on {name} activations: "
            f"add --{'bf16' if name == 'bfloat16' else 'fp16'} (the Trainer's autocast)"
        )
    return DTYPES[name]


def quantization_config(compute_dtype: torch.dtype):
    """QLoRA's 4-bit NF4 with double quantisation (the recipe of the QLoRA paper and of LLaVA's `--bits 4`)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=NOT_QUANTIZED,
    )


def load_kwargs(model_args, training_args) -> dict:
    """`from_pretrained` keyword arguments of the base model (`from_llava(load_kwargs=...)`)."""
    dtype = base_model_dtype(model_args, training_args)
    kwargs = {"dtype": dtype}
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if model_args.load_in_4bit:
        kwargs["quantization_config"] = quantization_config(dtype)
    return kwargs


def is_quantized(model) -> bool:
    """Whether the LLaVA model inside `model` (a LlavaRadZForZeroShotClassification) holds 4-bit weights."""
    return bool(getattr(model.llava, "is_loaded_in_4bit", False))


def check_trainable_4bit(model):
    """Raise a `ValueError` naming the layers whose 4-bit weights bitsandbytes has packed for CPU inference.

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight after its first no-grad forward in eval mode (the
    head calibration of `from_llava` is one); the packed kernel has no backward, so no gradient would reach the layers
    below it and QLoRA would train wrong, silently. GPUs are not affected.
    """
    packed = [
        name
        for name, module in model.named_modules()
        if getattr(getattr(getattr(module, "weight", None), "quant_state", None), "packing_format_for_cpu", False)
    ]
    if packed:
        raise ValueError(
            f"{packed[0]} (and {len(packed) - 1} more): bitsandbytes packed these 4-bit weights for CPU inference, and "
            "its packed CPU kernel has no backward; train QLoRA on a GPU (or on a CPU without AVX512-BF16)"
        )
