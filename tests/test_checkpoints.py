"""Checkpoints that survive preemption (radz/training/checkpoints.py): a run killed with SIGKILL at random moments,
checkpoint writes included, and resumed with `--resume_from_checkpoint latest` each time ends with the weights of an
unbroken run; a half-written checkpoint is never visible under its final name.

The runs are spawned processes (a fork of a test process whose OpenMP pool has started hangs): tiny model, phantom
data (SYNTHETIC), a short tower stage, a checkpoint every step.
"""

import json
import multiprocessing
import os
import random
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import accelerate_launch
from radz.training.checkpoints import STAGING_DIR, latest_checkpoint, resolve_resume

STEPS = 16


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    from radz.phantom import write_phantom_dataset

    directory = tmp_path_factory.mktemp("phantom_train")
    write_phantom_dataset(directory, n_train=24, n_validation=2, n_test=2, size=64, seed=0)
    return directory


def train_argv(phantom_dir, output_dir) -> list[str]:
    labels = ",".join(json.loads((phantom_dir / "label_names.json").read_text()))
    return [
        "--config", "tiny", "--train_file", str(phantom_dir / "train.jsonl"), "--label_columns", labels,
        "--knowledge", "phantom", "--output_dir", str(output_dir), "--lora_r", "4", "--lora_dropout", "0",
        "--learning_rate", "3e-3", "--seed", "0", "--use_cpu", "--dataloader_pin_memory", "False",
        "--report_to", "none", "--max_steps", str(STEPS), "--per_device_train_batch_size", "4", "--save_steps", "1",
        "--logging_steps", "1", "--tower_pretraining_steps", "3", "--tower_pretraining_batch_size", "8",
        "--calibration_samples", "8", "--resume_from_checkpoint", "latest", "--disable_tqdm", "True",
    ]  # fmt: skip


def _main(argv):
    import train_radz

    train_radz.main(argv)


def start(argv) -> multiprocessing.Process:
    process = multiprocessing.get_context("spawn").Process(target=_main, args=(argv,))
    process.start()
    return process


def test_sigkill_at_random_moments_then_resume_latest_gives_the_unbroken_weights(phantom_dir, tmp_path):
    began = time.perf_counter()
    unbroken = start(train_argv(phantom_dir, tmp_path / "unbroken"))
    unbroken.join(120)
    assert unbroken.exitcode == 0
    duration = time.perf_counter() - began

    output_dir = tmp_path / "preempted"
    argv = train_argv(phantom_dir, output_dir)
    rng = random.Random(0)
    staging = output_dir / STAGING_DIR
    kills, mid_write = [], False
    for attempt in range(5):
        before = latest_checkpoint(output_dir)
        process = start(argv)
        if attempt == 0:
            # Sure to land inside a checkpoint write: as soon as a staged checkpoint appears.
            while process.is_alive() and not any(staging.glob("checkpoint-*")):
                time.sleep(0.0005)
        elif attempt < 4:
            # At a random moment of the training loop (it writes a checkpoint every step), once it has resumed.
            while process.is_alive() and latest_checkpoint(output_dir) == before:
                time.sleep(0.001)
            process.join(rng.uniform(0.0, 0.3))
        else:
            process.join(rng.uniform(0.0, duration / 2))  # anywhere, start-up and tower stage included
        if not process.is_alive():
            break  # finished before the kill
        process.kill()
        process.join()
        staged = sorted(path.name for path in staging.glob("checkpoint-*"))
        newest = latest_checkpoint(output_dir)
        kills.append((attempt, newest, staged))
        if staged:
            mid_write = True
            # The half-written checkpoint is not visible: latest stops before it.
            step = int(staged[0].split("-")[1])
            assert newest is None or int(newest.rsplit("-", 1)[1]) < step, kills
    print("kills (attempt, latest checkpoint, staged):", kills)
    assert mid_write, kills
    assert len({newest for _, newest, _ in kills}) >= 3, kills  # the run progressed between the kills

    final = start(argv)
    final.join(120)
    assert final.exitcode == 0, kills
    resumed = load_file(output_dir / "model.safetensors")
    expected = load_file(tmp_path / "unbroken" / "model.safetensors")
    assert resumed.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS
    assert not (output_dir / STAGING_DIR).exists()


def test_latest_is_the_newest_complete_checkpoint_or_a_fresh_start(tmp_path):
    assert resolve_resume("latest", str(tmp_path)) is None
    for step in (2, 10, 9):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / STAGING_DIR / "checkpoint-11").mkdir(parents=True)  # killed while writing
    (tmp_path / "checkpoint-final").mkdir()
    assert resolve_resume("latest", str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert resolve_resume(str(tmp_path / "checkpoint-2"), str(tmp_path)) == str(tmp_path / "checkpoint-2")
    assert resolve_resume(None, str(tmp_path)) is None


def test_two_ranks_write_one_renamed_checkpoint_and_resume_latest(phantom_dir, tmp_path):
    """Under data parallel (2 gloo processes) every rank's files land in the renamed checkpoint, the tower stage runs
    on the main process only, and a `latest` resume loads the stage's saved result instead of training it again."""
    def launch(steps):
        argv = train_argv(phantom_dir, tmp_path)
        argv[argv.index("--max_steps") + 1] = str(steps)
        return accelerate_launch("train_radz.py", [*argv, "--ddp_find_unused_parameters", "True"]).stderr

    first = launch(2)
    assert first.count("tower pretraining {") == 1  # the stage's last log line, from the main process only
    resumed = launch(3)
    assert "resuming with its saved result" in resumed and "tower pretraining {" not in resumed
    names = set(os.listdir(tmp_path / "checkpoint-3"))
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json", "non_adapter_trainable.safetensors"} <= names
    assert latest_checkpoint(tmp_path).endswith("checkpoint-3") and not (tmp_path / STAGING_DIR).exists()
