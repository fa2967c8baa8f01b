"""The evaluation harness (evaluate_radz.py), the baselines and examples/compare_methods.py, on a tiny checkpoint.

Fixtures are tiny: a phantom set of 64-px images (12 train / 8 validation / 12 test), a CheXpert valid.csv with
uncertain labels and a knee KL folder tree, all written in tmp directories. Metric values themselves are checked
against scikit-learn in test_metrics.py; here the checks are on protocols, bookkeeping and files.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from safetensors.numpy import load_file

import evaluate_radz
from radz.baselines import parse_answer, select_rows, vqa_training_items
from radz.baselines.vqa import answer_metrics
from radz.datasets import DATASETS
from radz.phantom import PHANTOM_LABELS, write_phantom_dataset

REPO = Path(__file__).resolve().parents[1]
TWO_LABELS = "Pneumothorax,No Finding"


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(directory, n_train=12, n_validation=8, n_test=12, size=64, seed=0)
    return directory


def run(checkpoint, data_dir, out, *extra, dataset="generic"):
    argv = ["--model", str(checkpoint), "--dataset", dataset, "--data_dir", str(data_dir), "--output_dir", str(out),
            "--batch_size", "4", "--chunk_size", "4", *extra]
    return evaluate_radz.main(argv)


def metrics_json(out) -> dict:
    return json.loads((Path(out) / "metrics.json").read_text())


def chunk_files(out, split="test") -> list[Path]:
    return sorted((Path(out) / "chunks").glob(f"{split}-*/chunk_*.parquet"))


# -- threshold protocols ---------------------------------------------------------------------------------------------


def test_validation_thresholds_never_read_test_labels(tiny_checkpoint, phantom_dir, tmp_path):
    """Same images, test labels swapped: the validation-protocol thresholds are identical (the AUCs are not), while
    the oracle's thresholds follow the test labels."""
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    shutil.copy(phantom_dir / "label_names.json", swapped)
    for split in ("validation", "test"):
        rows = [json.loads(line) for line in (phantom_dir / f"{split}.jsonl").read_text().splitlines()]
        for row in rows:
            row["image"] = str(phantom_dir / row["image"])
            if split == "test":
                row["Pneumothorax"], row["No Finding"] = 1 - row["Pneumothorax"], 1 - row["No Finding"]
        (swapped / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    results = {}
    for name, data in (("original", phantom_dir), ("swapped", swapped)):
        for protocol in ("validation", "oracle"):
            run(tiny_checkpoint, data, tmp_path / name, "--labels", TWO_LABELS, "--threshold_protocol", protocol)
            record = metrics_json(tmp_path / name)
            block = record["metrics_oracle"] if protocol == "oracle" else record["metrics"]
            results[name, protocol] = block
    thresholds = {
        key: [block["per_class"][label]["threshold"] for label in TWO_LABELS.split(",")]
        for key, block in results.items()
    }
    assert thresholds["original", "validation"] == thresholds["swapped", "validation"]
    assert results["original", "validation"]["per_class"]["No Finding"]["auc"] == pytest.approx(
        1 - results["swapped", "validation"]["per_class"]["No Finding"]["auc"]
    )
    assert thresholds["original", "oracle"] != thresholds["swapped", "oracle"]
    assert results["original", "validation"]["threshold_protocol"].startswith("validation")


def test_oracle_is_labelled_in_every_output(tiny_checkpoint, phantom_dir, tmp_path, capsys):
    run(tiny_checkpoint, phantom_dir, tmp_path, "--labels", TWO_LABELS, "--threshold_protocol", "oracle",
        "--bootstrap", "30")
    record = metrics_json(tmp_path)
    assert record["oracle"] is True and "metrics" not in record
    oracle = record["metrics_oracle"]
    low, high = oracle["auc_macro_ci"]
    assert low <= oracle["auc_macro"] <= high and oracle["bootstrap"]["n_boot"] == 30
    assert record["metrics_oracle"]["threshold_protocol"] == "oracle (best F1 on test labels)"
    assert "test labels" in record["oracle_warning"]
    headings = [line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("#")]
    assert headings and all("ORACLE" in line for line in headings)
    assert "ORACLE: thresholds chosen on the test labels" in capsys.readouterr().out


def test_missing_validation_split_is_an_error_not_a_silent_fallback(tiny_checkpoint, phantom_dir, tmp_path, capsys):
    no_validation = tmp_path / "data"
    no_validation.mkdir()
    for name in ("test.jsonl", "label_names.json"):
        shutil.copy(phantom_dir / name, no_validation)
    (no_validation / "images").symlink_to(phantom_dir / "images")
    with pytest.raises(SystemExit) as error:
        run(tiny_checkpoint, no_validation, tmp_path / "out", "--labels", TWO_LABELS)
    assert error.value.code == 2
    message = capsys.readouterr().err
    assert "validation split 'validation' cannot be read" in message and "--threshold_protocol fixed" in message
    assert not (tmp_path / "out" / "metrics.json").exists()
    # Asked for explicitly, the fixed protocol runs.
    run(tiny_checkpoint, no_validation, tmp_path / "out", "--labels", TWO_LABELS, "--threshold_protocol", "fixed")
    record = metrics_json(tmp_path / "out")
    assert record["threshold_protocol"] == "fixed-0.5" and record["oracle"] is False
    assert record["metrics"]["per_class"]["Pneumothorax"]["threshold"] == 0.5


# -- resume -----------------------------------------------------------------------------------------------------------


def test_interrupted_run_resumes_to_identical_predictions(tiny_checkpoint, phantom_dir, tmp_path):
    common = ("--labels", TWO_LABELS, "--threshold_protocol", "fixed")
    run(tiny_checkpoint, phantom_dir, tmp_path / "fresh", *common)
    fresh = pd.read_parquet(tmp_path / "fresh" / "predictions.parquet")
    assert len(fresh) == 12 and list(fresh.columns) == ["image", "score:Pneumothorax", "score:No Finding"]

    # "Crash" after two of three chunks (--limit 8), then rerun the whole split.
    out = tmp_path / "resumed"
    run(tiny_checkpoint, phantom_dir, out, *common, "--limit", "8")
    first = {path.name: path.stat().st_mtime_ns for path in chunk_files(out)}
    assert sorted(first) == ["chunk_00000.parquet", "chunk_00001.parquet"]
    record = run(tiny_checkpoint, phantom_dir, out, *common)
    assert record["compute"]["images_resumed"] == 8 and record["compute"]["images_scored"] == 4
    assert {p.name: p.stat().st_mtime_ns for p in chunk_files(out)[:2]} == first  # not recomputed
    pd.testing.assert_frame_equal(pd.read_parquet(out / "predictions.parquet"), fresh)

    # A lost last chunk is recomputed, identically.
    chunk_files(out)[-1].unlink()
    record = run(tiny_checkpoint, phantom_dir, out, *common)
    assert record["compute"]["images_scored"] == 4
    pd.testing.assert_frame_equal(pd.read_parquet(out / "predictions.parquet"), fresh)

    # A changed setting never reuses those chunks.
    record = run(tiny_checkpoint, phantom_dir, out, *common, "--no_knowledge")
    assert record["compute"]["images_resumed"] == 0 and len({p.parent for p in chunk_files(out)}) == 2
    assert record["settings"]["use_knowledge"] is False


# -- methods end to end -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["radz", "vqa", "vision_probe", "sft"])
def test_each_method_runs_end_to_end(method, tiny_checkpoint, phantom_dir, tmp_path):
    extra = {"vision_probe": ["--shots", "4"], "sft": ["--sft_steps", "2", "--balance_classes",
                                                         "--sft_learning_rate", "0.01"]}.get(method, [])
    run(tiny_checkpoint, phantom_dir, tmp_path, "--method", method, "--labels", TWO_LABELS, "--limit", "6",
        *extra)
    for name in ("predictions.parquet", "metrics.json", "report.md", "roc_curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert Image.open(tmp_path / "roc_curves.png").format == "PNG"
    predictions = pd.read_parquet(tmp_path / "predictions.parquet")
    test_rows = [json.loads(line) for line in (phantom_dir / "test.jsonl").read_text().splitlines()][:6]
    assert predictions["image"].tolist() == [str(phantom_dir / row["image"]) for row in test_rows]
    scores = predictions[["score:Pneumothorax", "score:No Finding"]].to_numpy()
    assert np.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()

    saved = metrics_json(tmp_path)
    assert saved["method"] == method and saved["validation_split"] == "validation" and saved["n_images"] == 6
    metrics = saved["metrics"]
    assert metrics["label_names"] == ["Pneumothorax", "No Finding"]
    assert metrics["per_class"]["No Finding"]["n_valid"] == 6
    assert saved["compute"]["images_scored"] == 12 and saved["compute"]["peak_rss_mib"] > 0
    assert saved["compute"]["images_per_second"] > 0
    report = (tmp_path / "report.md").read_text()
    assert "| Pneumothorax |" in report and "images/s" in report and "validation (best F1" in report

    if method in ("vqa", "sft"):
        answers = saved["generated_answers"]
        assert set(answers["per_label"]) == {"Pneumothorax", "No Finding"}
        assert 0.0 <= answers["parsed_rate_macro"] <= 1.0
        assert {"answer:Pneumothorax", "answer:No Finding"} <= set(predictions.columns)
    if method == "vision_probe":
        weights = load_file(str(tmp_path / "vision_probe.safetensors"))
        assert weights["coef"].shape == (2, 32) and weights["intercept"].shape == (2,)
        train = pd.read_json(phantom_dir / "train.jsonl", lines=True)
        expected = {
            name: int(min(4, train[name].sum()) + min(4, (1 - train[name]).sum())) for name in ("Pneumothorax", "No Finding")
        }
        assert saved["method_summary"]["probe_training_images"] == expected  # --shots 4 per class and label
    if method == "sft":
        adapter = Path(saved["method_summary"]["sft_adapter"])
        lora = load_file(str(adapter / "adapter_model.safetensors"))
        b_weights = [value for key, value in lora.items() if "lora_B" in key]
        assert b_weights and any(np.abs(value).max() > 0 for value in b_weights)  # trained, not the zero init
        assert not any("vision_tower" in key for key in lora)
        assert saved["method_summary"]["sft_training_questions"] > 0
    if method == "radz":
        assert saved["settings"]["multi_label"] is True
        assert saved["method_summary"]["anchored_labels"] == ["No Finding"]  # in TINY_KNOWLEDGE


def test_vqa_scores_a_plain_llava_checkpoint(tiny_model, phantom_dir, tmp_path):
    """A transformers LLaVA directory (no LLaVA-RadZ parts) works with the baselines; radz refuses it clearly."""
    from transformers import LlavaProcessor

    model, processor = tiny_model
    llava_dir = tmp_path / "llava"
    model.llava.save_pretrained(llava_dir)
    LlavaProcessor(
        image_processor=processor.image_processor, tokenizer=processor.tokenizer, patch_size=8,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    ).save_pretrained(llava_dir)
    config = json.loads((llava_dir / "config.json").read_text())
    config["model_type"] = "llava"
    config.pop("auto_map", None)
    (llava_dir / "config.json").write_text(json.dumps(config))

    run(llava_dir, phantom_dir, tmp_path / "vqa", "--method", "vqa", "--labels", "No Finding", "--limit", "4")
    assert metrics_json(tmp_path / "vqa")["task"] == "binary"
    with pytest.raises(SystemExit):
        run(llava_dir, phantom_dir, tmp_path / "radz", "--labels", "No Finding", "--limit", "4")


# -- datasets: CheXpert uncertain labels, knee KL grades -------------------------------------------------------------

CHEXPERT_HEADER = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(DATASETS["chexpert"].label_names)


def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 40), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def chexpert_dir(tmp_path):
    """CheXpert-v1.0-small/valid.csv: Cardiomegaly 1, 0, -1, -1, blank, 1; Edema -1 on the first row only."""
    root = tmp_path / "CheXpert-v1.0-small"
    column = {name: i for i, name in enumerate(DATASETS["chexpert"].label_names)}
    cardiomegaly = ["1.0", "0.0", "-1.0", "-1.0", "", "1.0"]
    lines = [CHEXPERT_HEADER]
    for row, value in enumerate(cardiomegaly):
        values = [""] * len(column)
        values[column["Cardiomegaly"]] = value
        values[column["Edema"]] = "-1.0" if row == 0 else "0.0"
        path = f"valid/patient{row:05d}/study1/view1_frontal.jpg"
        write_image(root / path, row)
        lines.append(f"CheXpert-v1.0-small/{path},Female,60,Frontal,AP," + ",".join(values))
    root.mkdir(exist_ok=True)
    (root / "valid.csv").write_text("\n".join(lines) + "\n")
    return root


def test_chexpert_uncertain_policy_reaches_the_metrics(tiny_checkpoint, chexpert_dir, tmp_path, capsys):
    counts = {}
    for policy in ("ones", "zeros", "ignore"):
        run(tiny_checkpoint, chexpert_dir, tmp_path, "--split", "valid", "--labels",
            "Cardiomegaly,Edema", "--uncertain", policy, "--threshold_protocol", "fixed", dataset="chexpert")
        per_class = metrics_json(tmp_path)["metrics"]["per_class"]
        counts[policy] = {name: (m["n_pos"], m["n_valid"]) for name, m in per_class.items()}
    assert counts["ones"]["Cardiomegaly"] == (4, 6)  # -1 → 1; blank → 0
    assert counts["zeros"]["Cardiomegaly"] == (2, 6)
    assert counts["ignore"]["Cardiomegaly"] == (2, 4)  # the two uncertain rows leave the metric
    assert counts["ignore"]["Edema"] == (0, 5) and counts["ones"]["Edema"] == (1, 6)
    assert len({p.parent for p in chunk_files(tmp_path, "valid")}) == 3  # the policy is part of the chunk key

    # CheXpert's only other split is valid itself: the validation protocol must refuse, not pick test labels.
    with pytest.raises(SystemExit):
        run(tiny_checkpoint, chexpert_dir, tmp_path / "refused", "--split", "valid", dataset="chexpert")
    assert "thresholds would be oracle" in capsys.readouterr().err


@pytest.fixture
def knee_dir(tmp_path):
    root = tmp_path / "knee"
    for split, per_grade in (("train", 3), ("val", 1), ("test", 2)):
        for grade in range(5):
            for index in range(per_grade):
                write_image(root / split / str(grade) / f"{split}_{grade}_{index}.png", 100 * grade + index)
    return root


def test_knee_kl_multiclass_confusion_matrix_and_ordinal_error(tiny_checkpoint, knee_dir, tmp_path):
    run(tiny_checkpoint, knee_dir, tmp_path, "--method", "vision_probe", "--balance_classes", dataset="knee_kl")
    record = metrics_json(tmp_path)
    metrics = record["metrics"]
    assert record["task"] == "multiclass" and record["validation_split"] is None
    assert metrics["threshold_protocol"] == "argmax"
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix.shape == (5, 5) and matrix.sum() == 10 and (matrix.sum(axis=1) == 2).all()

    predictions = pd.read_parquet(tmp_path / "predictions.parquet")
    scores = predictions[[f"score:KL {grade}" for grade in range(5)]].to_numpy()
    assert np.allclose(scores.sum(axis=1), 1.0)
    truth = np.array([int(Path(path).parent.name) for path in predictions["image"]])
    predicted = scores.argmax(axis=1)
    assert metrics["ordinal_mae"] == pytest.approx(np.abs(predicted - truth).mean())
    assert metrics["accuracy"] == pytest.approx((predicted == truth).mean())
    assert record["method_summary"]["probe_training_images"] == {"all": 15}
    report = (tmp_path / "report.md").read_text()
    assert "Confusion matrix" in report and "ordinal error" in report


# -- prompt sensitivity -----------------------------------------------------------------------------------------------


def test_templates_report_mean_and_std_of_the_auc(tiny_checkpoint, phantom_dir, tmp_path):
    templates = tmp_path / "templates.txt"
    templates.write_text("a chest radiograph showing {}\n# comments are skipped\n\nfindings consistent with {}\n")
    record = run(tiny_checkpoint, phantom_dir, tmp_path / "out", "--labels", TWO_LABELS, "--no_knowledge",
                 "--templates", str(templates), "--limit", "8")
    sensitivity = metrics_json(tmp_path / "out")["prompt_sensitivity"]
    assert sensitivity["templates"] == ["a chest radiograph showing {}", "findings consistent with {}"]
    per_template = []
    for index in range(2):
        run_dir = tmp_path / "out" / f"template_{index:02d}"
        per_template.append(metrics_json(run_dir))
        assert (run_dir / "predictions.parquet").is_file() and (run_dir / "roc_curves.png").is_file()
    aucs = [saved["metrics"]["auc_macro"] for saved in per_template]
    assert sensitivity["summary_auc"] == pytest.approx(aucs)
    assert sensitivity["mean"] == pytest.approx(np.mean(aucs))
    assert sensitivity["std"] == pytest.approx(np.std(aucs, ddof=1))
    assert [saved["template"] for saved in per_template] == sensitivity["templates"]
    first, second = (pd.read_parquet(tmp_path / "out" / f"template_{i:02d}" / "predictions.parquet") for i in (0, 1))
    assert not np.allclose(first["score:Pneumothorax"], second["score:Pneumothorax"])  # the template is used
    assert "mean ± std across templates" in record["report_text"]


def test_vision_probe_takes_no_templates(tiny_checkpoint, phantom_dir, tmp_path, capsys):
    templates = tmp_path / "templates.txt"
    templates.write_text("{}\n")
    with pytest.raises(SystemExit):
        run(tiny_checkpoint, phantom_dir, tmp_path / "out", "--method", "vision_probe", "--templates", str(templates))
    assert "takes no prompt" in capsys.readouterr().err


# -- building blocks --------------------------------------------------------------------------------------------------


def test_label_budget_shots_balance_and_cap():
    classes = np.array([0] * 10 + [1] * 4 + [2] * 2 + [-1] * 3)
    natural = select_rows(classes, shots=None, balance=False, max_samples=None, seed=0)
    assert len(natural) == 16  # unusable items (-1) never chosen
    assert np.bincount(classes[select_rows(classes, 3, False, None, 0)]).tolist() == [3, 3, 2]
    assert np.bincount(classes[select_rows(classes, None, True, None, 0)]).tolist() == [2, 2, 2]
    assert len(select_rows(classes, None, False, 5, 0)) == 5
    assert np.array_equal(select_rows(classes, 3, False, None, 1), select_rows(classes, 3, False, None, 1))
    assert not np.array_equal(select_rows(classes, 3, False, None, 1), select_rows(classes, 3, False, None, 2))

    labels = np.array([[1, 0], [0, np.nan], [0, 1], [0, 0]], dtype=float)
    items = vqa_training_items(labels, ["A", "B"], shots=None, balance=True, max_samples=None, seed=0)
    assert sorted((label, answer) for _, label, answer in items) == [("A", "no"), ("A", "yes"), ("B", "no"),
                                                                     ("B", "yes")]


def test_vqa_prompt_expands_the_image_token_inside_the_chat_template(tiny_checkpoint):
    from radz.baselines import VQAPrompt, load_checkpoint

    checkpoint = load_checkpoint(tiny_checkpoint, "cpu")
    plain = VQAPrompt(checkpoint).ids("Does this chest X-ray show {}?".format("Edema"))
    checkpoint.tokenizer.chat_template = (
        "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    chat = VQAPrompt(checkpoint)
    ids = chat.ids("Does this chest X-ray show Edema?")
    image_id, count = checkpoint.image_token_id, checkpoint.num_image_tokens
    positions = [i for i, token in enumerate(ids) if token == image_id]
    assert len(positions) == count == 16 and positions == list(range(positions[0], positions[0] + count))
    text = checkpoint.tokenizer.decode(ids[positions[-1] + 1 :])
    assert "Edema?" in text and text.rstrip().endswith("[assistant]") and ids != plain
    assert set(chat.yes_ids).isdisjoint(chat.no_ids)

    # A processor holding an LLM's text-only template (the demo's SmolLM2 ChatML cannot render structured
    # content) falls back to the tokenizer's template instead of failing.
    text_only = "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] + '' }}\n{% endfor %}"
    checkpoint.chat_template = checkpoint.processor.chat_template = text_only
    assert VQAPrompt(checkpoint).ids("Does this chest X-ray show Edema?") == ids


def test_answer_parsing_and_answer_metrics():
    assert parse_answer("Yes, there is") == 1.0 and parse_answer(" no.") == 0.0
    assert np.isnan(parse_answer("maybe yes")) and np.isnan(parse_answer("yesterday"))
    answers = np.array([[1.0], [0.0], [np.nan], [1.0]])
    labels = np.array([[1.0], [0.0], [1.0], [0.0]])
    result = answer_metrics(answers, labels, ["A"])
    assert result["parsed_rate_macro"] == 0.75
    assert result["accuracy_macro"] == 0.5  # the unparsed answer counts as wrong
    assert result["f1_macro"] == pytest.approx(2 * 1 / (2 + 2))


def test_compare_methods_on_a_tiny_checkpoint(tiny_checkpoint, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("compare_methods", REPO / "examples" / "compare_methods.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    data_dir = tmp_path / "phantom"  # absent: the example writes a small synthetic set first
    rows = compare.main(["--model", str(tiny_checkpoint), "--data_dir", str(data_dir), "--output_dir",
                         str(tmp_path / "out"), "--limit", "4", "--labels", "No Finding", "--sft_steps", "1", "--sft_batch_size", "2",
                         "--n_train", "6", "--n_validation", "4", "--n_test", "4", "--size", "64"])
    assert (data_dir / "test.jsonl").is_file() and json.loads((data_dir / "label_names.json").read_text()) == \
        PHANTOM_LABELS
    assert [row["method"] for row in rows] == ["radz", "vqa", "vision_probe", "sft"]
    table = (tmp_path / "out" / "comparison.md").read_text()
    assert "SYNTHETIC" in table.splitlines()[0] and "not patients" in table
    assert all(f"| {method} |" in table for method in ("radz", "vqa", "vision_probe", "sft"))
    summary = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert summary["synthetic"] is True and len(summary["rows"]) == 4
    assert "Method comparison on SYNTHETIC phantom data" in capsys.readouterr().out


# -- official layouts without a validation part ------------------------------------------------------------------------


@pytest.fixture
def nih_dir(tmp_path):
    """A small ChestX-ray14 folder in the official layout: the first 80 rows of the real Data_Entry_2017_v2020.csv
    (torchxrayvision ships it), their images, and official-style lists: the last 3 patients are the test list."""
    spec = importlib.util.find_spec("torchxrayvision")
    source = Path(spec.submodule_search_locations[0]) / "data" / "Data_Entry_2017_v2020.csv.gz" if spec else None
    if source is None or not source.is_file():
        pytest.skip("torchxrayvision's Data_Entry_2017_v2020.csv.gz is not installed")
    entries = pd.read_csv(source, nrows=80)
    entries.to_csv(tmp_path / "Data_Entry_2017_v2020.csv", index=False)
    rng = np.random.default_rng(0)
    for name in entries["Image Index"]:
        (tmp_path / "images_001" / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(tmp_path / "images_001/images" / name)
    test_patients = sorted(set(entries["Patient ID"]))[-3:]
    test = entries["Patient ID"].isin(test_patients)
    (tmp_path / "train_val_list.txt").write_text("\n".join(entries.loc[~test, "Image Index"]) + "\n")
    (tmp_path / "test_list.txt").write_text("\n".join(entries.loc[test, "Image Index"]) + "\n")
    return tmp_path


def test_chestxray14_official_lists_get_a_patient_disjoint_validation_split(tiny_checkpoint, nih_dir, tmp_path):
    from radz.datasets import chestxray14

    train_val, val = chestxray14(nih_dir, split="train"), chestxray14(nih_dir, split="val")
    assert set(val["image"]) < set(train_val["image"]) and len(val) > 0
    rest = [p for p, image in zip(train_val["patient_id"], train_val["image"]) if image not in set(val["image"])]
    assert not set(val["patient_id"]) & set(rest)  # whole patients
    assert chestxray14(nih_dir, split="val")["image"] == val["image"]  # deterministic

    labels = "Cardiomegaly,Effusion,Pneumothorax"
    record = run(tiny_checkpoint, nih_dir, tmp_path / "out", "--labels", labels, dataset="chestxray14")
    assert record["validation_split"] == "val" and record["threshold_protocol"].startswith("validation")
    assert "patients of train_val_list.txt" in record["validation_note"]
    assert "patients of train_val_list.txt" in (tmp_path / "out" / "report.md").read_text()
    assert "auc_macro" in record["metrics"] and record["n_images"] == len(chestxray14(nih_dir, split="test"))
    # An explicit --validation_split still wins.
    record = run(tiny_checkpoint, nih_dir, tmp_path / "explicit", "--labels", labels, "--validation_split", "train",
                 dataset="chestxray14")  # fmt: skip
    assert record["validation_split"] == "train" and "official" not in record["validation_note"]


def test_without_a_validation_split_the_auc_is_still_computed():
    from radz.evaluation.harness import NO_VALIDATION, EvalData, evaluate_scores

    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=np.float64)
    scores = np.array([[0.9, 0.2], [0.1, 0.8], [0.7, 0.6], [0.3, 0.1]])
    test = EvalData("rsna_pneumonia", "train", ["a", "b", "c", "d"], labels, ["A", "B"], "multilabel")
    metrics = evaluate_scores("multilabel", scores, test, "validation")
    assert metrics["threshold_protocol"] == NO_VALIDATION
    assert metrics["auc_macro"] == pytest.approx(1.0)
    assert all(np.isnan(metrics["per_class"][name]["f1"]) for name in ("A", "B"))


def test_evaluation_imports_no_baseline_and_the_baselines_register_themselves():
    import ast

    from radz.evaluation.methods import METHODS

    for path in sorted((REPO / "radz" / "evaluation").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(m.startswith("radz.baselines") for m in modules), f"{path.name}:{node.lineno}"
    assert sorted(METHODS) == ["radz", "sft", "vision_probe", "vqa"]  # this module imported radz.baselines
