"""The image and text passes stop at `feature_layer` (modeling_llava_radz `_llm_states`): the same embeddings as a
full run of the LLM with every layer's hidden states, fewer layers run, `generate` untouched; gradient checkpointing
under LoRA gives the same gradients; `_no_split_modules` follow the wrapped backbone."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionConfig, MistralConfig

from radz.presets import build_processor, build_tokenizer, config_for_processor, tiny

from modeling_llava_radz import LlavaRadZForZeroShotClassification

REPORTS = ["the cardiac silhouette is enlarged", "a small effusion", "the lungs are clear, no acute abnormality"]


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def tiny_mistral(sliding_window=8, **overrides):
    """A tiny LLaVA-RadZ on a Mistral LLM whose sliding window (8) is shorter than the passes (about 30 tokens)."""
    processor = build_processor(build_tokenizer(), 32, 8, num_cls_tokens=4)
    text = MistralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=512, sliding_window=sliding_window, pad_token_id=processor.tokenizer.pad_token_id,
    )  # fmt: skip
    tower = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    config = config_for_processor(processor, tower, text, projection_dim=32, **overrides)
    model = LlavaRadZForZeroShotClassification(config)
    model.calibrate_heads(*processor.calibration_inputs())
    return model, processor


def full_run_states(model):
    """Today's reference path: the whole LLaVA forward with every layer's hidden states, indexed at feature_layer."""

    def states(input_ids, attention_mask, pixel_values=None):
        outputs = model.llava.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            output_hidden_states=True,
            use_cache=False,
        )
        return outputs.hidden_states[model.config.feature_layer]

    return states


@pytest.mark.parametrize(
    "backbone, feature_layer, attention",
    [(b, f, "sdpa") for b in ("llama", "mistral") for f in (-3, -2, -1, 1)]
    + [("llama", -2, "eager"), ("mistral", -2, "eager")],
)
def test_embeddings_equal_the_full_run_with_every_hidden_state(backbone, feature_layer, attention, monkeypatch):
    torch.manual_seed(0)
    model, processor = (tiny if backbone == "llama" else tiny_mistral)(feature_layer=feature_layer)
    model.set_attn_implementation(attention)
    assert model.llava.model.language_model.config._attn_implementation == attention
    model.eval()
    # Reports of different lengths: padded rows, and (Mistral) passes longer than the sliding window.
    inputs = processor(images=images(3), text=REPORTS)
    assert inputs["input_ids"].shape[1] > 8 and (inputs["attention_mask"] == 0).any()
    with torch.no_grad():
        stopped = model(**inputs)
        monkeypatch.setattr(model, "_llm_states", full_run_states(model))
        reference = model(**inputs)
    for key in ("image_embeds", "text_embeds", "image_local_embeds", "text_local_embeds", "logits_per_image"):
        torch.testing.assert_close(stopped[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)


def test_the_passes_run_no_layer_after_feature_layer_and_no_lm_head():
    torch.manual_seed(0)
    model, processor = tiny()  # 2 decoder layers, feature_layer -2: the output of the first one
    calls = {"layers": [], "lm_head": 0, "norm": 0}
    language_model = model.llava.model.language_model
    for index, layer in enumerate(language_model.layers):
        layer.register_forward_hook(lambda *_, index=index: calls["layers"].append(index))
    model.llava.lm_head.register_forward_hook(lambda *_: calls.__setitem__("lm_head", calls["lm_head"] + 1))
    language_model.norm.register_forward_hook(lambda *_: calls.__setitem__("norm", calls["norm"] + 1))
    with torch.no_grad():
        model(**processor(images=images(2), text=REPORTS[:2]))
    assert calls == {"layers": [0, 0], "lm_head": 0, "norm": 0}  # one layer per pass (image, text)


def test_generate_still_decodes_greedily_with_the_lm_head():
    torch.manual_seed(0)
    model, processor = tiny()
    model.eval()
    prompt = processor.tokenizer("The lungs are", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    ids = prompt["input_ids"]
    with torch.no_grad():
        for _ in range(4):  # greedy decoding by hand, through the full LLaVA forward and its LM head
            next_id = model.llava(input_ids=ids).logits[:, -1].argmax(dim=-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    assert torch.equal(generated, ids)


def test_no_split_modules_come_from_the_wrapped_backbone():
    mistral, _ = tiny_mistral()
    llama, _ = tiny()
    assert {"MistralDecoderLayer", "CLIPEncoderLayer"} <= mistral._no_split_modules
    assert "LlamaDecoderLayer" not in mistral._no_split_modules
    assert {"LlamaDecoderLayer", "CLIPEncoderLayer"} <= llama._no_split_modules


def lora_gradients(checkpointing: bool) -> dict:
    from radz.training import ModelArguments, prepare_for_training

    torch.manual_seed(0)
    model, processor = tiny(alignment="cross")
    model = prepare_for_training(model, ModelArguments(config="tiny", lora_r=4, lora_dropout=0.0))
    # Non-zero LoRA B matrices, so that the LoRA A matrices get gradients too.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    inputs = processor(images=images(4), text=REPORTS + ["no pneumothorax"])
    model(**inputs, return_loss=True).loss.backward()
    layers = model.get_base_model().llava.model.language_model.layers
    assert all(layer.gradient_checkpointing == checkpointing for layer in layers)
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}


def test_gradient_checkpointing_under_lora_gives_the_same_gradients():
    plain, checkpointed = lora_gradients(False), lora_gradients(True)
    assert plain.keys() == checkpointed.keys()
    assert any("lora_A" in name for name in plain) and any("trainable_tokens" in name for name in plain)
    # LoRA sits only on the layers that the passes run (feature_layer -2 of 2 layers: layer 0).
    assert not any(".layers.1." in name for name in plain)
    for name, grad in plain.items():
        assert grad.abs().sum() > 0 or "lora" not in name, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6, msg=name)
