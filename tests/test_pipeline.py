"""The zero-shot-image-classification pipeline (pipeline_llava_radz.py), on the tiny model."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_python
from modeling_llava_radz import alignment_logits
from pipeline_llava_radz import LlavaRadZZeroShotImageClassificationPipeline, parse_descriptions

TASK = "zero-shot-image-classification"
LABELS = ["Cardiomegaly", "effusion", "pneumonia", "pneumothorax"]  # two known to TINY_KNOWLEDGE (one by synonym)


def make_image(seed: int, shape=(48, 40)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def clf(tiny_model):
    model, processor = tiny_model
    return LlavaRadZZeroShotImageClassificationPipeline(model=model.eval(), processor=processor, device="cpu")


def count_calls(monkeypatch, model, name: str) -> dict:
    """Wrap `model.<name>`; count its calls and the rows of its first tensor argument."""
    counts = {"calls": 0, "rows": 0}
    original = getattr(model, name)

    def wrapper(*args, **kwargs):
        counts["calls"] += 1
        first = args[0] if args else next(iter(kwargs.values()))
        counts["rows"] += len(first) if isinstance(first, torch.Tensor) else 1
        return original(*args, **kwargs)

    monkeypatch.setattr(model, name, wrapper)
    return counts


def reference_logits(model, processor, image, texts, template=None) -> torch.Tensor:
    """Scaled similarities of one image with the label prompts of `texts` (in `template`, by default the model's
    `config.label_template`), straight from the model."""
    template = template or model.config.label_template
    with torch.inference_mode():
        img = model.get_image_features(**processor(images=[image]))
        txt = model.get_text_features(**processor(text=[template.format(t) for t in texts]))
        return alignment_logits(
            img.embeds, txt.embeds, img.local_embeds, txt.local_embeds, model.scale(), model.config.alignment
        )[0]


# -- loading from a checkpoint --------------------------------------------------------------------------------------


def test_checkpoint_carries_the_pipeline(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["custom_pipelines"] == {
        TASK: {"impl": "pipeline_llava_radz.LlavaRadZZeroShotImageClassificationPipeline", "pt": ["AutoModel"]}
    }
    assert (tiny_checkpoint / "pipeline_llava_radz.py").is_file()


def test_fresh_process_loads_the_pipeline_from_the_checkpoint_alone(tiny_checkpoint, tmp_path):
    """Only the checkpoint directory: `pipeline(task, model=d, trust_remote_code=True)`; the model it loads also
    re-saves a checkpoint that carries the pipeline; dtype= is honoured."""
    code = f"""
import json, numpy as np, torch
from transformers import pipeline
image = np.random.default_rng(0).integers(0, 256, (48, 40), dtype=np.uint8)
clf = pipeline({TASK!r}, model={str(tiny_checkpoint)!r}, trust_remote_code=True)
out = {{"class": type(clf).__name__, "result": clf(image, candidate_labels={LABELS!r}, return_anchors=True)}}
clf.model.save_pretrained({str(tmp_path / "resaved")!r}); clf.processor.save_pretrained({str(tmp_path / "resaved")!r})
again = pipeline({TASK!r}, model={str(tmp_path / "resaved")!r}, trust_remote_code=True, dtype=torch.bfloat16)
out["resaved"] = again(image, candidate_labels={LABELS!r}, multi_label=True)
out["dtype"] = str(again.model.dtype)
print(json.dumps(out))
"""
    out = json.loads(run_python(code).strip().splitlines()[-1])
    assert out["class"] == "LlavaRadZZeroShotImageClassificationPipeline"
    assert out["dtype"] == "torch.bfloat16"
    assert {r["label"]: r["anchor"] for r in out["result"]} == {
        "Cardiomegaly": True, "effusion": True, "pneumonia": False, "pneumothorax": False
    }
    assert len(out["resaved"]) == len(LABELS) and all(0 <= r["score"] <= 1 for r in out["resaved"])

    # The same scores as the package's own classes on the same checkpoint.
    from modeling_llava_radz import LlavaRadZForZeroShotClassification
    from processing_llava_radz import LlavaRadZProcessor

    model = LlavaRadZForZeroShotClassification.from_pretrained(tiny_checkpoint).eval()
    processor = LlavaRadZProcessor.from_pretrained(tiny_checkpoint)
    local = LlavaRadZZeroShotImageClassificationPipeline(model=model, processor=processor, device="cpu")
    expected = local(make_image(0), candidate_labels=LABELS, return_anchors=True)
    assert [r["label"] for r in out["result"]] == [r["label"] for r in expected]
    assert [r["score"] for r in out["result"]] == pytest.approx([r["score"] for r in expected], abs=1e-5)


# -- scores and output format ---------------------------------------------------------------------------------------


def test_single_label_output_is_sorted_softmax_over_labels(clf):
    image = make_image(1)
    result = clf(image, candidate_labels=LABELS, use_knowledge=False)
    assert [set(r) for r in result] == [{"label", "score"}] * len(LABELS)
    assert sorted(r["label"] for r in result) == sorted(LABELS)
    scores = [r["score"] for r in result]
    assert scores == sorted(scores, reverse=True)
    assert sum(scores) == pytest.approx(1.0, abs=1e-5)

    expected = reference_logits(clf.model, clf.processor, image, LABELS).softmax(-1)
    assert {r["label"]: r["score"] for r in result} == pytest.approx(dict(zip(LABELS, expected.tolist())), abs=1e-5)


def test_multi_label_scores_each_label_against_its_negation(clf, tiny_model):
    image = make_image(2)
    multi = clf(image, candidate_labels=LABELS, use_knowledge=False, multi_label=True)
    single = clf(image, candidate_labels=LABELS, use_knowledge=False)
    scores = {r["label"]: r["score"] for r in multi}
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    assert scores != pytest.approx({r["label"]: r["score"] for r in single}, abs=1e-3)

    positive = reference_logits(clf.model, clf.processor, image, LABELS)
    negative = reference_logits(clf.model, clf.processor, image, [f"no {label}" for label in LABELS])
    expected = torch.stack([positive, negative], -1).softmax(-1)[:, 0]
    assert scores == pytest.approx(dict(zip(LABELS, expected.tolist())), abs=1e-5)

    # Options given to the constructor (as `pipeline(..., multi_label=True)` does) become the defaults.
    model, processor = tiny_model
    default_multi = LlavaRadZZeroShotImageClassificationPipeline(
        model=model, processor=processor, device="cpu", multi_label=True, use_knowledge=False
    )
    assert default_multi(image, candidate_labels=LABELS) == multi


def test_a_list_gives_the_image_by_image_results(clf, tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(make_image(3, (70, 90))).save(path)
    images = [make_image(4), Image.fromarray(make_image(5)), str(path)]
    batched = clf(images, candidate_labels=LABELS, batch_size=2)
    assert len(batched) == 3
    for image, result in zip(images, batched):
        alone = clf(image, candidate_labels=LABELS)
        assert [r["label"] for r in result] == [r["label"] for r in alone]
        assert [r["score"] for r in result] == pytest.approx([r["score"] for r in alone], abs=1e-5)
    assert clf([], candidate_labels=LABELS) == []


def test_prompt_ensemble_is_the_normalised_mean_over_templates(clf):
    templates = ["{}", "findings of {}", "the radiograph shows {}"]
    ensemble = clf.label_embeddings(["pneumonia", "pneumothorax"], templates=templates, use_knowledge=False)
    for row, label in enumerate(["pneumonia", "pneumothorax"]):
        with torch.inference_mode():
            features = clf.model.get_text_features(**clf.processor(text=[t.format(label) for t in templates]))
        expected = torch.nn.functional.normalize(features.embeds.mean(0), dim=-1)
        expected_local = torch.nn.functional.normalize(features.local_embeds.mean(0), dim=-1)
        assert torch.allclose(ensemble.embeds[row], expected, atol=1e-5)
        assert torch.allclose(ensemble.local_embeds[row], expected_local, atol=1e-5)
    result = clf(make_image(6), candidate_labels=LABELS, templates=templates, multi_label=True)
    assert all(0.0 <= r["score"] <= 1.0 for r in result)


# -- caching --------------------------------------------------------------------------------------------------------


def test_text_encoder_runs_once_per_label_set_not_per_image(clf, monkeypatch):
    counts = count_calls(monkeypatch, clf.model, "get_text_features")
    images = [make_image(seed) for seed in range(6)]
    clf(images, candidate_labels=LABELS, use_knowledge=False, batch_size=8)
    assert counts == {"calls": 1, "rows": len(LABELS)}  # K prompts in one batch, not N x K

    clf(images + images, candidate_labels=LABELS, use_knowledge=False, batch_size=4)
    assert counts == {"calls": 1, "rows": len(LABELS)}  # same label set: cached

    clf(images[:1], candidate_labels=LABELS, use_knowledge=False, templates=["{}", "a {}"], multi_label=True)
    assert counts["rows"] == len(LABELS) + 2 * 2 * len(LABELS)  # new key: (positive + negative) x 2 templates

    # With knowledge: the anchors' descriptions are encoded once too (two descriptions per known category).
    before = dict(counts)
    clf(images, candidate_labels=LABELS)
    clf(images, candidate_labels=LABELS)
    assert counts["rows"] - before["rows"] == 2 + 2 * 2


def test_knowledge_changes_the_embeddings_of_known_labels_only(clf):
    on = clf.label_embeddings(LABELS, use_knowledge=True)
    off = clf.label_embeddings(LABELS, use_knowledge=False)
    assert on.anchored.tolist() == [True, True, False, False]
    assert not off.anchored.any()
    for row in (0, 1):
        assert not torch.allclose(on.embeds[row], off.embeds[row], atol=1e-3)
    for row in (2, 3):  # the same prompts (in a differently padded batch: equal up to float rounding)
        assert torch.allclose(on.embeds[row], off.embeds[row], atol=1e-6)
        assert torch.allclose(on.local_embeds[row], off.local_embeds[row], atol=1e-6)

    # The anchor is the model's DKAM anchor of the category, compared with the image's global embedding.
    with torch.inference_mode():
        anchors = clf.model.get_anchor_features(**clf.processor.encode_anchors(["Cardiomegaly"]))
        image = clf.model.get_image_features(**clf.processor(images=[make_image(7)]))
        label_template = clf.model.config.label_template
        prompts = clf.model.get_text_features(**clf.processor(text=[label_template.format(t) for t in LABELS[2:]]))
        logits = torch.cat(
        [
                clf.model.scale() * image.embeds @ on.embeds[:2].t(),
                alignment_logits(
                    image.embeds, prompts.embeds, image.local_embeds, prompts.local_embeds, clf.model.scale(),
                    clf.model.config.alignment,
                ),
            ],
            dim=1,
        )[0].softmax(-1).tolist()
    assert torch.allclose(on.embeds[0], anchors[0], atol=1e-6)
    outputs = clf(make_image(7), candidate_labels=LABELS, return_anchors=True)
    result = {r["label"]: (r["score"], r["anchor"]) for r in outputs}
    expected = {label: (pytest.approx(p, abs=1e-5), row < 2) for row, (label, p) in enumerate(zip(LABELS, logits))}
    assert result == expected


def test_generated_knowledge_is_made_once_and_added_to_the_processor(clf, monkeypatch):
    # The untrained model writes gibberish, which parse_descriptions rejects: a fixed answer stands for a real LLM's.
    answer = clf.tokenizer(" pleural line is seen at the apex.\n2. No lung markings lie beyond it.\n",
                           return_tensors="pt")  # fmt: skip
    monkeypatch.setattr(clf.model, "generate", lambda input_ids, **kw: torch.cat([input_ids, answer["input_ids"]], 1))
    generate = count_calls(monkeypatch, clf.model, "generate")
    result = clf(make_image(8), candidate_labels=["Cardiomegaly", "Pneumothorax"], use_knowledge="generate",
                 return_anchors=True)
    assert generate["calls"] == 1  # only the label the knowledge base lacks
    descriptions = clf.processor.knowledge["Pneumothorax"]["descriptions"]
    assert descriptions and clf.generated_descriptions["pneumothorax"] == descriptions
    assert all(r["anchor"] for r in result)

    clf(make_image(9), candidate_labels=["Pneumothorax", "No Finding"], use_knowledge="generate")
    assert generate["calls"] == 1
    alone = clf(make_image(9), candidate_labels=["Pneumothorax"], use_knowledge=False, return_anchors=True)
    assert not alone[0]["anchor"]


def test_parse_descriptions():
    text = "1. A visceral pleural line is visible.\n2. No lung markings beyond it!\n- Deep sulcus sign. ...\n\n"
    assert parse_descriptions(text) == [
        "A visceral pleural line is visible.", "No lung markings beyond it!", "Deep sulcus sign."
    ]
    assert parse_descriptions("  \n ... \n") == []


# -- inputs ---------------------------------------------------------------------------------------------------------


def test_dicom_and_16_bit_png(clf, tmp_path):
    pydicom_data = pytest.importorskip("pydicom.data")
    dicom = pydicom_data.get_testdata_file("RG1_UNCR.dcm", download=False)
    if dicom is None:
        pytest.skip("pydicom-data is not installed")
    png16 = tmp_path / "cxr16.png"
    ramp = np.linspace(0, 65535, 64 * 48).reshape(64, 48).astype(np.uint16)
    Image.fromarray(ramp).save(png16)
    assert Image.open(png16).mode == "I;16"
    results = clf([dicom, str(png16)], candidate_labels=LABELS, multi_label=True)
    assert [len(r) for r in results] == [len(LABELS)] * 2
    assert all(0.0 <= r["score"] <= 1.0 for result in results for r in result)


def test_the_processor_pixel_path_equals_the_image_processor(clf):
    """The pixels of training, evaluation and the pipeline (`processor.pixel_values`) are the image processor's."""
    from processing_llava_radz import load_radiographs

    images = load_radiographs([make_image(10, (512, 300)), make_image(11, (33, 200)), make_image(12, (64, 64, 3))])
    expected = clf.processor.image_processor(images, return_tensors="pt")["pixel_values"]
    assert clf.processor._resize_settings() is not None  # the tiny preset's processor takes the direct path
    assert torch.equal(clf.processor.pixel_values(images), expected)
    assert torch.equal(clf.processor(images=images)["pixel_values"], expected)


@pytest.fixture
def bad_files(tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not an image")
    corrupt_dicom = tmp_path / "bad.dcm"
    corrupt_dicom.write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 20)
    return {"missing": tmp_path / "missing.png", "not_image": not_image, "corrupt_dicom": corrupt_dicom}


@pytest.mark.parametrize(
    ("item", "error", "message"),
    [
        ("missing", ValueError, r"item 1 of the batch: .*missing\.png: file not found"),
        ("not_image", ValueError, r"item 1 of the batch: .*notes\.png: not a readable image file"),
        ("corrupt_dicom", ValueError, r"item 1 of the batch: .*bad\.dcm: corrupt or unreadable DICOM"),
        ("object", TypeError, r"item 1 of the batch: image 1: unsupported image type object"),
    ],
)
def test_bad_images_fail_before_any_model_work(clf, monkeypatch, bad_files, item, error, message):
    image_calls = count_calls(monkeypatch, clf.model, "get_image_features")
    text_calls = count_calls(monkeypatch, clf.model, "get_text_features")
    bad = object() if item == "object" else str(bad_files[item])
    with pytest.raises(error, match=message):
        clf([make_image(0), bad, make_image(1)], candidate_labels=LABELS, batch_size=1)
    assert image_calls["calls"] == text_calls["calls"] == 0


def test_a_single_bad_path_is_named(clf, bad_files):
    with pytest.raises(ValueError, match=r"missing\.png: file not found"):
        clf(str(bad_files["missing"]), candidate_labels=LABELS)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"candidate_labels": []}, ValueError, "candidate_labels is empty"),
        ({}, ValueError, "candidate_labels is missing"),
        ({"candidate_labels": ["Edema", "pneumonia", "Edema"]}, ValueError,
         r"duplicate: 'Edema' \(item 2\) repeats 'Edema' \(item 0\)"),
        ({"candidate_labels": ["Pleural_Effusion", "pleural effusion"]}, ValueError, "duplicate: 'pleural effusion'"),
        ({"candidate_labels": ["Edema", ""]}, ValueError, r"candidate_labels\[1\] is empty"),
        ({"candidate_labels": ["Edema", 3]}, TypeError, r"candidate_labels\[1\]: expected a string"),
        ({"candidate_labels": LABELS, "templates": ["{}", "a chest x-ray"]}, ValueError,
         r"template 'a chest x-ray' must contain '\{\}'"),
        ({"candidate_labels": LABELS, "hypothesis_template": "photo of"}, ValueError,
         r"hypothesis_template 'photo of' must contain"),
        ({"candidate_labels": LABELS, "multi_label": True, "negative_template": "{label} absent"}, ValueError,
         r"negative_template '\{label\} absent' must contain"),
        ({"candidate_labels": LABELS, "templates": ["{}"], "hypothesis_template": "{}"}, ValueError, "not both"),
        ({"candidate_labels": LABELS, "use_knowledge": "yes"}, ValueError, "use_knowledge='yes'"),
        ({"candidate_labels": LABELS, "batch_size": 0}, ValueError, "batch_size must be a positive integer"),
        ({"candidate_labels": LABELS, "top_k": 2}, TypeError, r"unexpected option\(s\) \['top_k'\]"),
    ],
)
def test_bad_options_fail_before_any_model_work(clf, monkeypatch, options, error, message):
    image_calls = count_calls(monkeypatch, clf.model, "get_image_features")
    with pytest.raises(error, match=message):
        clf(make_image(0), **options)
    assert image_calls["calls"] == 0


def test_importing_the_pipeline_leaves_the_task_to_transformers(tiny_checkpoint):
    """`config.custom_pipelines` routes a LLaVA-RadZ checkpoint to this class; nothing is registered at import, so in
    the same process a CLIP model still gets transformers' built-in pipeline."""
    from transformers import (
        CLIPConfig, CLIPImageProcessorPil, CLIPModel, ZeroShotImageClassificationPipeline, pipeline,
    )
    from transformers.pipelines import PIPELINE_REGISTRY

    import pipeline_llava_radz  # noqa: F401

    impl = PIPELINE_REGISTRY.check_task(TASK)[1]["impl"]  # a dotted name: transformers resolves it lazily
    assert str(getattr(impl, "__qualname__", impl)).endswith("ZeroShotImageClassificationPipeline")
    assert "LlavaRadZ" not in str(impl)
    ours = pipeline(TASK, model=str(tiny_checkpoint), trust_remote_code=True)
    assert type(ours).__name__ == "LlavaRadZZeroShotImageClassificationPipeline"

    from radz.presets import build_tokenizer

    tokenizer = build_tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 64,
        },
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    clip = pipeline(TASK, model=CLIPModel(config).eval(), tokenizer=tokenizer, image_processor=image_processor,
                    device="cpu")
    assert type(clip) is ZeroShotImageClassificationPipeline
    result = clip(Image.fromarray(make_image(0)).convert("RGB"), candidate_labels=["a", "b"])
    assert sorted(r["label"] for r in result) == ["a", "b"]
    # and ours still answers in the same process
    assert sorted(r["label"] for r in ours(make_image(0), candidate_labels=LABELS)) == sorted(LABELS)


# -- the task's standard ----------------------------------------------------------------------------------------------


def check_against_the_hub_spec(result):
    """Every element is exactly a `ZeroShotImageClassificationOutputElement` of huggingface_hub: label and score."""
    from dataclasses import fields

    from huggingface_hub import ZeroShotImageClassificationOutputElement as Element

    keys = {field.name for field in fields(Element)}
    assert result and all(set(element) == keys for element in result)
    for element in result:
        parsed = Element(**element)
        assert isinstance(parsed.label, str) and isinstance(parsed.score, float) and 0.0 <= parsed.score <= 1.0


@pytest.mark.parametrize(
    "options",
    [{}, {"multi_label": True}, {"use_knowledge": False}, {"templates": ["{}", "a radiograph of {}"]},
     {"hypothesis_template": "This is a radiograph of {}."}, {"use_knowledge": "generate"}],
)
def test_every_output_element_matches_the_hub_spec(clf, options):
    check_against_the_hub_spec(clf(make_image(20), candidate_labels=LABELS, **options))
    for result in clf([make_image(21), make_image(22)], candidate_labels=LABELS, batch_size=1, **options):
        check_against_the_hub_spec(result)


def test_details_appear_only_when_asked(clf):
    plain = clf(make_image(23), candidate_labels=LABELS)
    detailed = clf(make_image(23), candidate_labels=LABELS, return_anchors=True)
    assert [{"label": r["label"], "score": r["score"]} for r in detailed] == plain
    assert {r["label"]: r["anchor"] for r in detailed} == {
        "Cardiomegaly": True, "effusion": True, "pneumonia": False, "pneumothorax": False
    }
    assert clf(make_image(23), candidate_labels=LABELS, return_anchors=False) == plain
    with pytest.raises(TypeError, match="return_anchors must be True or False"):
        clf(make_image(23), candidate_labels=LABELS, return_anchors="yes")


def test_the_built_in_pipeline_arguments_work(tiny_model, monkeypatch):
    """`images=`, `hypothesis_template`, `batch_size` (per call and per pipeline), `device`, `timeout` and
    `tokenizer_kwargs`, as transformers' own zero-shot image pipeline takes them."""
    model, processor = tiny_model
    clf = LlavaRadZZeroShotImageClassificationPipeline(model=model.eval(), processor=processor, device="cpu",
                                                       batch_size=2)
    assert clf.device == torch.device("cpu")
    images = [make_image(seed) for seed in range(5)]
    calls = count_calls(monkeypatch, clf.model, "get_image_features")
    by_keyword = clf(images=images, candidate_labels=LABELS, hypothesis_template="a radiograph of {}", timeout=3.0)
    assert calls == {"calls": 3, "rows": 5}  # the pipeline's batch_size=2: batches of 2, 2 and 1 images
    at_once = clf(images, candidate_labels=LABELS, templates=["a radiograph of {}"], batch_size=5)
    assert [[r["label"] for r in result] for result in by_keyword] == [
        [r["label"] for r in result] for result in at_once
    ]
    assert [r["score"] for result in by_keyword for r in result] == pytest.approx(
        [r["score"] for result in at_once for r in result], abs=1e-5)
    assert calls["calls"] == 4
    # padding changes no score; max_length is the label prompts' token limit; truncation=False refuses longer ones.
    long_label = "pneumonia in the right lower lobe with air bronchograms"
    labels = ["Cardiomegaly", long_label]
    default = clf(images[0], candidate_labels=labels, use_knowledge=False)
    assert clf(images[0], candidate_labels=labels, use_knowledge=False,
               tokenizer_kwargs={"padding": "max_length"}) == default
    short = clf(images[0], candidate_labels=labels, use_knowledge=False, tokenizer_kwargs={"max_length": 3})
    processor.max_text_tokens = 3
    expected = LlavaRadZZeroShotImageClassificationPipeline(model=model, processor=processor, device="cpu")(
        images[0], candidate_labels=labels, use_knowledge=False)
    processor.max_text_tokens = 128
    assert [r["label"] for r in short] == [r["label"] for r in expected]
    assert [r["score"] for r in short] == pytest.approx([r["score"] for r in expected], abs=1e-6)
    assert {r["label"]: r["score"] for r in short} != pytest.approx({r["label"]: r["score"] for r in default})
    with pytest.raises(ValueError, match=r"over max_length=3, and tokenizer_kwargs has truncation=False"):
        clf(images[0], candidate_labels=labels, use_knowledge=False,
            tokenizer_kwargs={"max_length": 3, "truncation": False})
    with pytest.raises(TypeError, match=r"tokenizer_kwargs: unsupported key\(s\) \['return_tensors'\]"):
        clf(images[0], candidate_labels=labels, tokenizer_kwargs={"return_tensors": "np"})


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server over `tmp_path` (no network needed); `/slow` answers after 3 s."""
    import threading
    import time
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/slow":
                time.sleep(3)
            return super().do_GET()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_urls_are_fetched_with_the_timeout(clf, tmp_path, http_server):
    Image.fromarray(make_image(30, (64, 48))).save(tmp_path / "cxr.png")
    pydicom_data = pytest.importorskip("pydicom.data")
    dicom = pydicom_data.get_testdata_file("RG1_UNCR.dcm", download=False)
    shutil.copy(dicom, tmp_path / "study.dcm")
    from_url = clf([f"{http_server}/cxr.png", f"{http_server}/study.dcm"], candidate_labels=LABELS, timeout=10)
    assert from_url == clf([str(tmp_path / "cxr.png"), dicom], candidate_labels=LABELS)
    with pytest.raises(ValueError, match=r"/slow: could not be fetched \(.*timed out"):
        clf(f"{http_server}/slow", candidate_labels=LABELS, timeout=0.5)
    missing = r"item 1 of the batch: .*/missing\.png: could not be fetched \(HTTP Error 404"
    with pytest.raises(ValueError, match=missing):
        clf([f"{http_server}/cxr.png", f"{http_server}/missing.png"], candidate_labels=LABELS)
