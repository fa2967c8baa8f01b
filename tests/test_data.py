"""radz/training/data.py: training reads its tables through radz.datasets, so one CSV trains and evaluates alike."""

import json

import numpy as np
import pandas as pd
from PIL import Image

import evaluate_radz
import train_radz
from conftest import TINY_KNOWLEDGE
from radz.datasets import LABEL_CODES, load_split
from radz.training import DataArguments, load_training_data

LABELS = ["Pleural Effusion", "Cardiomegaly"]
# CheXpert-style codes as they come in one's own CSV: 1, 0, -1 (uncertain) and blank, in every column.
CODES = [("1", "0"), ("0", "-1"), ("-1", ""), ("", "1"), ("1.0", "0.0"), ("0", "1"), ("1", "-1.0"), ("0", "0")]


def write_csv(directory) -> str:
    rng = np.random.default_rng(0)
    rows = []
    for index, (effusion, cardiomegaly) in enumerate(CODES):
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(directory / f"{index}.png")
        rows.append(f"{index}.png,report number {index} of the lungs,{effusion},{cardiomegaly}")
    path = directory / "mine.csv"
    path.write_text("image,report," + ",".join(LABELS) + "\n" + "\n".join(rows) + "\n")
    return str(path)


def test_a_csv_with_uncertain_labels_trains_and_evaluates(tmp_path):
    csv = write_csv(tmp_path)
    expected = np.array([[LABEL_CODES[code] for code in row] for row in CODES], dtype=np.float32)
    # The same labels on both paths: -1 and blank are unknown (NaN), not errors and not negatives.
    train, names = load_training_data(DataArguments(train_file=csv, label_columns=",".join(LABELS)), "train")
    assert names == LABELS and train.column_names == ["image", "report", "labels"]
    np.testing.assert_array_equal(np.array(train["labels"], dtype=np.float32), expected)
    evaluated = load_split("generic", csv, split="test", labels=LABELS)
    np.testing.assert_array_equal(np.array(evaluated["labels"], dtype=np.float32), expected)
    assert evaluated["image"] == train["image"]

    knowledge = tmp_path / "knowledge.json"
    knowledge.write_text(json.dumps(TINY_KNOWLEDGE))
    model_dir = tmp_path / "model"
    status = train_radz.main([
        "--config", "tiny", "--train_file", csv, "--label_columns", ",".join(LABELS), "--knowledge", str(knowledge),
        "--output_dir", str(model_dir), "--max_steps", "2", "--per_device_train_batch_size", "4", "--lora_r", "4",
        "--use_cpu", "--dataloader_pin_memory", "False", "--report_to", "none", "--save_strategy", "no",
    ])  # fmt: skip
    assert status == 0 and (model_dir / "model.safetensors").is_file()

    out = tmp_path / "eval"
    record = evaluate_radz.main([
        "--model", str(model_dir), "--dataset", "generic", "--data_dir", csv, "--labels", ",".join(LABELS),
        "--threshold_protocol", "fixed", "--output_dir", str(out), "--batch_size", "4",
    ])  # fmt: skip
    assert record["n_images"] == len(CODES) and record["label_names"] == LABELS
    predictions = pd.read_parquet(out / "predictions.parquet")
    assert len(predictions) == len(CODES) and predictions[[f"score:{label}" for label in LABELS]].notna().all().all()
    # Each column has both known labels, so its AUC is defined: the NaN labels are left out, not counted as 0.
    for label in LABELS:
        assert 0.0 <= record["metrics"]["per_class"][label]["auc"] <= 1.0


def test_a_saved_dataset_trains_with_the_labels_its_reader_named(tmp_path):
    import datasets

    csv = write_csv(tmp_path)
    read = load_split("generic", csv, split="test", labels=LABELS)
    datasets.DatasetDict({"train": read, "validation": read.select([0, 1])}).save_to_disk(str(tmp_path / "saved"))
    args = DataArguments(dataset_dir=str(tmp_path / "saved"), validation_split="validation")
    train, names = load_training_data(args, "train")
    validation, validation_names = load_training_data(args, "validation")
    assert names == validation_names == LABELS and train["image"] == read["image"]
    np.testing.assert_array_equal(np.array(train["labels"], dtype=np.float32), np.array(read["labels"], np.float32))
    assert validation["image"] == read["image"][:2]
    with np.testing.assert_raises_regex(ValueError, "no split 'test'; it has \\['train', 'validation'\\]"):
        load_training_data(DataArguments(dataset_dir=str(tmp_path / "saved"), validation_split="test"), "validation")
