"""Distributed evaluation (radz/evaluation/distributed.py): `accelerate launch evaluate_radz.py` on 2 gloo processes
gives the metrics and predictions of 1 process, and its sharded chunks resume. Tiny checkpoint, phantom images
(SYNTHETIC)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import evaluate_radz
from conftest import REPO

LABELS = "Pneumothorax,No Finding,Cardiomegaly"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_launch(script: str, args: list[str], processes: int = 2, timeout: int = 300):
    """`accelerate launch --multi_gpu --num_processes N SCRIPT ARGS` on CPU: N processes with gloo."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
        "--dynamo_backend", "no", script, *args,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"accelerate launch failed:\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    from radz.phantom import write_phantom_dataset

    directory = tmp_path_factory.mktemp("phantom_eval")
    write_phantom_dataset(directory, n_train=4, n_validation=8, n_test=12, size=64, seed=0)
    return directory


def eval_args(checkpoint, data_dir, out) -> list[str]:
    return [
        "--model", str(checkpoint), "--dataset", "generic", "--data_dir", str(data_dir), "--output_dir", str(out),
        "--labels", LABELS, "--batch_size", "2", "--chunk_size", "4", "--bootstrap", "20",
    ]  # fmt: skip


def chunk_files(out, split) -> list[Path]:
    return sorted((Path(out) / "chunks").glob(f"{split}-*/chunk_*.parquet"))


def test_two_processes_give_the_metrics_of_one_and_their_chunks_resume(tiny_checkpoint, phantom_dir, tmp_path):
    one = evaluate_radz.main(eval_args(tiny_checkpoint, phantom_dir, tmp_path / "one"))
    assert one["threshold_protocol"].startswith("validation")

    two_dir = tmp_path / "two"
    result = accelerate_launch("evaluate_radz.py", eval_args(tiny_checkpoint, phantom_dir, two_dir))
    assert result.stdout.count("outputs: ") == 1  # the main process reports, once
    two = json.loads((two_dir / "metrics.json").read_text())
    assert two["metrics"] == json.loads((tmp_path / "one" / "metrics.json").read_text())["metrics"]
    assert two["n_images"] == 12
    # Every image of both splits was scored once, by one of the two processes.
    assert two["compute"]["images_scored"] == 12 + 8 and two["compute"]["images_resumed"] == 0
    expected = pd.read_parquet(tmp_path / "one" / "predictions.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(two_dir / "predictions.parquet"), expected)

    # Lose a chunk of each process (test chunk 1 is the second process's, validation chunk 0 the first's) and rerun:
    # only those are scored again, and nothing changes.
    chunk_files(two_dir, "test")[1].unlink()
    chunk_files(two_dir, "validation")[0].unlink()
    accelerate_launch("evaluate_radz.py", eval_args(tiny_checkpoint, phantom_dir, two_dir))
    resumed = json.loads((two_dir / "metrics.json").read_text())
    assert resumed["compute"]["images_scored"] == 8 and resumed["compute"]["images_resumed"] == 12
    assert resumed["metrics"] == two["metrics"]
    pd.testing.assert_frame_equal(pd.read_parquet(two_dir / "predictions.parquet"), expected)


def test_trained_baselines_refuse_a_multi_process_launch(tiny_checkpoint, phantom_dir, tmp_path, monkeypatch):
    from radz.evaluation import distributed, harness

    monkeypatch.setattr(harness, "current_shard", lambda: distributed.Shard(rank=0, world_size=2))
    with pytest.raises(SystemExit) as exit_info:
        evaluate_radz.main(eval_args(tiny_checkpoint, phantom_dir, tmp_path) + ["--method", "vision_probe"])
    assert exit_info.value.code == 2
