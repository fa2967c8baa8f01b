"""Core package: config, DFAT model, processor, image/DICOM input, Auto loading, from_llava."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from conftest import run_python
from configuration_llava_radz import LlavaRadZConfig
from modeling_llava_radz import LlavaRadZForZeroShotClassification, alignment_loss, clip_loss
from processing_llava_radz import LlavaRadZProcessor, RadiographError, load_radiograph, to_uint8
from radz.presets import build_tokenizer, tiny

REPORTS = [
    "the cardiac silhouette is enlarged",
    "blunting of the left costophrenic angle",
    "a visceral pleural line at the right apex",
    "patchy consolidation in the right lower lobe",
    "a rounded nodule in the left upper zone",
    "bilateral perihilar haze with kerley lines",
    "plate-like opacity at the left base",
    "the lungs are clear, no acute finding",
]


def random_images(count, seed=0, size=(40, 48)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(count)]


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


def test_processor_builds_both_prompts_with_special_tokens(tiny_model):
    model, processor = tiny_model
    inputs = processor(images=random_images(2), text=["short", "a much longer report about the lungs"])
    image_ids = inputs["image_input_ids"]
    assert (image_ids == model.config.image_token_id).sum(dim=1).tolist() == [processor.num_image_tokens] * 2
    assert image_ids[0, -processor.num_cls_tokens :].tolist() == model.config.image_cls_token_ids
    for row in range(2):
        length = int(inputs["attention_mask"][row].sum())
        tail = inputs["input_ids"][row, length - processor.num_cls_tokens : length].tolist()
        assert tail == model.config.text_cls_token_ids
    # Long reports are truncated, never their special tokens.
    processor.max_text_tokens = 5
    ids = processor(text=["word " * 200])["input_ids"][0].tolist()
    assert ids[-processor.num_cls_tokens :] == model.config.text_cls_token_ids
    assert len(ids) < 40


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
    for name in (
        "configuration_llava_radz.py", "modeling_llava_radz.py", "processing_llava_radz.py", "radiograph_llava_radz.py"
    ):
        source = (tiny_checkpoint / name).read_text()
        assert "radz." not in source.replace("llava_radz", ""), name
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


# ---------------------------------------------------------------------------------------------------------------
# Images and DICOM
# ---------------------------------------------------------------------------------------------------------------


def test_every_image_kind_becomes_8bit_rgb(tmp_path):
    gradient = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (32, 1))
    inputs = {
        "PIL L": Image.fromarray((gradient * 255).astype(np.uint8)),
        "PIL RGBA": Image.fromarray((gradient * 255).astype(np.uint8)).convert("RGBA"),
        "PIL I;16": Image.fromarray((gradient * 40000).astype(np.uint16)),
        "uint8": (gradient * 255).astype(np.uint8),
        "uint16": (gradient * 4095).astype(np.uint16),
        "float": gradient,
        "float HU": gradient * 2000 - 1000,
        "HxWx1": (gradient * 255).astype(np.uint8)[..., None],
    }
    Image.fromarray((gradient * 255).astype(np.uint8)).save(tmp_path / "x.png")
    Image.fromarray((gradient * 255).astype(np.uint8)).save(tmp_path / "x.jpg")
    Image.fromarray((gradient * 60000).astype(np.uint16)).save(tmp_path / "x16.png")
    inputs.update({"png": tmp_path / "x.png", "jpeg": str(tmp_path / "x.jpg"), "png16": tmp_path / "x16.png"})
    for name, image in inputs.items():
        loaded = load_radiograph(image)
        array = np.asarray(loaded)
        assert loaded.mode == "RGB" and array.shape == (32, 64, 3), name
        # The gradient survives: dark on the left, bright on the right, grayscale channels equal.
        assert array[:, :4].mean() < 40 and array[:, -4:].mean() > 215, name
        assert (array[..., 0] == array[..., 2]).all(), name


def test_16bit_rule_uses_the_percentile_window():
    values = np.arange(1000, dtype=np.uint16).reshape(10, 100)
    values[0, 0] = 65535  # one hot pixel must not squash the rest
    mapped = to_uint8(values)
    low, high = np.percentile(values, (0.5, 99.5))
    assert mapped.dtype == np.uint8 and mapped[5, 50] == int((550 - low) / (high - low) * 255 + 0.5)
    assert mapped[0, 0] == 255 and mapped[0, 1] == 0


def test_real_chest_cr_monochrome1_is_right_side_up():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCR.dcm", download=False)
    image = np.asarray(load_radiograph(path).convert("L"), dtype=float)
    height, width = image.shape
    assert (height, width) == (1955, 1841)
    rows = slice(int(0.35 * height), int(0.55 * height))
    right_lung = image[rows, int(0.2 * width) : int(0.35 * width)].mean()
    left_lung = image[rows, int(0.65 * width) : int(0.8 * width)].mean()
    mediastinum = image[int(0.3 * height) : int(0.6 * height), int(0.45 * width) : int(0.55 * width)].mean()
    assert right_lung < mediastinum - 40 and left_lung < mediastinum - 40
    # The same file as a pydicom dataset gives the same pixels.
    import pydicom

    assert np.array_equal(np.asarray(load_radiograph(pydicom.dcmread(path)).convert("L")), image.astype(np.uint8))


@pytest.mark.parametrize("name, size", [("CT_small.dcm", (128, 128)), ("MR_small.dcm", (64, 64))])
def test_ct_and_mr_slices_load(name, size):
    from pydicom.data import get_testdata_file

    image = load_radiograph(get_testdata_file(name))
    array = np.asarray(image)
    assert image.size == size and image.mode == "RGB"
    assert array.std() > 10, "a windowed slice has contrast"


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def write_dicom(path, with_pixels=True):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.PatientName = "Phantom^Test"
    if with_pixels:
        dataset.Rows, dataset.Columns = 4, 4
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
        dataset.SamplesPerPixel, dataset.PixelRepresentation = 1, 0
        dataset.PhotometricInterpretation = "MONOCHROME2"
        dataset.PixelData = np.arange(16, dtype=np.uint16).tobytes()
    dataset.save_as(path, enforce_file_format=True)
    return path


def test_bad_inputs_get_errors_that_name_the_problem(tmp_path, tiny_model):
    model, processor = tiny_model
    with pytest.raises(TypeError, match="unsupported image type dict"):
        load_radiograph({"not": "an image"})
    with pytest.raises(RadiographError, match="missing.png: file not found"):
        load_radiograph(tmp_path / "missing.png")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(RadiographError, match="notes.txt: not a readable image file"):
        load_radiograph(tmp_path / "notes.txt")
    (tmp_path / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(RadiographError, match="truncated.png"):
        load_radiograph(tmp_path / "truncated.png")
    (tmp_path / "corrupt.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x07" * 50)
    with pytest.raises(RadiographError, match="corrupt.dcm: corrupt or unreadable DICOM"):
        load_radiograph(tmp_path / "corrupt.dcm")
    truncated = write_dicom(tmp_path / "truncated.dcm").read_bytes()[:-10]
    (tmp_path / "truncated.dcm").write_bytes(truncated)
    with pytest.raises(RadiographError, match="truncated.dcm: .*DICOM"):
        load_radiograph(tmp_path / "truncated.dcm")
    write_dicom(tmp_path / "no_pixels.dcm", with_pixels=False)
    with pytest.raises(RadiographError, match="no_pixels.dcm: the DICOM has no pixel data"):
        load_radiograph(tmp_path / "no_pixels.dcm")
    assert np.asarray(load_radiograph(write_dicom(tmp_path / "ok.dcm"))).shape == (4, 4, 3)
    with pytest.raises(RadiographError, match="shape"):
        load_radiograph(np.zeros((2, 3, 4, 5), dtype=np.uint8))
    with pytest.raises(RadiographError, match="item 1 of the batch.*missing.png"):
        processor(images=[np.zeros((8, 8), np.uint8), tmp_path / "missing.png"])
    with pytest.raises(TypeError, match="text item 1"):
        processor(text=["fine", 3])

    inputs = processor(images=random_images(3), text=REPORTS[:2])
    with pytest.raises(ValueError, match="got 3 images and 2 texts"):
        model(**inputs, return_loss=True)
    broken = dict(processor(text=REPORTS[:2]))
    broken["input_ids"] = broken["input_ids"][:, :-1]
    broken["attention_mask"] = broken["attention_mask"][:, :-1]
    with pytest.raises(ValueError, match="text pass: row 1 holds 3 special tokens, expected 4"):
        model.get_text_features(**broken)


def test_config_rejects_inconsistent_fields():
    with pytest.raises(ValueError, match="alignment='both'"):
        LlavaRadZConfig(alignment="both")
    with pytest.raises(ValueError, match="dkam_lambda"):
        LlavaRadZConfig(dkam_lambda=1.5)
    with pytest.raises(ValueError, match="feature_layer=40"):
        LlavaRadZConfig(feature_layer=40)
    with pytest.raises(ValueError, match=r"text_prompt_template must contain \{text\}"):
        LlavaRadZConfig(text_prompt_template="no placeholder")
    with pytest.raises(ValueError, match="text_cls_token_ids has 2 ids but num_cls_tokens=8"):
        LlavaRadZConfig(text_cls_token_ids=[1, 2])


@pytest.mark.parametrize("tied", [True, False])
def test_build_from_llm_keeps_the_first_layers_of_a_pretrained_llm(tied):
    from transformers import CLIPVisionConfig, LlamaForCausalLM

    from radz.presets import build_from_llm

    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    torch.manual_seed(0)
    llm = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
            vocab_size=vocab, tie_word_embeddings=tied,
        )
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    model, processor = build_from_llm(llm, tokenizer, vision, num_llm_layers=2, num_cls_tokens=3, projection_dim=16)
    language_model = model.llava.model.language_model
    assert len(language_model.layers) == 2 and model.config.text_config.num_hidden_layers == 2
    for key, value in llm.model.state_dict().items():
        if key.startswith("layers.2."):
            continue
        ours = language_model.state_dict()[key]
        if key == "embed_tokens.weight":
            torch.testing.assert_close(ours[: len(value)], value)
            torch.testing.assert_close(ours[len(value) :], value.mean(0).expand(len(ours) - len(value), -1))
        else:
            torch.testing.assert_close(ours, value, msg=key)
    if not tied:
        torch.testing.assert_close(model.llava.lm_head.weight[:vocab], llm.lm_head.weight)
    out = model(**processor(images=random_images(2), text=REPORTS[:2]), return_loss=True)
    assert torch.isfinite(out.loss) and out.image_embeds.shape == (2, 16)


def test_from_llava_passes_load_kwargs_and_keeps_the_dtype(tmp_path):
    save_tiny_llava(tmp_path)
    model = LlavaRadZForZeroShotClassification.from_llava(tmp_path, load_kwargs={"dtype": torch.bfloat16})
    assert {p.dtype for p in model.llava.parameters()} == {torch.bfloat16}
    assert {p.dtype for n, p in model.named_parameters() if not n.startswith("llava.")} == {torch.float32}  # heads
    processor = LlavaRadZProcessor.from_llava(tmp_path)
    with torch.no_grad():
        out = model(**processor(images=random_images(2), text=REPORTS[:2]))
    assert out.logits_per_image.dtype == torch.float32 and torch.isfinite(out.logits_per_image).all()
