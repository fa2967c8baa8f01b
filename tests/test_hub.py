"""The hub side of a checkpoint (radz/hub.py): the model card written by training and updated by evaluation, and
the upload of the merged model by `--push_to_hub` / `radz-push`. Only the network calls are mocked."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.utils import filter_repo_objects
from PIL import Image

from conftest import TINY_KNOWLEDGE, run_python

LABELS = ["Cardiomegaly", "Pleural Effusion", "No Finding"]
REPORTS = ["the cardiac silhouette is enlarged", "blunting of the costophrenic angle", "the lungs are clear"]


def write_dataset(root: Path, n: int, name: str, seed: int) -> Path:
    """`n` 32-px PNGs of three classes with reports and 0/1 label columns (JSONL)."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        cls = i % 3
        pixels = rng.integers(0, 40, (32, 32)).astype(np.uint8)
        pixels[8:24, 8:24] += 180 if cls == 0 else 0
        pixels[22:, :] += 180 if cls == 1 else 0
        Image.fromarray(pixels).save(root / "img" / f"{name}-{i}.png")
        rows.append({"image": f"img/{name}-{i}.png", "report": REPORTS[cls],
                     **{label: int(cls == k) for k, label in enumerate(LABELS)}})
    path = root / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


class FakeHub:
    """Stands in for the two network calls of an upload. `upload_folder` copies what the hub would receive (the
    folder filtered by huggingface_hub's own pattern matching) into `received`."""

    def __init__(self, received: Path):
        self.received, self.calls = received, []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        self.calls.append(("upload_folder", repo_id, {"folder_path": folder_path, **kwargs}))
        root = Path(folder_path)
        files = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
        for name in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (self.received / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / name, self.received / name)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    hub = FakeHub(tmp_path / "received")
    hub.received.mkdir()
    monkeypatch.setattr(HfApi, "create_repo", hub.create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", hub.upload_folder)
    return hub


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The data and arguments of a tiny training run (`--save_steps`: the output holds Trainer checkpoints)."""
    root = tmp_path_factory.mktemp("hub")
    knowledge = root / "knowledge.json"
    knowledge.write_text(json.dumps(TINY_KNOWLEDGE))
    data = {"train": write_dataset(root, 18, "train", 0), "test": write_dataset(root, 9, "test", 1),
            "validation": write_dataset(root, 9, "validation", 2)}
    argv = ["--config", "tiny", "--train_file", str(data["train"]), "--label_columns", ",".join(LABELS),
            "--knowledge", str(knowledge), "--max_steps", "4", "--save_steps", "2",
            "--per_device_train_batch_size", "6", "--lora_r", "4", "--use_cpu", "--dataloader_pin_memory", "False",
            "--report_to", "none", "--seed", "0"]
    return {"root": root, "argv": argv}


def train_with_push(trained, fake_hub, output: Path):
    import train_radz

    argv = [*trained["argv"], "--output_dir", str(output), "--push_to_hub", "--hub_model_id", "someone/radz-tiny"]
    assert train_radz.main(argv) == 0


def test_training_writes_a_card_that_model_card_load_reads(trained, fake_hub, tmp_path):
    output = tmp_path / "model"
    train_with_push(trained, fake_hub, output)
    card = ModelCard.load(output / "README.md")
    data = card.data.to_dict()
    assert data["pipeline_tag"] == "zero-shot-image-classification"
    assert data["library_name"] == "transformers"
    assert data["license"] == "apache-2.0"
    assert data["datasets"] == ["train.jsonl"]
    assert "llava-radz" in data["tags"] and "radiology" in data["tags"]
    assert "base_model" not in data  # the tiny preset starts from no pretrained model
    training = data["llava_radz"]["training"]
    assert training["recipe"]["max_steps"] == 4 and training["model"]["lora_r"] == 4
    assert training["global_step"] == 4 and training["knowledge_categories"] == sorted(TINY_KNOWLEDGE)
    text = card.text
    for section in ("## Intended use", "## How to load", "## Training data", "## Training recipe",
                    "## Threshold protocol", "## Evaluation"):
        assert section in text
    assert "not a clinical tool" in text and "ORACLE" in text
    assert "| max_steps | `4` |" in text and "No evaluation yet" in text
    assert 'pipeline("zero-shot-image-classification", model="someone/radz-tiny"' in text  # renamed for the push
    assert data["model_name"] == "someone/radz-tiny" and str(trained["root"]) not in text  # no local paths

    # --push_to_hub pushed the final merged checkpoint once, after training; the Trainer pushed nothing itself.
    assert [call[0] for call in fake_hub.calls] == ["create_repo", "upload_folder"]
    assert fake_hub.calls[1][2]["folder_path"] == str(output)
    assert (output / "checkpoint-2").is_dir()  # the Trainer's LoRA checkpoints stay local
    received = sorted(str(p.relative_to(fake_hub.received)) for p in fake_hub.received.rglob("*") if p.is_file())
    assert not [name for name in received if name.startswith("checkpoint-") or name.endswith((".bin", ".pt"))]
    for name in ("README.md", "config.json", "model.safetensors", "knowledge.json", "processor_config.json",
                 "modeling_llava_radz.py", "pipeline_llava_radz.py", "zero_shot_llava_radz.py"):
        assert name in received

    # The folder the hub received loads on its own through pipeline(...) in a fresh process.
    code = f"""
import json, numpy as np
from transformers import pipeline
clf = pipeline("zero-shot-image-classification", model={str(fake_hub.received)!r}, trust_remote_code=True)
image = np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8)
print(json.dumps({{"class": type(clf).__name__, "result": clf(image, candidate_labels={LABELS!r})}}))
"""
    out = json.loads(run_python(code).strip().splitlines()[-1])
    assert out["class"] == "LlavaRadZZeroShotImageClassificationPipeline"
    assert sorted(r["label"] for r in out["result"]) == sorted(LABELS)
    assert sum(r["score"] for r in out["result"]) == pytest.approx(1.0, abs=1e-5)


def test_evaluation_updates_the_card_with_its_results(trained, fake_hub, tmp_path):
    import evaluate_radz

    output = tmp_path / "model"
    train_with_push(trained, fake_hub, output)
    argv = ["--model", str(output), "--dataset", "generic", "--data_dir", str(trained["root"]), "--split", "test",
            "--validation_split", "validation", "--labels", ",".join(LABELS), "--batch_size", "4", "--update_card"]
    with_anchors = evaluate_radz.main([*argv, "--output_dir", str(tmp_path / "eval_a")])
    evaluate_radz.main([*argv, "--no_knowledge", "--output_dir", str(tmp_path / "eval_b")])
    # The same evaluation again replaces its result instead of adding one.
    evaluate_radz.main([*argv, "--output_dir", str(tmp_path / "eval_a")])

    card = ModelCard.load(output / "README.md")
    evaluations = card.data.to_dict()["llava_radz"]["evaluations"]
    assert len(evaluations) == 2
    assert [e["use_knowledge"] for e in evaluations] == [False, True]
    metrics = with_anchors["metrics"]
    results = card.data.eval_results
    aucs = [r for r in results if r.metric_type == "roc_auc"]
    assert len(aucs) == 2 and all(r.task_type == "zero-shot-image-classification" for r in aucs)
    anchored = next(r for r in aucs if "· anchors ·" in r.metric_config)
    assert anchored.metric_value == pytest.approx(metrics["auc_macro"], abs=1e-4)
    assert anchored.dataset_split == "test"
    f1 = next(r for r in results if r.metric_type == "f1" and "· anchors ·" in r.metric_config)
    assert "thresholds validation" in f1.metric_name and f1.metric_value == pytest.approx(metrics["f1_macro"], abs=1e-4)
    # The table in the text, with the per-class AUCs.
    text = card.text
    assert "No evaluation yet" not in text
    row = next(line for line in text.splitlines() if line.startswith("| radz · generic") and "· anchors ·" in line)
    assert f"| {100 * metrics['auc_macro']:.2f} |" in row
    per_class = metrics["per_class"]["Cardiomegaly"]["auc"]
    assert f"| Cardiomegaly | {100 * per_class:.2f} |" in text
    # The card survives a retraining into the same folder: the results are kept.
    train_with_push(trained, fake_hub, output)
    assert len(ModelCard.load(output / "README.md").data.to_dict()["llava_radz"]["evaluations"]) == 2


def test_radz_push_uploads_a_saved_checkpoint_and_refuses_an_incomplete_one(tiny_checkpoint, fake_hub, tmp_path,
                                                                            capsys):
    from radz import cli
    from radz.hub import write_model_card

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "knowledge.json").unlink()
    with pytest.raises(SystemExit):
        cli.push([str(folder), "someone/radz"])
    error = capsys.readouterr().err
    assert "no knowledge.json" in error and "no README.md" in error
    assert fake_hub.calls == []

    shutil.copy(tiny_checkpoint / "knowledge.json", folder)
    write_model_card(folder)
    (folder / "optimizer.pt").write_bytes(b"not uploaded")
    assert cli.push([str(folder), "someone/radz", "--private"]) == 0
    assert fake_hub.calls[0] == ("create_repo", "someone/radz", {"private": True, "exist_ok": True})
    assert (fake_hub.received / "README.md").is_file() and not (fake_hub.received / "optimizer.pt").exists()
    assert ModelCard.load(fake_hub.received / "README.md").data.pipeline_tag == "zero-shot-image-classification"


@pytest.mark.parametrize(
    ("base_model", "preset", "expected", "licence"),
    [(None, {"preset": "demo"}, "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
     ("llava-hf/llava-1.5-7b-hf", None, "llava-hf/llava-1.5-7b-hf", "other"),
     (None, {"preset": "tiny"}, None, "apache-2.0")],
)
def test_the_card_names_the_base_model_and_its_licence(tiny_checkpoint, tmp_path, base_model, preset, expected,
                                                       licence):
    from types import SimpleNamespace

    from radz.hub import MODEL_KEYS, write_model_card

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    preset_file = None
    if preset is not None:
        preset_file = tmp_path / "preset.json"
        preset_file.write_text(json.dumps(preset))
    args = SimpleNamespace(base_model=base_model, config=preset_file and str(preset_file), knowledge="chexpert",
                           **{key: 0 for key in MODEL_KEYS})
    write_model_card(folder, model_args=args)
    if preset_file is not None:
        preset_file.unlink()  # the card is rebuilt without it
    from radz.hub import update_model_card

    card = update_model_card(folder, [], notes=["SYNTHETIC DATA"])
    assert card.data.base_model == expected and card.data.license == licence
    assert "synthetic-data" in card.data.tags and "> **SYNTHETIC DATA**" in card.text
    assert ModelCard.load(folder / "README.md").data.base_model == expected
