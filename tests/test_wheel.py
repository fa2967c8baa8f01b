"""The package as users install it: a wheel built from the checkout, installed (not editable) into a fresh venv
outside the checkout, trains the tiny preset, evaluates (the metric module is package data) and runs the pipeline,
all from a folder outside the checkout through the installed `radz-*` commands."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, TINY_KNOWLEDGE

LABELS = ["Cardiomegaly", "Pleural Effusion", "No Finding"]
SKIPPED = (".venv", ".git", "build", "dist", "outputs", "*.egg-info", "__pycache__", ".pytest_cache")


def run(command, cwd, env, timeout=300) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command[0]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def test_the_wheel_trains_evaluates_and_classifies_outside_the_checkout(tmp_path):
    # 1. Build the wheel from a copy of the checkout (the build leaves build/ and *.egg-info behind).
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*SKIPPED))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": "",
           "OMP_NUM_THREADS": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = [sys.executable, "-m", "pip"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(source)],
        tmp_path, env)
    (wheel,) = (tmp_path / "dist").glob("llava_radz-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "radz/evaluation/radz_zero_shot/radz_zero_shot.py" in names and "radz/knowledge/chexpert.json" in names
    assert "pipeline_llava_radz.py" in names and not [n for n in names if n.startswith(("tests/", "examples/"))]

    # 2. A fresh venv that borrows the project venv's dependencies (a .pth line; their .pth files, and so the
    # editable install of the checkout, are not processed there) and gets the wheel itself, not editable.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    purelib = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path,
                       env).strip())
    (purelib / "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([*pip, "--python", str(python), "install", "-q", "--no-deps", "--ignore-installed", str(wheel)], tmp_path, env)
    for command in ("radz-train", "radz-evaluate", "radz-knowledge", "radz-compare", "radz-push"):
        assert (venv / "bin" / command).is_file(), command

    work = tmp_path / "work"  # outside the checkout: only the installed package is importable
    work.mkdir()
    where = run([str(python), "-c", "import radz, pipeline_llava_radz, radz.evaluation.metrics as m; "
                 "print(radz.__file__); print(pipeline_llava_radz.__file__); print(m.METRIC_DIR)"], work, env)
    for path in where.split():
        assert Path(path).is_relative_to(venv) and not Path(path).is_relative_to(REPO), path

    # 3. Train the tiny preset, evaluate with the packaged metric module, classify through pipeline(...).
    from radz.phantom import write_phantom_dataset

    write_phantom_dataset(work / "data", n_train=12, n_validation=8, n_test=8, size=64, seed=0)
    knowledge = work / "knowledge.json"
    knowledge.write_text(json.dumps(TINY_KNOWLEDGE))
    bin_dir = venv / "bin"
    run([str(bin_dir / "radz-train"), "--config", "tiny", "--train_file", "data/train.jsonl", "--label_columns",
         ",".join(LABELS), "--knowledge", str(knowledge), "--output_dir", "model", "--max_steps", "2",
         "--per_device_train_batch_size", "4", "--lora_r", "4", "--use_cpu", "--dataloader_pin_memory", "False",
         "--report_to", "none", "--save_strategy", "no"], work, env)
    assert (work / "model" / "model.safetensors").is_file() and (work / "model" / "README.md").is_file()
    printed = run([str(bin_dir / "radz-evaluate"), "--model", "model", "--dataset", "generic", "--data_dir", "data",
                   "--split", "test", "--validation_split", "validation", "--labels", ",".join(LABELS),
                   "--batch_size", "4", "--output_dir", "eval", "--update_card"], work, env)
    assert "threshold protocol: validation" in printed
    metrics = json.loads((work / "eval" / "metrics.json").read_text())["metrics"]
    assert set(metrics["per_class"]) == set(LABELS) and 0.0 <= metrics["auc_macro"] <= 1.0
    code = (
        "import json, numpy as np\n"
        "from huggingface_hub import ModelCard\n"
        "from transformers import pipeline\n"
        "clf = pipeline('zero-shot-image-classification', model='model', trust_remote_code=True)\n"
        f"result = clf('data/images/test/000000.png', candidate_labels={LABELS!r})\n"
        "card = ModelCard.load('model/README.md')\n"
        "print(json.dumps({'result': result, 'class': type(clf).__name__,\n"
        "                  'auc': [r.metric_value for r in card.data.eval_results if r.metric_type == 'roc_auc']}))\n"
    )
    out = json.loads(run([str(python), "-c", code], work, env).strip().splitlines()[-1])
    assert out["class"] == "LlavaRadZZeroShotImageClassificationPipeline"
    assert sorted(r["label"] for r in out["result"]) == sorted(LABELS)
    assert sum(r["score"] for r in out["result"]) == pytest.approx(1.0, abs=1e-5)
    assert out["auc"] == [round(metrics["auc_macro"], 4)]
