"""A smoke version of `make demo`: the whole flow (phantoms → knowledge → accelerate training → zero-shot
evaluation with and without anchors → pipeline on RG1_UNCR.dcm) with the tiny preset."""

import json
import re
import sys

from huggingface_hub import ModelCard

from conftest import REPO

sys.path.insert(0, str(REPO / "examples"))

import demo  # noqa: E402


def test_demo_flow_runs_end_to_end_with_a_tiny_model(tmp_path, capsys):
    out = tmp_path / "demo"
    demo.main(
        [
            "--output_dir", str(out), "--preset", "tiny", "--knowledge_model", "none",
            "--n_train", "48", "--n_test", "24", "--image_size", "64", "--max_steps", "4", "--tower_steps", "3",
            "--batch_size", "8",
        ]
    )
    printed = capsys.readouterr().out

    assert len((out / "data" / "train.jsonl").read_text().splitlines()) == 48
    assert json.loads((out / "knowledge.json").read_text()).keys() == set(demo.PHANTOM_LABELS)
    assert (out / "model" / "config.json").exists() and (out / "model" / "pipeline_llava_radz.py").exists()
    for name in demo.EVALUATIONS:
        assert (out / f"eval_{name}" / "predictions.parquet").exists()
        assert (out / f"eval_{name}" / "roc_curves.png").exists()
    assert json.loads((out / "model" / "tower_pretraining.json").read_text())[-1]["step"] == 3
    assert json.loads((out / "model" / "trainer_state.json").read_text())["global_step"] == 4
    # The held-out categories are in no training label.
    trained = re.search(r"--label_columns '([^']+)'", printed).group(1).split(",")
    assert trained == demo.SEEN and not set(trained) & set(demo.DEMO_HELD_OUT)

    report = (out / "report.md").read_text()
    assert "SYNTHETIC" in report
    number = r"([\d.]+|nan)"
    rows = re.findall(rf"^\| ([A-Z][\w ]+) \| (yes|HELD OUT) \| {number} \| {number} \| {number} \|$", report, re.M)
    assert [row[0] for row in rows] == demo.PHANTOM_LABELS
    assert {row[0] for row in rows if row[1] == "HELD OUT"} == set(demo.DEMO_HELD_OUT)
    summaries = re.findall(r"^\| \*\*macro, (all|seen|held out)\*\* \| \| ", report, re.M)
    assert summaries == ["all", "seen", "held out"]
    # The knowledge anchors change the scores: the two columns are not the same evaluation.
    assert [row[2] for row in rows] != [row[3] for row in rows]
    assert re.search(r"DFAT: 4 steps in [\d.]+ min \([\d.]+ s/step\)", report)

    # The checkpoint's model card carries its metadata and the three results, and says SYNTHETIC.
    card = ModelCard.load(out / "model" / "README.md")
    assert card.data.pipeline_tag == "zero-shot-image-classification" and "synthetic-data" in card.data.tags
    aucs = {r.metric_config: r.metric_value for r in card.data.eval_results if r.metric_type == "roc_auc"}
    assert len(aucs) == len(demo.EVALUATIONS) and "SYNTHETIC" in card.text and "not a clinical tool" in card.text
    macro = json.loads((out / "eval_with_anchors" / "metrics.json").read_text())["metrics"]["auc_macro"]
    assert any(abs(value - macro) < 1e-4 for value in aucs.values())

    # RG1_UNCR.dcm went through pipeline(...) twice, with a score per label and the anchors marked.
    assert printed.count("RG1_UNCR.dcm,") == 2
    scores = re.findall(r"^  (\S.*?)\s+([01]\.\d{3})(  \(anchor\))?$", printed, re.M)
    assert len(scores) == 2 * len(demo.PHANTOM_LABELS)
    assert all(anchor for *_, anchor in scores)
    single = [float(score) for _, score, _ in scores[: len(demo.PHANTOM_LABELS)]]
    assert abs(sum(single) - 1.0) < 0.01
    assert "not a clinical tool" in printed
