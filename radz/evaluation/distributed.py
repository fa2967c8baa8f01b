"""Evaluation on several processes: `accelerate launch evaluate_radz.py ...` (or `torchrun`) shards the images.

The prediction chunks of a split are dealt out to the processes in turn (chunk i to process i mod world size), each
process scores its own chunks (reusing finished ones, as a single process does), and the main process gathers the
predictions of every chunk, in order, computes the metrics and writes the outputs. A chunk's file name does not
depend on the number of processes, so a run resumes with any number of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pandas as pd
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    """This process's share of the work: chunk `i` belongs to process `i % world_size`."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def chunks(self, n_chunks: int) -> range:
        """The indices of this process's chunks."""
        return range(self.rank, n_chunks, self.world_size)

    def gather(self, frames: dict[int, pd.DataFrame], stats) -> list[pd.DataFrame] | None:
        """Every process's `{chunk index: predictions}` on the main process, in chunk order, with `stats` (a
        `ScoringStats`) summed over the processes there; None on the other processes."""
        if self.world_size == 1:
            return [frames[index] for index in sorted(frames)]
        counts = (stats.images_scored, stats.images_resumed, stats.seconds, stats.prepare_seconds)
        gathered = [None] * self.world_size if self.is_main else None
        dist.gather_object((frames, counts), gathered, dst=0)
        if not self.is_main:
            # The counts now belong to the main process; a later split (the same `stats`) sends only its own.
            stats.images_scored = stats.images_resumed = stats.seconds = stats.prepare_seconds = 0
            return None
        merged = {index: frame for part, _ in gathered for index, frame in part.items()}
        stats.images_scored, stats.images_resumed = (sum(c[k] for _, c in gathered) for k in (0, 1))
        stats.seconds, stats.prepare_seconds = (max(c[k] for _, c in gathered) for k in (2, 3))  # wall clock
        return [merged[index] for index in sorted(merged)]


def current_shard() -> Shard:
    """The shard of this process. Under a launcher (`WORLD_SIZE` > 1) the process group is started through
    accelerate, on the process's own GPU with NCCL, or with gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Shard()
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes != world_size:  # every process would score every image
        raise RuntimeError(f"WORLD_SIZE is {world_size} but accelerate started {state.num_processes} process(es)")
    return Shard(state.process_index, state.num_processes)
