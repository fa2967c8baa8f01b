"""Checkpoints that survive preemption.

A SIGKILL (a preempted node, an out-of-memory kill) can land while the Trainer writes `checkpoint-N`. So the
trainer writes every checkpoint under `output_dir/.tmp-checkpoints/` and renames it to `output_dir/checkpoint-N`
only when every rank has finished writing: a `checkpoint-N` is always complete, and `--resume_from_checkpoint
latest` (or the Trainer's own `True`) takes the newest one. A half-written checkpoint stays under the temporary name
and is deleted by the next save.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

logger = logging.getLogger(__name__)

STAGING_DIR = ".tmp-checkpoints"
LATEST = "latest"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The `checkpoint-N` with the largest N in `output_dir` (every one is complete), or None."""
    folder = Path(output_dir)
    steps = {}
    if folder.is_dir():
        for path in folder.iterdir():
            match = _CHECKPOINT.match(path.name)
            if match and path.is_dir():
                steps[int(match.group(1))] = path
    return str(steps[max(steps)]) if steps else None


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str) -> str | None:
    """`--resume_from_checkpoint`: `latest` becomes the newest complete checkpoint of `output_dir`, or None (a
    fresh start) when it has none yet, so that the same command starts and resumes a preemptible run."""
    if resume_from_checkpoint != LATEST:
        return resume_from_checkpoint
    found = latest_checkpoint(output_dir)
    logger.info("--resume_from_checkpoint latest: %s", found or f"no checkpoint in {output_dir} yet, starting fresh")
    return found


def clear_staging(run_dir: str) -> None:
    """Delete what a killed save left under the temporary name."""
    shutil.rmtree(Path(run_dir) / STAGING_DIR, ignore_errors=True)


def publish_checkpoint(run_dir: str, step: int, state: TrainerState, save_total_limit: int | None) -> str:
    """Rename the finished `.tmp-checkpoints/checkpoint-<step>` to `checkpoint-<step>`, then rotate old ones.

    The Trainer wrote the checkpoint while it believed `.tmp-checkpoints` to be the run directory: a best-model path
    pointing there is corrected, in the trainer state and in the checkpoint's own copy, before the rename.
    """
    name = f"{PREFIX_CHECKPOINT_DIR}-{step}"
    staged, final = Path(run_dir) / STAGING_DIR / name, Path(run_dir) / name
    if state.best_model_checkpoint == str(staged):
        state.best_model_checkpoint = str(final)
        state.save_to_json(str(staged / TRAINER_STATE_NAME))
    if final.exists():  # the same step saved again (a resumed run); the new copy is as complete
        shutil.rmtree(final)
    os.replace(staged, final)
    os.rmdir(staged.parent)
    rotate_checkpoints(run_dir, save_total_limit, state.best_model_checkpoint, use_mtime=True)
    return str(final)
