"""The tower stage of `train_radz.py` runs once (radz/training/tower.py `run_tower_stage`): on the main process,
whose result reaches every data-parallel rank, and not again on resume, where its saved result is loaded.
Tiny model, phantom images (SYNTHETIC)."""

import json
import types

import pytest
import torch

from conftest import free_port, run_script


@pytest.fixture(scope="module")
def phantom_rows(tmp_path_factory):
    from radz.phantom import write_phantom_dataset

    directory = tmp_path_factory.mktemp("phantom_tower")
    write_phantom_dataset(directory, n_train=16, n_validation=2, n_test=2, size=64, seed=0)
    rows = [json.loads(line) for line in (directory / "train.jsonl").read_text().splitlines()]
    return [{"image": str(directory / row["image"]), "report": row["report"]} for row in rows]


def stage_args(output_dir, rank=0, steps=2):
    return types.SimpleNamespace(
        tower_pretraining_steps=steps, tower_pretraining_batch_size=8, tower_pretraining_learning_rate=1e-2, seed=0,
        device="cpu", output_dir=str(output_dir), process_index=rank,
    )  # fmt: skip


def tower_state(model):
    inner = model.llava.model
    state = {f"tower.{k}": v.clone() for k, v in inner.vision_tower.state_dict().items()}
    return state | {f"projector.{k}": v.clone() for k, v in inner.multi_modal_projector.state_dict().items()}


RANKS_SCRIPT = r"""
import json, sys, types
import datasets
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from radz.presets import tiny
from radz.training import tower

def worker(rank, port, output_dir, rows_file):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(rank)  # the ranks start apart: only the broadcast can make them equal
    model, processor = tiny()
    if rank:
        def refuse(*args, **kwargs):
            raise AssertionError("the tower stage ran on rank 1")
        tower.pretrain_vision_tower = refuse
    dataset = datasets.Dataset.from_list(json.load(open(rows_file)))
    args = types.SimpleNamespace(tower_pretraining_steps=2, tower_pretraining_batch_size=8,
                                 tower_pretraining_learning_rate=1e-2, seed=0, device="cpu", output_dir=output_dir,
                                 process_index=rank)
    tower.run_tower_stage(model, processor, dataset, args, resuming=False)
    inner = model.llava.model
    flat = torch.cat([t.flatten().float() for m in (inner.vision_tower, inner.multi_modal_projector)
                      for t in m.state_dict().values()])
    gathered = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1])
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.start_processes(worker, args=(int(sys.argv[1]), sys.argv[2], sys.argv[3]), nprocs=2, start_method="fork")
    print("ok")
"""


def test_the_stage_runs_on_the_main_process_only_and_every_rank_gets_its_result(phantom_rows, tmp_path):
    rows_file = tmp_path / "rows.json"
    rows_file.write_text(json.dumps(phantom_rows))
    output = run_script(tmp_path, RANKS_SCRIPT, str(free_port()), str(tmp_path / "out"), str(rows_file))
    assert output.strip() == "ok"
    assert (tmp_path / "out" / "tower_pretraining.safetensors").is_file()
    assert (tmp_path / "out" / "tower_pretraining.json").is_file()


def test_a_resumed_run_loads_the_saved_stage_instead_of_training_again(phantom_rows, tmp_path, monkeypatch):
    import datasets

    from radz.presets import tiny
    from radz.training import tower

    dataset = datasets.Dataset.from_list(phantom_rows)
    torch.manual_seed(0)
    model, processor = tiny()
    initial = tower_state(model)
    tower.run_tower_stage(model, processor, dataset, stage_args(tmp_path), resuming=False)
    trained = tower_state(model)
    assert any(not torch.equal(initial[k], trained[k]) for k in trained)

    calls = []
    real = tower.pretrain_vision_tower
    monkeypatch.setattr(tower, "pretrain_vision_tower", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    fresh, _ = tiny()
    tower.run_tower_stage(fresh, processor, dataset, stage_args(tmp_path), resuming=True)
    assert calls == []
    for name, tensor in tower_state(fresh).items():
        assert torch.equal(tensor, trained[name]), name

    # Other stage settings than the saved result's: the stage runs again.
    tower.run_tower_stage(fresh, processor, dataset, stage_args(tmp_path, steps=3), resuming=True)
    assert calls == [1]
