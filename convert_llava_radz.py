"""Original-layout LLaVA checkpoints → transformers' `LlavaForConditionalGeneration` and `LlavaProcessor`.

The original layout is that of haotian-liu/LLaVA (LLaVA-1.5, `model_type: "llava_llama"`) and microsoft/LLaVA-Med
(LLaVA-Med v1.5, `"llava_mistral"`): a Llama/Mistral causal-LM checkpoint whose config adds `mm_*` fields, whose
weights add `model.mm_projector.{0,2}` (the `mlp2x_gelu` projector), and whose CLIP vision tower is loaded apart
from `mm_vision_tower` (an `openai/clip-vit-...` id or a directory). `LlavaRadZForZeroShotClassification.from_llava`
and `LlavaRadZProcessor.from_llava` call this module for such a checkpoint; run it as a script to write the
converted checkpoint to a directory:

    python convert_llava_radz.py ORIGINAL_DIR OUTPUT_DIR [--vision_tower CLIP_DIR] [--dtype bfloat16]

Every weight is kept: the LLM's and the projector's from the checkpoint, the tower's from the checkpoint when it
holds them (`model.vision_tower.vision_tower.*`) or else from the tower directory. Only safetensors are read.

This file is remote code: it imports only torch, transformers and safetensors (docs/design.md, "Remote code").
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
)
from transformers.initialization import no_init_weights

# model_type of the original checkpoint → (its LLM's config class, the conversation it was trained with).
ORIGINAL_MODEL_TYPES = {"llava_llama": (LlamaConfig, "vicuna_v1"), "llava_mistral": (MistralConfig, "mistral_instruct")}
# LLaVA's training/inference settings in the original config, not fields of the LLM's config.
LLAVA_ONLY_KEYS = {
    "architectures", "model_type", "_name_or_path", "transformers_version", "torch_dtype", "image_aspect_ratio",
    "image_grid_pinpoints", "tokenizer_model_max_length", "tokenizer_padding_side", "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter", "use_mm_proj", "unfreeze_mm_vision_tower", "s2", "s2_scales",
}  # fmt: skip
IMAGE_TOKEN = "<image>"

# The conversations of LLaVA's `llava/conversation.py` (`conv_vicuna_v1`, `conv_mistral_instruct`) for one user turn:
# the prompt the model saw in training, up to where its answer starts.
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CONVERSATIONS = {
    "vicuna_v1": VICUNA_V1_SYSTEM + " USER: {message} ASSISTANT:",
    "mistral_instruct": "[INST] {message} [/INST]",
}
# The same as chat templates for `processor.apply_chat_template` (`generate`, the VQA baseline), images first in a
# turn as LLaVA writes them.
_TURN_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}{% endif %}"
)
CHAT_TEMPLATES = {
    "vicuna_v1": (
        VICUNA_V1_SYSTEM + " {% for message in messages %}"
        "{% if message['role'] == 'user' %}USER: " + _TURN_CONTENT + " {% elif message['role'] == 'assistant' %}"
        "ASSISTANT: " + _TURN_CONTENT + "</s>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    ),
    "mistral_instruct": (
        "{% for message in messages %}{% if message['role'] == 'user' %}[INST] " + _TURN_CONTENT + " [/INST]"
        "{% elif message['role'] == 'assistant' %} " + _TURN_CONTENT + " </s>{% endif %}{% endfor %}"
    ),
}


def read_original_config(checkpoint) -> dict | None:
    """The config of an original-layout LLaVA checkpoint directory, or None for any other checkpoint."""
    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    return config if config.get("model_type") in ORIGINAL_MODEL_TYPES else None


def conversation_prompt(original_config: dict, message: str) -> str:
    """`message` (one user turn) in the conversation format that checkpoint was trained with."""
    return CONVERSATIONS[ORIGINAL_MODEL_TYPES[original_config["model_type"]][1]].format(message=message)


def _check_supported(checkpoint, config: dict):
    projector = config.get("mm_projector_type", "linear")
    problems = []
    if projector != "mlp2x_gelu":
        problems.append(f"mm_projector_type {projector!r} (LLaVA-1.5 / LLaVA-Med v1.5 use 'mlp2x_gelu')")
    if "unpad" in config.get("mm_patch_merge_type", "flat"):
        problems.append(f"mm_patch_merge_type {config['mm_patch_merge_type']!r} (LLaVA-NeXT's any-resolution)")
    if config.get("mm_use_im_start_end", False):
        problems.append("mm_use_im_start_end true")
    if config.get("mm_vision_select_feature", "patch") not in ("patch", "cls_patch"):
        problems.append(f"mm_vision_select_feature {config['mm_vision_select_feature']!r}")
    if problems:
        raise ValueError(f"{checkpoint}: unsupported original LLaVA checkpoint: {'; '.join(problems)}")


def _tower_source(checkpoint, config: dict, vision_tower) -> str:
    tower = vision_tower or config.get("mm_vision_tower")
    if tower is None:
        raise ValueError(f"{checkpoint}: config.json has no mm_vision_tower; pass vision_tower= (a CLIP directory)")
    return str(tower)


def original_llava_processor(checkpoint, vision_tower=None) -> LlavaProcessor:
    """The `LlavaProcessor` of an original checkpoint: its tokenizer with `<image>` added (and `<unk>` as the pad
    token, as LLaVA trains), the CLIP image processor of its tower, its conversation as the chat template."""
    config = read_original_config(checkpoint)
    if config is None:
        raise ValueError(
            f"{checkpoint}: not an original-layout LLaVA checkpoint (model_type one of {sorted(ORIGINAL_MODEL_TYPES)})"
        )
    _check_supported(checkpoint, config)
    tower = _tower_source(checkpoint, config, vision_tower)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    tokenizer.image_token = IMAGE_TOKEN
    tower_config = CLIPVisionConfig.from_pretrained(tower)
    full = config.get("mm_vision_select_feature", "patch") == "cls_patch"
    return LlavaProcessor(
        image_processor=AutoImageProcessor.from_pretrained(tower),
        tokenizer=tokenizer,
        patch_size=tower_config.patch_size,
        vision_feature_select_strategy="full" if full else "default",
        num_additional_image_tokens=1,  # CLIP's class token
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATES[ORIGINAL_MODEL_TYPES[config["model_type"]][1]],
    )


def _read_safetensors(checkpoint) -> dict:
    files = sorted(Path(checkpoint).glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in Path(checkpoint).glob("*.bin"))
        raise ValueError(
            f"{checkpoint}: no *.safetensors weights"
            + (f" (found {found[:3]}: pickle files are not loaded; re-save them as safetensors)" if found else "")
        )
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt") as weights:
            state.update({key: weights.get_tensor(key) for key in weights.keys()})
    return state


def convert_state_dict(checkpoint, state: dict) -> tuple[dict, dict]:
    """Original keys → `LlavaForConditionalGeneration` keys; returns (LLM + projector state, tower state or {})."""
    converted, tower = {}, {}
    for key, value in state.items():
        if key.endswith(".rotary_emb.inv_freq"):
            continue  # a buffer recomputed from the config
        if key.startswith("model.vision_tower.vision_tower."):
            tower[key.removeprefix("model.vision_tower.vision_tower.").removeprefix("vision_model.")] = value
        elif key.startswith("model.mm_projector."):
            index, rest = key.removeprefix("model.mm_projector.").split(".", 1)
            names = {"0": "linear_1", "2": "linear_2"}
            if index not in names:
                raise ValueError(f"{checkpoint}: unexpected projector weight {key!r}")
            converted[f"model.multi_modal_projector.{names[index]}.{rest}"] = value
        elif key.startswith("model."):
            converted["model.language_model." + key.removeprefix("model.")] = value
        elif key == "lm_head.weight":
            converted[key] = value
        else:
            raise ValueError(f"{checkpoint}: unexpected weight {key!r} for an original LLaVA checkpoint")
    return converted, tower


def convert_original_llava(checkpoint, vision_tower=None, dtype=None, attn_implementation=None):
    """(`LlavaForConditionalGeneration`, `LlavaProcessor`) from an original-layout checkpoint directory.

    `vision_tower` replaces the config's `mm_vision_tower` (e.g. a local copy of openai/clip-vit-large-patch14-336).
    The vocabulary grows by `<image>` (its row is the mean row; image features replace it in every pass).
    """
    checkpoint = str(checkpoint)
    processor = original_llava_processor(checkpoint, vision_tower)
    original = read_original_config(checkpoint)
    text_class = ORIGINAL_MODEL_TYPES[original["model_type"]][0]
    llm_settings = {k: v for k, v in original.items() if k not in LLAVA_ONLY_KEYS and not k.startswith("mm_")}
    text_config = text_class(**llm_settings)
    tower = _tower_source(checkpoint, original, vision_tower)
    full = original.get("mm_vision_select_feature", "patch") == "cls_patch"
    vision_config = CLIPVisionConfig.from_pretrained(tower)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=original.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="full" if full else "default",
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2 + (1 if full else 0),
        projector_hidden_act="gelu",
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    llm_state, tower_state = convert_state_dict(checkpoint, _read_safetensors(checkpoint))
    if not tower_state:
        tower_state = CLIPVisionModel.from_pretrained(tower).state_dict()
    state = {**llm_state, **{f"model.vision_tower.{k}": v for k, v in tower_state.items()}}
    if "lm_head.weight" not in state and text_config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"]

    with no_init_weights():  # every weight comes from the checkpoint
        llava = LlavaForConditionalGeneration._from_config(
            config, dtype=dtype or torch.float32, attn_implementation=attn_implementation
        )
    vocab = state["model.language_model.embed_tokens.weight"].shape[0]
    if vocab != text_config.vocab_size:
        raise ValueError(f"{checkpoint}: embed_tokens has {vocab} rows, config vocab_size is {text_config.vocab_size}")
    missing, unexpected = llava.load_state_dict(state, strict=False)
    missing = [key for key in missing if not (key == "lm_head.weight" and text_config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{checkpoint}: weights do not fit LLaVA: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for module in llava.modules():  # loaded: a wrapper's `post_init` must not initialise them again
        module._is_hf_initialized = True
    add_token_rows(llava, [config.image_token_index])
    llava.eval()
    return llava, processor


def add_token_rows(llava: LlavaForConditionalGeneration, token_ids: list[int]):
    """Make room for `token_ids` and set their input (and untied output) embedding rows to the mean row."""
    embeddings = llava.get_input_embeddings()
    old_rows = embeddings.weight.shape[0]
    if max(token_ids) >= old_rows:
        llava.resize_token_embeddings(max(token_ids) + 1, mean_resizing=False)
    ids = torch.tensor(token_ids)
    weights = {llava.get_input_embeddings().weight, llava.get_output_embeddings().weight}  # one when tied
    with torch.no_grad():
        means = [(weight, weight[:old_rows].mean(dim=0)) for weight in weights]
        for weight, mean in means:
            weight[ids] = mean


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="an original-layout LLaVA-1.5 / LLaVA-Med v1.5 directory")
    parser.add_argument("output_dir")
    parser.add_argument("--vision_tower", help="a CLIP directory instead of the config's mm_vision_tower")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    llava, processor = convert_original_llava(args.checkpoint, args.vision_tower, getattr(torch, args.dtype))
    llava.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
