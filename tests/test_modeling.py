"""modeling_llava_radz.py: the DFAT model, its losses, save and reload in a fresh process, and from_llava."""

import re

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from conftest import REPO, REPORTS, random_images, run_python
from modeling_llava_radz import LlavaRadZForZeroShotClassification, alignment_loss, clip_loss
from processing_llava_radz import LlavaRadZProcessor
from radz.presets import build_tokenizer, tiny


def test_embeddings_have_the_documented_shapes_and_unit_norm(tiny_model):
    model, processor = tiny_model
    inputs = processor(images=random_images(3), text=REPORTS[:5])
    with torch.no_grad():
        out = model(**inputs)
    dim = model.config.projection_dim
    assert out.image_embeds.shape == (3, dim) and out.text_embeds.shape == (5, dim)
    assert out.image_local_embeds.shape == (3, dim) and out.text_local_embeds.shape == (5, dim)
    assert out.logits_per_image.shape == (3, 5)
    assert torch.equal(out.logits_per_text, out.logits_per_image.t())
    for embeds in (out.image_embeds, out.text_embeds, out.image_local_embeds, out.text_local_embeds):
        torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(len(embeds)))
    # The public entry points give the same global features as forward.
    with torch.no_grad():
        image = model.get_image_features(**processor(images=random_images(3)))
        text = model.get_text_features(**processor(text=REPORTS[:5]))
    torch.testing.assert_close(image.embeds, out.image_embeds)
    torch.testing.assert_close(text.embeds, out.text_embeds)


def test_the_configured_layer_is_the_one_read(tiny_model):
    model, processor = tiny_model
    inputs = processor(text=REPORTS[:3])
    with torch.no_grad():
        penultimate = model.get_text_features(**inputs).embeds
        model.config.feature_layer = -1
        last = model.get_text_features(**inputs).embeds
        model.config.feature_layer = -2
        again = model.get_text_features(**inputs).embeds
    assert not torch.allclose(penultimate, last, atol=1e-4)
    torch.testing.assert_close(penultimate, again)


def test_the_read_states_come_from_the_special_tokens(tiny_model):
    """Changing a content token changes the features; changing padding does not."""
    model, processor = tiny_model
    inputs = processor(text=["heart enlarged", "a much longer report text here"])
    with torch.no_grad():
        reference = model.get_text_features(**inputs).embeds[0]
        padded = inputs["input_ids"].clone()
        padded[0, inputs["attention_mask"][0] == 0] = 7  # different padding ids
        same = model.get_text_features(input_ids=padded, attention_mask=inputs["attention_mask"]).embeds[0]
    torch.testing.assert_close(reference, same)


@pytest.mark.parametrize("alignment", ["global", "cross"])
def test_training_on_a_fixed_batch_reaches_full_retrieval(alignment):
    torch.manual_seed(0)
    model, processor = tiny(alignment=alignment)
    inputs = processor(images=random_images(8, seed=1), text=REPORTS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(60):
        out = model(**inputs, return_loss=True)
        assert torch.isfinite(out.loss)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    assert losses[-1] < 0.5 * losses[0]
    assert (logits.argmax(dim=1) == torch.arange(8)).all(), "image→text retrieval"
    assert (logits.argmax(dim=0) == torch.arange(8)).all(), "text→image retrieval"


def test_losses_match_their_definitions():
    torch.manual_seed(0)
    image, text, image_local, text_local = (torch.nn.functional.normalize(torch.randn(4, 8), dim=-1) for _ in range(4))
    scale = torch.tensor(10.0)
    logits = scale * image @ text.t()
    expected = (
        torch.nn.functional.cross_entropy(logits, torch.arange(4))
        + torch.nn.functional.cross_entropy(logits.t(), torch.arange(4))
    ) / 2
    torch.testing.assert_close(alignment_loss(image, text, image_local, text_local, scale, "global"), expected)
    cross = (clip_loss(scale * image @ text_local.t()) + clip_loss(scale * image_local @ text.t())) / 2
    torch.testing.assert_close(alignment_loss(image, text, image_local, text_local, scale, "cross"), cross)
    # Perfectly aligned pairs at a high scale give a near-zero loss.
    assert alignment_loss(image, image, image, image, torch.tensor(100.0), "global") < 1e-3


def test_save_and_reload_in_a_fresh_process_gives_equal_logits(tiny_checkpoint, tmp_path):
    model = LlavaRadZForZeroShotClassification.from_pretrained(tiny_checkpoint)
    processor = LlavaRadZProcessor.from_pretrained(tiny_checkpoint)
    inputs = processor(images=random_images(2), text=REPORTS[:3])
    with torch.no_grad():
        expected = model(**inputs).logits_per_image
    save_file({**{k: v.contiguous() for k, v in inputs.items()}, "expected": expected}, tmp_path / "io.safetensors")
    code = f"""
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoProcessor, AutoModelForZeroShotImageClassification
d = {str(tiny_checkpoint)!r}
config = AutoConfig.from_pretrained(d, trust_remote_code=True)
model = AutoModel.from_pretrained(d, trust_remote_code=True)
zero_shot = AutoModelForZeroShotImageClassification.from_pretrained(d, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(d, trust_remote_code=True)
data = load_file({str(tmp_path / "io.safetensors")!r})
expected = data.pop("expected")
with torch.no_grad():
    logits = model(**data).logits_per_image
print(type(config).__name__, type(model).__name__, type(zero_shot).__name__, type(processor).__name__)
print(torch.allclose(logits, expected, atol=1e-6), processor.num_image_tokens, sorted(processor.knowledge))
"""
    lines = run_python(code).splitlines()
    assert lines[-2].split() == [
        "LlavaRadZConfig",
        "LlavaRadZForZeroShotClassification",
        "LlavaRadZForZeroShotClassification",
        "LlavaRadZProcessor",
    ]
    assert lines[-1] == f"True {processor.num_image_tokens} ['Cardiomegaly', 'No Finding', 'Pleural Effusion']"


def test_checkpoint_carries_remote_code_that_imports_nothing_from_radz(tiny_checkpoint):
    remote_code = sorted(path.name for path in REPO.glob("*_llava_radz.py"))
    assert len(remote_code) >= 12 and "modeling_llava_radz.py" in remote_code
    for name in remote_code:  # every remote-code file travels, and none reaches into the package
        source = (tiny_checkpoint / name).read_text()
        assert not re.search(r"^\s*(from|import)\s+\.?radz\b", source, re.MULTILINE), name
    assert (tiny_checkpoint / "model.safetensors").exists()
    assert not list(tiny_checkpoint.glob("*.bin")) and not list(tiny_checkpoint.glob("*.pt"))


def test_generate_still_works_on_the_underlying_llava(tiny_model):
    model, processor = tiny_model
    prompt = processor.tokenizer("The heart is", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, prompt["input_ids"].shape[1] + 4)


# ---------------------------------------------------------------------------------------------------------------
# from_llava
# ---------------------------------------------------------------------------------------------------------------


def save_tiny_llava(directory, tie_word_embeddings=False):
    """A tiny LlavaForConditionalGeneration + LlavaProcessor saved in the llava-hf layout."""
    tokenizer = build_tokenizer()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
        ),
        text_config=LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            vocab_size=len(tokenizer) + 8, tie_word_embeddings=tie_word_embeddings,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(config)
    llava.save_pretrained(directory)
    processor.save_pretrained(directory)
    return llava


@pytest.mark.parametrize("tied", [False, True])
def test_from_llava_keeps_every_pretrained_weight_but_the_new_rows(tmp_path, tied):
    llava = save_tiny_llava(tmp_path, tie_word_embeddings=tied)
    original = {k: v.clone() for k, v in llava.state_dict().items()}
    old_rows = llava.get_input_embeddings().weight.shape[0]

    model = LlavaRadZForZeroShotClassification.from_llava(tmp_path, num_cls_tokens=12, alignment="global")
    processor = LlavaRadZProcessor.from_llava(tmp_path, num_cls_tokens=12)
    assert model.config.num_cls_tokens == 12 and model.config.alignment == "global"
    new_ids = processor.cls_token_ids("image") + processor.cls_token_ids("text")
    assert model.config.image_cls_token_ids + model.config.text_cls_token_ids == new_ids
    assert processor.num_image_tokens == 16  # (32/8)^2 + 1 CLS - 1 with the "default" strategy

    state = model.llava.state_dict()
    for key, value in original.items():
        if "embed_tokens" in key or key == "lm_head.weight":
            kept = [i for i in range(old_rows) if i not in new_ids]
            torch.testing.assert_close(state[key][kept], value[kept], msg=key)
        else:
            torch.testing.assert_close(state[key], value, msg=key)
    embeddings = model.get_input_embeddings().weight
    assert embeddings.shape[0] >= max(new_ids) + 1
    mean = original["model.language_model.embed_tokens.weight"][:old_rows].mean(dim=0)
    for token_id in new_ids:
        torch.testing.assert_close(embeddings[token_id], mean)
    # The converted model runs, and saves/reloads with its tied or untied head.
    inputs = processor(images=random_images(2), text=REPORTS[:2])
    out = model(**inputs, return_loss=True)
    assert torch.isfinite(out.loss)
    model.save_pretrained(tmp_path / "radz")
    reloaded = LlavaRadZForZeroShotClassification.from_pretrained(tmp_path / "radz")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits_per_image, model(**inputs).logits_per_image)


def test_from_llava_accepts_a_model_object_with_its_processor(tmp_path):
    llava = save_tiny_llava(tmp_path)
    processor = LlavaRadZProcessor.from_llava(LlavaProcessor.from_pretrained(tmp_path), num_cls_tokens=3)
    model = LlavaRadZForZeroShotClassification.from_llava(llava, processor=processor)
    assert model.llava is llava and model.config.num_cls_tokens == 3
    with pytest.raises(ValueError, match="needs processor"):
        LlavaRadZForZeroShotClassification.from_llava(llava)


def test_from_llava_rejects_a_checkpoint_that_is_not_llava(tmp_path):
    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match="expected a LLaVA checkpoint.*'llama'"):
        LlavaRadZForZeroShotClassification.from_llava(tmp_path)
    with pytest.raises(ValueError, match="cannot read a model config"):
        LlavaRadZForZeroShotClassification.from_llava(tmp_path / "missing")
    with pytest.raises(TypeError, match="from_llava expects"):
        LlavaRadZForZeroShotClassification.from_llava(42)


def test_from_llava_passes_load_kwargs_and_keeps_the_dtype(tmp_path):
    save_tiny_llava(tmp_path)
    model = LlavaRadZForZeroShotClassification.from_llava(tmp_path, load_kwargs={"dtype": torch.bfloat16})
    assert {p.dtype for p in model.llava.parameters()} == {torch.bfloat16}
    assert {p.dtype for n, p in model.named_parameters() if not n.startswith("llava.")} == {torch.float32}  # heads
    processor = LlavaRadZProcessor.from_llava(tmp_path)
    with torch.no_grad():
        out = model(**processor(images=random_images(2), text=REPORTS[:2]))
    assert out.logits_per_image.dtype == torch.float32 and torch.isfinite(out.logits_per_image).all()
