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


def free_port() -> int:
    """A free TCP port on localhost, for a process group's rendezvous."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_script(tmp_path, script: str, *args: str, timeout: int = 240) -> str:
    """Run `script` (Python source, which may start its own processes) with the repository importable; return its
    stdout, failing the test with stderr on a non-zero exit."""
    path = tmp_path / "script.py"
    path.write_text(script)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(path), *args], env=env, capture_output=True, text=True,
                            timeout=timeout)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def accelerate_launch(script: str, args: list[str], processes: int = 2, timeout: int = 300):
    """`accelerate launch --multi_gpu --num_processes N SCRIPT ARGS` from the repository root: N CPU processes with
    gloo. Returns the completed process, failing the test on a non-zero exit."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
        "--dynamo_backend", "no", script, *args,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"accelerate launch failed:\n{result.stderr[-5000:]}"
    return result
