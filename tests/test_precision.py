"""Precision of the base model (radz/training/precision.py, `train_radz.py --dtype / --attn_implementation /
--load_in_4bit`): the dtype reaches the weights, the heads and the trainable weights stay float32, the attention
kernel reaches the wrapped configs, and a QLoRA run on bitsandbytes' CPU backend trains 4-bit layers and saves a
bfloat16 checkpoint."""

import json

import pytest
import torch
from safetensors import safe_open

import train_radz
from radz.training import ModelArguments, RadZTrainingArguments, merged_model, prepare_for_training
from radz.training.run import build_model
from test_modeling import save_tiny_llava
from test_train import LABELS, data  # noqa: F401  (the module-scoped training data fixture)

from modeling_llava_radz import LlavaRadZForZeroShotClassification
from processing_llava_radz import LlavaRadZProcessor
from test_feature_layer import REPORTS, images


def dtypes(model, inside_llava: bool) -> set:
    return {p.dtype for n, p in model.named_parameters() if n.startswith("llava.") == inside_llava}


def build(base_model, tmp_path, model_flags: dict, training_flags: dict):
    model_args = ModelArguments(**{"base_model": str(base_model), "lora_r": 4, "lora_dropout": 0.0, "num_cls_tokens": 2,
                                   **model_flags})
    training_args = RadZTrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, **training_flags)
    model, processor = build_model(model_args, training_args)
    return model, processor, model_args


def test_dtype_reaches_the_llm_weights_and_the_heads_stay_float32(tmp_path):
    save_tiny_llava(tmp_path / "llava")
    model, processor, model_args = build(tmp_path / "llava", tmp_path, {"dtype": "bfloat16"}, {"bf16": True})
    assert dtypes(model, inside_llava=True) == {torch.bfloat16}
    assert dtypes(model, inside_llava=False) == {torch.float32}  # heads, logit_scale
    assert model.dtype == torch.bfloat16

    peft_model = prepare_for_training(model, model_args)
    trainable = {n: p.dtype for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("trainable_tokens" in n for n in trainable)
    assert set(trainable.values()) == {torch.float32}  # float32 master weights
    frozen_layer = peft_model.get_base_model().llava.model.language_model.layers[0].mlp.gate_proj.base_layer
    assert frozen_layer.weight.dtype == torch.bfloat16
    inputs = processor(images=images(2), text=REPORTS[:2])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the Trainer's --bf16
        out = peft_model(**inputs, return_loss=True)
    out.loss.backward()
    assert out.image_embeds.dtype == torch.float32 and torch.isfinite(out.loss)

    merged = merged_model(peft_model)  # back to the loaded dtype, the heads float32
    assert dtypes(merged, inside_llava=True) == {torch.bfloat16}
    assert dtypes(merged, inside_llava=False) == {torch.float32}
    merged.save_pretrained(tmp_path / "radz")
    assert json.loads((tmp_path / "radz" / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = LlavaRadZForZeroShotClassification.from_pretrained(tmp_path / "radz", dtype=torch.bfloat16)
    assert dtypes(reloaded, inside_llava=True) == {torch.bfloat16}
    assert dtypes(reloaded, inside_llava=False) == {torch.float32}  # _keep_in_fp32_modules_strict


def test_a_full_llm_run_saves_in_the_loaded_dtype(tmp_path):
    """--train_llm keeps float32 master weights of the whole LLM; the merged save goes back to bfloat16 (it once
    wrote float32, twice the size of the base model)."""
    save_tiny_llava(tmp_path / "llava")
    flags = {"dtype": "bfloat16", "lora_r": 0, "train_llm": True}
    model, _, model_args = build(tmp_path / "llava", tmp_path, flags, {"bf16": True})
    trained = prepare_for_training(model, model_args)
    llm = trained.llava.model.language_model
    assert all(p.requires_grad and p.dtype == torch.float32 for p in llm.parameters())
    merged = merged_model(trained)
    assert dtypes(merged, inside_llava=True) == {torch.bfloat16}
    assert dtypes(merged, inside_llava=False) == {torch.float32}


def test_attn_implementation_reaches_the_wrapped_configs(tmp_path):
    save_tiny_llava(tmp_path / "llava")
    model, _, _ = build(tmp_path / "llava", tmp_path, {"attn_implementation": "eager"}, {})
    inner = model.llava.model
    assert inner.language_model.config._attn_implementation == "eager"
    assert inner.vision_tower.config._attn_implementation == "eager"
    assert model.config.text_config._attn_implementation == "eager"
    preset, _, _ = build_preset(tmp_path, {"attn_implementation": "eager", "dtype": "bfloat16"}, {"bf16": True})
    assert preset.llava.model.language_model.config._attn_implementation == "eager"
    assert dtypes(preset, inside_llava=True) == {torch.bfloat16}
    assert dtypes(preset, inside_llava=False) == {torch.float32}


def build_preset(tmp_path, model_flags, training_flags):
    model_args = ModelArguments(config="tiny", **model_flags)
    training_args = RadZTrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, **training_flags)
    model, processor = build_model(model_args, training_args)
    return model, processor, model_args


def test_precision_flags_are_checked(tmp_path):
    with pytest.raises(ValueError, match="--dtype 'bf16'"):
        ModelArguments(config="tiny", dtype="bf16")
    with pytest.raises(ValueError, match="--attn_implementation 'flash'"):
        ModelArguments(config="tiny", attn_implementation="flash")
    with pytest.raises(ValueError, match="--load_in_4bit .* needs --base_model"):
        ModelArguments(config="tiny", load_in_4bit=True)
    with pytest.raises(ValueError, match="add --bf16"):
        build_preset(tmp_path, {"dtype": "bfloat16"}, {})
    # The default follows the Trainer's mixed precision.
    model, _, _ = build_preset(tmp_path, {}, {"bf16": True})
    assert dtypes(model, inside_llava=True) == {torch.bfloat16}


def save_qlora_llava(directory):
    """A tiny LLaVA whose LLM is wide enough (64) for bitsandbytes' 4-bit blocks of 64 on CPU."""
    import test_modeling

    original = test_modeling.LlamaConfig
    try:
        test_modeling.LlamaConfig = lambda **kw: original(**{**kw, "hidden_size": 64, "intermediate_size": 128})
        return save_tiny_llava(directory)
    finally:
        test_modeling.LlamaConfig = original


@pytest.fixture
def trainable_cpu_4bit(monkeypatch):
    """bitsandbytes without its AVX512-BF16 CPU packing, whose packed 4-bit kernel has no backward (see
    `radz.training.precision.check_trainable_4bit`): the plain 4-bit kernels, as on a GPU."""
    modules = pytest.importorskip("bitsandbytes.nn.modules")
    monkeypatch.setattr(modules, "has_avx512bf16", lambda: False)


def test_qlora_gradients_equal_those_of_the_dequantised_model(tmp_path, trainable_cpu_4bit):
    import copy

    save_qlora_llava(tmp_path / "llava")
    model, processor, model_args = build(tmp_path / "llava", tmp_path, {"load_in_4bit": True}, {})
    peft_model = prepare_for_training(model, model_args)
    with torch.no_grad():  # non-zero LoRA B, so that every LoRA matrix gets a gradient
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    twin = copy.deepcopy(peft_model)  # the same model with its 4-bit weights de-quantised to float32
    twin.get_base_model().llava.dequantize(dtype=torch.float32)
    twin.requires_grad_(False)
    for name, param in twin.named_parameters():
        param.requires_grad_(peft_model.get_parameter(name).requires_grad)
    inputs = processor(images=images(4), text=REPORTS + ["no pneumothorax"])
    grads = []
    for candidate in (peft_model, twin):
        candidate.train()
        candidate(**inputs, return_loss=True).loss.backward()
        grads.append({n: p.grad for n, p in candidate.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and any("lora_A" in name for name in grads[0])
    assert any("trainable_tokens" in name for name in grads[0])  # reached through every 4-bit layer
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-7, msg=name)


def test_qlora_refuses_weights_packed_for_cpu_inference(tmp_path):
    modules = pytest.importorskip("bitsandbytes.nn.modules")
    if not modules.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not pack its 4-bit weights")
    save_qlora_llava(tmp_path / "llava")
    model, _, model_args = build(tmp_path / "llava", tmp_path, {"load_in_4bit": True}, {})  # calibration packs
    with pytest.raises(ValueError, match="layers.0.self_attn.q_proj .* packed these 4-bit weights for CPU inference"):
        prepare_for_training(model, model_args)


def test_qlora_trains_4bit_layers_and_saves_a_bfloat16_checkpoint(tmp_path, data, trainable_cpu_4bit):  # noqa: F811
    import bitsandbytes as bnb

    llava = save_qlora_llava(tmp_path / "llava")
    model, _, model_args = build(tmp_path / "llava", tmp_path, {"load_in_4bit": True}, {})
    layer = model.llava.model.language_model.layers[0]
    assert isinstance(layer.self_attn.q_proj, bnb.nn.Linear4bit)
    assert not isinstance(model.llava.model.multi_modal_projector.linear_1, bnb.nn.Linear4bit)
    assert not isinstance(model.llava.model.vision_tower.encoder.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    peft_model = prepare_for_training(model, model_args)
    trainable = {n: p.dtype for n, p in peft_model.named_parameters() if p.requires_grad}
    assert set(trainable.values()) == {torch.float32}
    assert any("trainable_tokens" in n for n in trainable) and any("image_global_head" in n for n in trainable)

    # End to end through train_radz.py: a few QLoRA steps, the merged checkpoint in bfloat16.
    output_dir = tmp_path / "run"
    args = [
        "--base_model", str(tmp_path / "llava"), "--load_in_4bit", "--num_cls_tokens", "2",
        "--train_file", str(data["train"]), "--label_columns", ",".join(LABELS), "--knowledge", str(data["knowledge"]),
        "--output_dir", str(output_dir), "--lora_r", "4", "--lora_dropout", "0", "--learning_rate", "3e-3",
        "--max_steps", "3", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--save_strategy", "no",
        "--use_cpu", "--dataloader_pin_memory", "False", "--report_to", "none", "--gradient_checkpointing",
    ]  # fmt: skip
    assert train_radz.main(args) == 0
    config = json.loads((output_dir / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    with safe_open(output_dir / "model.safetensors", framework="pt") as f:
        saved = {key: f.get_tensor(key) for key in f.keys()}
    llm = {k: v.dtype for k, v in saved.items() if k.startswith("llava.")}
    assert set(llm.values()) == {torch.bfloat16}, {k: v for k, v in llm.items() if v != torch.bfloat16}
    assert {v.dtype for k, v in saved.items() if not k.startswith("llava.")} == {torch.float32}
    reloaded = LlavaRadZForZeroShotClassification.from_pretrained(output_dir)
    assert dtypes(reloaded, inside_llava=True) == {torch.bfloat16}
    # De-quantised, not re-quantised: a full-size weight within NF4's error of the original (layer 1 runs after
    # feature_layer -2, so it has no LoRA to merge).
    original = llava.model.language_model.layers[1].self_attn.q_proj.weight
    restored = reloaded.llava.model.language_model.layers[1].self_attn.q_proj.weight.float()
    assert restored.shape == original.shape and 0 < (restored - original).abs().mean() < 0.2 * original.abs().mean()
    processor = LlavaRadZProcessor.from_pretrained(output_dir)
    with torch.no_grad():
        out = reloaded(**processor(images=images(2), text=REPORTS[:2]))
    assert torch.isfinite(out.logits_per_image.float()).all()


def test_a_bfloat16_model_scores_like_the_float32_one(tiny_model):
    import copy

    from zero_shot_llava_radz import build_zero_shot_classifier

    model, processor = tiny_model
    model.eval()
    half = copy.deepcopy(model)
    half.llava.to(torch.bfloat16)
    labels = ["Cardiomegaly", "Pleural Effusion", "pneumothorax"]  # two anchored by the knowledge, one prompt
    inputs = processor(images=images(4))
    scores = {}
    with torch.no_grad():
        for name, candidate in (("float32", model), ("bfloat16", half)):
            classifier = build_zero_shot_classifier(candidate, processor, labels, multi_label=True)
            assert classifier.embeds.dtype == torch.float32  # the heads' dtype, not the LLM's
            scores[name] = classifier.probabilities(candidate.get_image_features(**inputs))
    torch.testing.assert_close(scores["bfloat16"], scores["float32"], atol=0.05, rtol=0)
