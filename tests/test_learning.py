"""The classifier learns: a tiny LLaVA-RadZ trained on SYNTHETIC phantoms with the demo's recipe (label-free tower
stage, then DFAT + DKAM) must classify clearly visible findings zero-shot well above chance, scored through the
shipped pipeline. A change that breaks learning anywhere (tower, readout, heads, losses, anchors, scorer) fails here,
although every shape test would stay green."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import train_radz
from radz.phantom import PHANTOM_LABELS, write_phantom_dataset
from radz.presets import DEMO_TRAINING, training_flags

# The findings that a 64-px phantom shows clearly (an enlarged heart, bilateral haziness, a normal chest).
VISIBLE = ["Cardiomegaly", "Edema", "No Finding"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    write_phantom_dataset(root / "data", n_train=480, n_validation=4, n_test=160, size=64, seed=0)
    preset = root / "preset.json"
    preset.write_text(json.dumps({"preset": "tiny", "vision": "conv", "image_size": 64}))
    recipe = {
        **DEMO_TRAINING,
        "tower_pretraining_steps": 150,
        "max_steps": 200,
        "learning_rate": 3e-3,
        "vision_learning_rate": 1e-3,
        "lora_r": 8,
    }
    argv = [
        "--config", str(preset), "--knowledge", "phantom",
        "--train_file", str(root / "data" / "train.jsonl"), "--label_columns", ",".join(PHANTOM_LABELS),
        "--output_dir", str(root / "model"), "--save_strategy", "no", "--logging_steps", "20",
        "--report_to", "none", "--dataloader_pin_memory", "False", "--use_cpu", "True", "--seed", "0",
        *training_flags(recipe),
    ]
    assert train_radz.main(argv) == 0
    return root


def test_a_tiny_model_learns_visible_findings_zero_shot(trained):
    from transformers import pipeline

    rows = [json.loads(line) for line in (trained / "data" / "test.jsonl").read_text().splitlines()]
    images = [str(trained / "data" / row["image"]) for row in rows]
    classifier = pipeline("zero-shot-image-classification", model=str(trained / "model"), trust_remote_code=True)
    results = classifier(images, candidate_labels=PHANTOM_LABELS, batch_size=32)
    scores = np.array([[{r["label"]: r["score"] for r in result}[label] for label in PHANTOM_LABELS] for result in results])
    auc = {label: roc_auc_score([row[label] for row in rows], scores[:, k]) for k, label in enumerate(PHANTOM_LABELS)}
    assert all(auc[label] >= 0.75 for label in VISIBLE), auc
    assert np.mean(list(auc.values())) >= 0.65, auc  # chance is 0.5

    history = json.loads((trained / "model" / "trainer_state.json").read_text())["log_history"]
    alignment = [entry["loss_alignment"] for entry in history if "loss_alignment" in entry]
    assert alignment[-1] < alignment[0] - 0.3, alignment
    tower = json.loads((trained / "model" / "tower_pretraining.json").read_text())
    assert tower[-1]["loss"] < tower[0]["loss"], tower


def test_no_finding_is_not_inverted_by_its_negation(trained):
    """Multi-label without anchors scores each label against its negation. "no No Finding" read as a normal study
    and inverted the label (AUC 0.00 on the demo model); a negated label is scored against "Finding" instead."""
    from transformers import pipeline

    rows = [json.loads(line) for line in (trained / "data" / "test.jsonl").read_text().splitlines()]
    images = [str(trained / "data" / row["image"]) for row in rows]
    classifier = pipeline("zero-shot-image-classification", model=str(trained / "model"), trust_remote_code=True)
    results = classifier(images, candidate_labels=["No Finding"], multi_label=True, use_knowledge=False, batch_size=32)
    scores = [result[0]["score"] for result in results]
    auc = roc_auc_score([row["No Finding"] for row in rows], scores)
    assert auc >= 0.75, auc  # measured 0.86; 0.14 with "no No Finding"
