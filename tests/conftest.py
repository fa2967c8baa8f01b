"""Shared fixtures: offline environment, tiny models, saved checkpoints and a fresh-process runner."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Set before any test module imports transformers/evaluate: both read HF_HOME at import time, and remote-code
# modules are cached under it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="llava_radz_hf_home_")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)
os.environ["TOKENIZERS_PARALLELISM"] = "false"
TINY_KNOWLEDGE = {
    "Cardiomegaly": {
        "synonyms": ["enlarged heart"],
        "descriptions": ["the cardiac silhouette is enlarged", "heart width exceeds half the thoracic width"],
    },
    "Pleural Effusion": {
        "synonyms": ["Effusion"],
        "descriptions": ["blunting of the costophrenic angle", "a dependent opacity with a meniscus"],
    },
    "No Finding": {"synonyms": ["normal"], "descriptions": ["the lungs are clear", "no acute abnormality"]},
}


@pytest.fixture
def tiny_model():
    """A tiny (model, processor) pair with the test knowledge base, seeded."""
    from radz.presets import tiny

    torch.manual_seed(0)
    model, processor = tiny()
    processor.set_knowledge(TINY_KNOWLEDGE)
    return model, processor


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A saved tiny LLaVA-RadZ checkpoint directory (model + processor + knowledge)."""
    from radz.presets import tiny

    torch.manual_seed(0)
    model, processor = tiny()
    processor.set_knowledge(TINY_KNOWLEDGE)
    directory = tmp_path_factory.mktemp("tiny_checkpoint")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def run_python(code: str, cwd=None, timeout: int = 300) -> str:
    """Run `code` in a fresh Python process (outside the repo, so only installed or saved code is importable);
    return its stdout, failing the test with stderr on a non-zero exit."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd or "/", env=env, timeout=timeout
    )
    assert result.returncode == 0, f"subprocess failed:\n{result.stderr[-4000:]}"
    return result.stdout


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
