"""One zero-shot classifier (zero_shot_llava_radz.py) behind the pipeline, `RadZTrainer.evaluate` and the harness."""

import json
import re

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_python
from modeling_llava_radz import LlavaRadZForZeroShotClassification
from pipeline_llava_radz import LlavaRadZZeroShotImageClassificationPipeline
from processing_llava_radz import LlavaRadZProcessor
from radz.evaluation.methods import RadZScorer
from radz.training import RadZTrainer, RadZTrainingArguments
from radz.training.trainer import mean_auc, zero_shot_scores
from zero_shot_llava_radz import build_zero_shot_classifier

TASK = "zero-shot-image-classification"
LABELS = ["Cardiomegaly", "effusion", "Pneumothorax", "Edema"]  # the first two in TINY_KNOWLEDGE (one by synonym)
ANCHORED = [True, True, False, False]
BATCH = 4
SHAPES = [(48, 40), (70, 90), (32, 32), (64, 50), (40, 40), (90, 60)]
# Both classes in every column, and one unknown entry.
TARGETS = np.array([[(row + col) % 2 for col in range(len(LABELS))] for row in range(len(SHAPES))], dtype=np.float32)
TARGETS[0, 3] = np.nan


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    directory = tmp_path_factory.mktemp("zero_shot_images")
    paths = []
    for index, shape in enumerate(SHAPES):
        pixels = np.random.default_rng(index).integers(0, 80, shape, dtype=np.uint8)
        pixels[shape[0] // 4 : shape[0] // 2, : shape[1] // (index % 3 + 1)] += 150
        paths.append(str(directory / f"image-{index}.png"))
        Image.fromarray(pixels).save(paths[-1])
    return paths


@pytest.fixture
def loaded(tiny_checkpoint):
    model = LlavaRadZForZeroShotClassification.from_pretrained(tiny_checkpoint).eval()
    return model, LlavaRadZProcessor.from_pretrained(tiny_checkpoint)


def score_matrix(results) -> np.ndarray:
    """Pipeline results (a ranked list per image) → `[N, K]` scores in the order of LABELS."""
    return np.array([[next(r["score"] for r in ranked if r["label"] == k) for k in LABELS] for ranked in results])


@pytest.mark.parametrize(("multi_label", "use_knowledge"), [(False, True), (True, True), (False, False)])
def test_pipeline_evaluate_and_harness_give_the_same_scores(
    tiny_checkpoint, loaded, images, tmp_path, multi_label, use_knowledge
):
    model, processor = loaded
    clf = LlavaRadZZeroShotImageClassificationPipeline(model=model, processor=processor, device="cpu")
    options = {"multi_label": multi_label, "use_knowledge": use_knowledge, "batch_size": BATCH, "return_anchors": True}
    results = clf(images, candidate_labels=LABELS, **options)
    piped = score_matrix(results)
    anchored = ANCHORED if use_knowledge else [False] * len(LABELS)
    assert [next(r["anchor"] for r in results[0] if r["label"] == label) for label in LABELS] == anchored
    if not multi_label:
        np.testing.assert_allclose(piped.sum(axis=1), 1.0, atol=1e-6)

    dataset = datasets.Dataset.from_dict({"image": images, "report": [""] * len(images), "labels": TARGETS.tolist()})
    trained, targets = zero_shot_scores(
        model, processor, dataset, LABELS, BATCH, use_knowledge=use_knowledge, multi_label=multi_label
    )
    np.testing.assert_allclose(trained, piped, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(targets, TARGETS)

    scorer = RadZScorer(str(tiny_checkpoint), multi_label, use_knowledge, batch_size=BATCH, device="cpu")
    np.testing.assert_allclose(scorer.score(images, LABELS), piped, rtol=0, atol=1e-6)
    assert sorted(scorer.summary()["anchored_labels"]) == sorted(label for label, a in zip(LABELS, anchored) if a)

    # RadZTrainer.evaluate reports the AUCs of exactly these scores.
    args = RadZTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_eval_batch_size=BATCH,
        eval_multi_label=multi_label, eval_use_knowledge=use_knowledge,
    )  # fmt: skip
    trainer = RadZTrainer(model=model, args=args, processing_class=processor, eval_label_names=LABELS)
    metrics = trainer.evaluate(dataset)
    expected = mean_auc(piped, TARGETS, LABELS)
    assert {key: metrics[f"eval_{key}"] for key in expected} == pytest.approx(expected, abs=1e-6)  # float32 broadcast


def test_classifier_logits_and_probabilities(loaded, images):
    model, processor = loaded
    with torch.no_grad():
        image = model.get_image_features(**processor(images=images[:3]))
        single = build_zero_shot_classifier(model, processor, LABELS)
        multi = build_zero_shot_classifier(model, processor, LABELS, multi_label=True)
        anchor = model.get_anchor_features(**processor.encode_anchors(["Cardiomegaly"]))[0]
    assert single.anchored.tolist() == ANCHORED and not single.multi_label and multi.multi_label
    assert single.logits(image).shape == (3, len(LABELS)) and multi.logits(image).shape == (3, len(LABELS), 2)
    torch.testing.assert_close(single.probabilities(image), single.logits(image).softmax(-1))
    torch.testing.assert_close(multi.probabilities(image), multi.logits(image).softmax(-1)[..., 0])
    # An anchored label: the model's scale times image-global · anchor; its negation is a prompt, "no Cardiomegaly".
    torch.testing.assert_close(single.logits(image)[:, 0], model.scale() * image.embeds @ anchor)
    torch.testing.assert_close(multi.logits(image)[..., 0], single.logits(image))


def test_checkpoints_and_the_pipeline_save_carry_the_classifier(tiny_checkpoint, loaded, images, tmp_path):
    """The model's and the pipeline's save both hold zero_shot_llava_radz.py; a fresh process outside the repo loads
    the pipeline's folder and scores as this process does."""
    assert (tiny_checkpoint / "zero_shot_llava_radz.py").is_file()
    model, processor = loaded
    clf = LlavaRadZZeroShotImageClassificationPipeline(model=model, processor=processor, device="cpu")
    saved = tmp_path / "saved_pipeline"
    clf.save_pretrained(saved)
    for name in ("zero_shot_llava_radz.py", "pipeline_llava_radz.py", "knowledge.json", "processor_config.json"):
        assert (saved / name).is_file(), name
    code = f"""
import json
from transformers import pipeline
clf = pipeline({TASK!r}, model={str(saved)!r}, trust_remote_code=True)
print(json.dumps(clf({images[:2]!r}, candidate_labels={LABELS!r}, multi_label=True, return_anchors=True)))
"""
    fresh = json.loads(run_python(code).strip().splitlines()[-1])
    expected = clf(images[:2], candidate_labels=LABELS, multi_label=True, return_anchors=True)
    np.testing.assert_allclose(score_matrix(fresh), score_matrix(expected), rtol=0, atol=1e-6)
    assert [[r["anchor"] for r in ranked] for ranked in fresh] == [[r["anchor"] for r in ranked] for ranked in expected]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"candidate_labels": ["<TxtCls_0> Edema", "Pneumothorax"]},
         "label '<TxtCls_0> Edema' holds the special token '<TxtCls_0>'"),
        ({"candidate_labels": ["Edema", "<image>"]}, "label '<image>' holds the special token '<image>'"),
        ({"candidate_labels": ["Edema </s>"], "use_knowledge": False}, "label 'Edema </s>' holds the special token"),
        ({"candidate_labels": ["Edema"], "templates": ["{}", "{} <ImgCls_1>"]}, "template '{} <ImgCls_1>' holds"),
        ({"candidate_labels": ["Edema"], "multi_label": True, "negative_template": "<s> no {}"}, "template '<s> no"),
    ],
)  # fmt: skip
def test_special_tokens_in_user_text_are_an_error_naming_it(loaded, images, monkeypatch, options, message):
    model, processor = loaded
    clf = LlavaRadZZeroShotImageClassificationPipeline(model=model, processor=processor, device="cpu")
    calls = []
    monkeypatch.setattr(model, "get_text_features", lambda *args, **kwargs: calls.append(args))
    with pytest.raises(ValueError, match=re.escape(message)):
        clf(images[0], **options)
    assert calls == []


def test_evaluate_rejects_a_label_with_special_tokens(loaded, images):
    model, processor = loaded
    dataset = datasets.Dataset.from_dict({"image": images[:2], "report": ["", ""], "labels": [[1.0], [0.0]]})
    with pytest.raises(ValueError, match="label '<TxtCls_3>' holds the special token"):
        zero_shot_scores(model, processor, dataset, ["<TxtCls_3>"], BATCH)


@pytest.mark.parametrize(("label", "expected"), [
    ("Cardiomegaly", "no Cardiomegaly"), ("Nodule", "no Nodule"), ("No Finding", "Finding"),
    ("no acute cardiopulmonary process", "acute cardiopulmonary process"), ("No", "no No"),
])  # fmt: skip
def test_a_negated_label_is_negated_by_dropping_its_no(label, expected):
    from zero_shot_llava_radz import negation

    assert negation(label) == expected


def test_the_multi_label_classifier_embeds_each_labels_negation(loaded):
    from zero_shot_llava_radz import _encode_prompts

    model, processor = loaded
    labels = ["No Finding", "Edema"]
    classifier = build_zero_shot_classifier(model, processor, labels, multi_label=True, use_knowledge=False)
    expected, _ = _encode_prompts(model, processor, ["Finding", "no Edema"], (model.config.label_template,), 8)
    torch.testing.assert_close(classifier.negative_embeds, expected)


def test_a_negative_without_placeholder_is_one_reference_for_every_label(loaded, images):
    """`negative_template="No Finding"`: each finding against a normal study, and "No Finding" against "Finding"."""
    from zero_shot_llava_radz import _encode_prompts

    model, processor = loaded
    labels = ["Edema", "Nodule", "No Finding"]
    classifier = build_zero_shot_classifier(
        model, processor, labels, multi_label=True, use_knowledge=False, negative_template="No Finding"
    )
    expected, _ = _encode_prompts(model, processor, ["No Finding", "No Finding", "Finding"],
                                  (model.config.label_template,), 8)
    torch.testing.assert_close(classifier.negative_embeds, expected)
    clf = LlavaRadZZeroShotImageClassificationPipeline(model=model, processor=processor, device="cpu")
    shared = clf(images[:2], candidate_labels=labels, multi_label=True, use_knowledge=False,
                 negative_template="No Finding")
    negated = clf(images[:2], candidate_labels=labels, multi_label=True, use_knowledge=False)
    assert {r["label"]: r["score"] for r in shared[0]}["No Finding"] == pytest.approx(
        {r["label"]: r["score"] for r in negated[0]}["No Finding"], abs=1e-6)  # "Finding" either way
    assert {r["label"]: r["score"] for r in shared[0]}["Edema"] != pytest.approx(
        {r["label"]: r["score"] for r in negated[0]}["Edema"], abs=1e-6)
