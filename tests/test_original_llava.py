"""Original-layout LLaVA checkpoints (convert_llava_radz.py): LLaVA-1.5 (`llava_llama`) and LLaVA-Med v1.5
(`llava_mistral`), written here at a tiny size in the layout of haotian-liu/LLaVA and microsoft/LLaVA-Med
(config with `mm_*` fields, `model.*` LLM keys, `model.mm_projector.{0,2}`, safetensors), with a tiny local CLIP
tower directory. Every weight is kept exactly; the conversation template and `_no_split_modules` follow the model."""

import json

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
)

from radz.presets import TOKENIZER_CORPUS

from convert_llava_radz import convert_original_llava
from modeling_llava_radz import LlavaRadZForZeroShotClassification
from processing_llava_radz import LlavaRadZProcessor
from test_feature_layer import REPORTS, images
from test_train import data  # noqa: F401  (the module-scoped training data fixture)

# The prompts that LLaVA's llava/conversation.py builds for one user turn "<image>\nQ" (conv_vicuna_v1, the
# LLaVA-1.5 evaluation mode; conv_mistral_instruct, LLaVA-Med v1.5's), up to where the answer starts.
VICUNA_V1 = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the user's questions. USER: <image>\nQ ASSISTANT:"
)
MISTRAL_INSTRUCT = "[INST] <image>\nQ [/INST]"


def write_clip_tower(directory):
    """A tiny CLIP (text + vision, as openai/clip-vit-large-patch14-336 is) with its image processor."""
    torch.manual_seed(1)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=99),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )  # fmt: skip
    clip = CLIPModel(config)
    clip.save_pretrained(directory)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return clip


def original_tokenizer():
    """A Llama-style tokenizer without an image token, as Vicuna's and Mistral's are."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(TOKENIZER_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def write_original_llava(directory, backbone: str, tower_dir, tower_inside: bool):
    """A tiny checkpoint in the original layout; returns (the LLM, the original state dict)."""
    tokenizer = original_tokenizer()
    config_class, model_class, model_type = {
        "llama": (LlamaConfig, LlamaForCausalLM, "llava_llama"),
        "mistral": (MistralConfig, MistralForCausalLM, "llava_mistral"),
    }[backbone]
    text_config = config_class(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    llm = model_class(text_config)
    state = {k: v.contiguous() for k, v in llm.state_dict().items()}
    state.update({
        "model.mm_projector.0.weight": torch.randn(32, 32), "model.mm_projector.0.bias": torch.randn(32),
        "model.mm_projector.2.weight": torch.randn(32, 32), "model.mm_projector.2.bias": torch.randn(32),
    })  # fmt: skip
    if backbone == "llama":  # older checkpoints may hold this buffer (transformers' convert script drops it too)
        state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    if tower_inside:  # LLaVA-Med v1.5's safetensors carry the tower, under the original module path
        clip = CLIPModel.from_pretrained(tower_dir)
        for key, value in clip.vision_model.state_dict().items():
            state[f"model.vision_tower.vision_tower.vision_model.{key}"] = value.clone() + 0.5  # differs from the dir
    directory.mkdir(parents=True)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    config = text_config.to_dict()
    config.update(
        model_type=model_type,
        architectures=["LlavaLlamaForCausalLM" if backbone == "llama" else "LlavaMistralForCausalLM"],
        mm_vision_tower=str(tower_dir) if tower_inside else "openai/clip-vit-large-patch14-336",
        mm_hidden_size=32, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        mm_patch_merge_type="flat", mm_use_im_start_end=False, mm_use_im_patch_token=False, image_aspect_ratio="pad",
        tokenizer_model_max_length=2048, tokenizer_padding_side="right", tune_mm_mlp_adapter=False, use_mm_proj=True,
    )  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(directory)
    return llm, state


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("original_llava")
    clip = write_clip_tower(root / "clip")
    llama = write_original_llava(root / "llava-v1.5", "llama", root / "clip", tower_inside=False)
    mistral = write_original_llava(root / "llava-med-v1.5", "mistral", root / "clip", tower_inside=True)
    return {"root": root, "clip": clip, "llama": llama, "mistral": mistral}


def expected_weights(checkpoints, backbone):
    """The converted model's keys → the tensors they must equal exactly."""
    llm, state = checkpoints[backbone]
    expected = {"model.multi_modal_projector.linear_1.weight": state["model.mm_projector.0.weight"],
                "model.multi_modal_projector.linear_1.bias": state["model.mm_projector.0.bias"],
                "model.multi_modal_projector.linear_2.weight": state["model.mm_projector.2.weight"],
                "model.multi_modal_projector.linear_2.bias": state["model.mm_projector.2.bias"],
                "lm_head.weight": state["lm_head.weight"]}  # fmt: skip
    for key, value in llm.model.state_dict().items():
        expected[f"model.language_model.{key}"] = value
    if backbone == "mistral":  # the tower from the checkpoint itself
        prefix = "model.vision_tower.vision_tower.vision_model."
        expected.update({f"model.vision_tower.{k[len(prefix):]}": v for k, v in state.items() if k.startswith(prefix)})
    else:  # the tower from the vision_tower= directory
        tower = checkpoints["clip"].vision_model.state_dict()
        expected.update({f"model.vision_tower.{k}": v for k, v in tower.items()})
    return expected


def assert_weights_kept(llava_state, expected, old_rows):
    assert len(expected) > 40
    for key, value in expected.items():
        kept = llava_state[key]
        if key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            kept = kept[:old_rows]  # rows of added tokens follow the original vocabulary
        assert torch.equal(kept, value), key


@pytest.mark.parametrize("backbone", ["llama", "mistral"])
def test_conversion_keeps_every_weight_and_the_llm_computes_the_same(checkpoints, backbone):
    directory = checkpoints["root"] / ("llava-v1.5" if backbone == "llama" else "llava-med-v1.5")
    tower = checkpoints["root"] / "clip" if backbone == "llama" else None  # Mistral: its mm_vision_tower
    llava, processor = convert_original_llava(directory, vision_tower=tower)
    llm, _ = checkpoints[backbone]
    old_rows = llm.config.vocab_size
    assert_weights_kept(llava.state_dict(), expected_weights(checkpoints, backbone), old_rows)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == llava.config.image_token_index >= old_rows
    assert llava.config.vision_feature_layer == -2 and llava.config.vision_feature_select_strategy == "default"
    # The converted LLM is the original one: the same logits on text.
    ids = processor.tokenizer("The lungs are clear.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(llava(input_ids=ids).logits[..., :old_rows], llm(input_ids=ids).logits)


@pytest.mark.parametrize("backbone", ["llama", "mistral"])
def test_from_llava_accepts_the_original_layout_with_its_conversation(checkpoints, backbone, tmp_path):
    root = checkpoints["root"]
    directory = root / ("llava-v1.5" if backbone == "llama" else "llava-med-v1.5")
    tower = root / "clip" if backbone == "llama" else None
    model = LlavaRadZForZeroShotClassification.from_llava(directory, vision_tower=tower, num_cls_tokens=3)
    processor = LlavaRadZProcessor.from_llava(directory, num_cls_tokens=3, vision_tower=tower)
    old_rows = checkpoints[backbone][0].config.vocab_size
    assert_weights_kept(model.llava.state_dict(), expected_weights(checkpoints, backbone), old_rows)

    # The conversation that model was trained with, for the passes and as the chat template.
    conversation = VICUNA_V1 if backbone == "llama" else MISTRAL_INSTRUCT
    assert model.config.image_prompt_template == conversation.replace(
        "<image>\nQ", "{image}\nDescribe the findings of this chest radiograph."
    )
    assert model.config.text_prompt_template == conversation.replace("<image>\nQ", "Radiology report: {text}")
    rendered = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}],
        add_generation_prompt=True, tokenize=False,
    )  # fmt: skip
    assert rendered == conversation
    # Two turns, as conversation.py's get_prompt writes them (sep " " / "</s>"; LLAMA_2 style for Mistral).
    turns = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A"}]},
        {"role": "user", "content": [{"type": "text", "text": "Q2"}]},
    ]
    second = " ASSISTANT: A</s>USER: Q2 ASSISTANT:" if backbone == "llama" else " A </s>[INST] Q2 [/INST]"
    rendered = processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    assert rendered == conversation.removesuffix(" ASSISTANT:") + second

    decoder_layer = "LlamaDecoderLayer" if backbone == "llama" else "MistralDecoderLayer"
    assert {decoder_layer, "CLIPEncoderLayer"} <= model._no_split_modules
    assert ({"LlamaDecoderLayer", "MistralDecoderLayer"} - {decoder_layer}).isdisjoint(model._no_split_modules)

    inputs = processor(images=images(2), text=REPORTS[:2])
    out = model(**inputs, return_loss=True)
    assert torch.isfinite(out.loss)
    model.save_pretrained(tmp_path / "radz")
    processor.save_pretrained(tmp_path / "radz")
    converter = (tmp_path / "radz" / "convert_llava_radz.py").read_text()  # the remote code it imports travels along
    assert "radz." not in converter.replace("llava_radz", "")  # and imports nothing from radz/
    reloaded = LlavaRadZForZeroShotClassification.from_pretrained(tmp_path / "radz")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits_per_image, model(**inputs).logits_per_image)


def test_unsupported_or_pickled_original_checkpoints_are_refused_by_name(checkpoints, tmp_path):
    source = checkpoints["root"] / "llava-v1.5"
    config = json.loads((source / "config.json").read_text())
    bad = tmp_path / "linear-projector"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**config, "mm_projector_type": "linear"}))
    with pytest.raises(ValueError, match="linear-projector.*mm_projector_type 'linear'"):
        convert_original_llava(bad, vision_tower=checkpoints["root"] / "clip")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(config))
    original_tokenizer().save_pretrained(pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickled: no \\*.safetensors.*pickle files are not loaded"):
        convert_original_llava(pickled, vision_tower=checkpoints["root"] / "clip")
    with pytest.raises(ValueError, match="write it converted first"):
        LlavaRadZForZeroShotClassification.from_llava(
            source, vision_tower=checkpoints["root"] / "clip", load_kwargs={"quantization_config": object()}
        )


def test_train_radz_trains_from_an_original_checkpoint_with_a_local_tower(checkpoints, data, tmp_path):  # noqa: F811
    import train_radz
    from test_train import LABELS

    output_dir = tmp_path / "run"
    args = [
        "--base_model", str(checkpoints["root"] / "llava-v1.5"), "--vision_tower", str(checkpoints["root"] / "clip"),
        "--num_cls_tokens", "2", "--train_file", str(data["train"]), "--label_columns", ",".join(LABELS),
        "--knowledge", str(data["knowledge"]), "--output_dir", str(output_dir), "--lora_r", "4", "--lora_dropout", "0",
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--save_strategy", "no", "--use_cpu",
        "--dataloader_pin_memory", "False", "--report_to", "none",
    ]  # fmt: skip
    assert train_radz.main(args) == 0
    model = LlavaRadZForZeroShotClassification.from_pretrained(output_dir)
    assert model.config.image_prompt_template.startswith("A chat between a curious user")
    # The tower came from the local directory, untouched (frozen).
    tower = checkpoints["clip"].vision_model.state_dict()
    kept = model.llava.model.vision_tower.state_dict()
    assert all(torch.equal(kept[key], value) for key, value in tower.items())
