"""Distributed evaluation (radz/evaluation/distributed.py): `accelerate launch evaluate_radz.py` on 2 gloo processes
gives the metrics and predictions of 1 process, and its sharded chunks resume. Tiny checkpoint, phantom images
(SYNTHETIC)."""

import json
from pathlib import Path

import pandas as pd
import pytest

import evaluate_radz
from conftest import REPO, accelerate_launch, free_port, run_script

LABELS = "Pneumothorax,No Finding,Cardiomegaly"


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


# ----------------------------------------------------------------------------------------------------------------
# Engines: FSDP on 2 gloo processes, the shipped accelerate and DeepSpeed configurations
# ----------------------------------------------------------------------------------------------------------------

CONFIGS = REPO / "configs" / "accelerate"

# The tiny model under real torch FSDP (version 1, as FullyShardedDataParallel with use_orig_params, and version 2,
# fully_shard), each rank holding half of the batch and the gathering loss module: loss and gradients equal one
# process with the whole batch. FSDP shards the parameters, not the batch, and averages the gradients like DDP.
FSDP_SCRIPT = r"""
import copy, sys
import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from loss_llava_radz import LlavaRadZLoss
from radz.presets import tiny

REPORTS = ["the heart is enlarged", "clear lungs", "small effusion at the base", "no acute abnormality",
           "a nodule in the right upper lobe", "interstitial edema"]


def worker(rank, port, version):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model, processor = tiny(category_loss="sigmoid")  # a one-element bias parameter too
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in REPORTS]
    inputs = dict(processor(images=images, text=REPORTS))
    anchors = processor(text=["an enlarged heart", "fluid at the base"])
    inputs.update(anchor_input_ids=anchors["input_ids"], anchor_attention_mask=anchors["attention_mask"],
                  anchor_category_ids=torch.tensor([0, 1]),
                  labels=torch.tensor([[1, 0], [0, 0], [0, 1], [0, 0], [float("nan"), 0], [1, 1]]))
    whole = copy.deepcopy(model)
    expected = whole(**inputs, return_loss=True)
    expected.loss.backward()

    model.loss_fn = LlavaRadZLoss(rank=rank, world_size=2)
    if version == "1":
        sharded = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                                           use_orig_params=True, device_id=torch.device("cpu"))
    else:
        for layer in model.llava.model.language_model.layers:
            fully_shard(layer)
        sharded = fully_shard(model)
    rows = slice(3 * rank, 3 * rank + 3)
    local = {k: (v[rows] if not k.startswith("anchor_") else v) for k, v in inputs.items()}
    out = sharded(**local, return_loss=True)
    out.loss.backward()
    torch.testing.assert_close(out.loss, expected.loss)
    torch.testing.assert_close(out.loss_category, expected.loss_category)

    def full_gradients():
        for (name, p), q in zip(model.named_parameters(), whole.parameters()):
            if q.grad is not None:
                grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                yield name, grad, q.grad

    if version == "1":
        with FullyShardedDataParallel.summon_full_params(sharded, with_grads=True):
            compared = [(n, g.clone(), e) for n, g, e in full_gradients()]
    else:
        compared = list(full_gradients())
    for name, grad, reference in compared:
        torch.testing.assert_close(grad, reference, atol=1e-5, rtol=1e-4, msg=lambda detail: f"{name}: {detail}")
    assert len(compared) > 40, len(compared)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.start_processes(worker, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2, start_method="fork")
    print("ok")
"""


@pytest.mark.parametrize("version", ["1", "2"])
def test_fsdp_on_two_gloo_processes_equals_one_process_on_loss_and_gradients(tmp_path, version):
    assert run_script(tmp_path, FSDP_SCRIPT, str(free_port()), version).strip() == "ok"


@pytest.mark.parametrize(
    "name, engine", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED"),
                     ("deepspeed_zero3", "DEEPSPEED")],
)  # fmt: skip
def test_accelerate_loads_every_shipped_config(name, engine):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert str(config.distributed_type).endswith(engine)
    assert (config.num_machines, config.num_processes) == (1, 8)
    if engine == "DEEPSPEED":
        assert (REPO / config.deepspeed_config["deepspeed_config_file"]).is_file()
        assert config.deepspeed_config["zero3_init_flag"] is False
    else:
        assert config.mixed_precision == "bf16"


def test_the_fsdp_config_becomes_a_transformer_wrapped_sharded_bf16_plugin(monkeypatch):
    """The launcher's own translation of fsdp.yaml into the environment, read back by accelerate's FSDP plugin."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / "fsdp.yaml"), "train_radz.py"])
    args = _validate_launch_command(args)[0]
    assert args.use_fsdp and args.mixed_precision == "bf16"
    for key, value in prepare_multi_gpu_env(args).items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert str(plugin.state_dict_type).endswith("SHARDED_STATE_DICT")
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"


@pytest.fixture
def deepspeed_config_class(monkeypatch):
    """DeepSpeed's config parser, answered "one process, rank 0" when it asks for the world size (on a CPU machine
    DeepSpeed's own communication layer first compiles a shared-memory kernel)."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime import config

    monkeypatch.setattr(config.dist, "get_rank", lambda *args, **kwargs: 0)
    monkeypatch.setattr(config.dist, "get_world_size", lambda *args, **kwargs: 1)
    return config.DeepSpeedConfig


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_parses_the_shipped_configs_once_the_trainer_fills_them(stage, tmp_path, deepspeed_config_class):
    """The Trainer fills the "auto" entries (batch sizes, precision, bucket sizes from the model's hidden size),
    then DeepSpeed's own parser (`DeepSpeedConfig`, strict about unknown ZeRO keys) reads the result."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    from radz.presets import tiny
    from radz.training import RadZTrainingArguments

    path = CONFIGS / f"deepspeed_zero{stage}.json"
    args = RadZTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8,
                                 gradient_accumulation_steps=2, bf16=False, use_cpu=True, report_to="none")
    model, _ = tiny()  # before the ZeRO-3 config exists: transformers would build it under deepspeed.zero.Init
    filled = HfTrainerDeepSpeedConfig(str(path))
    try:
        filled.trainer_config_process(args)
        filled.trainer_config_finalize(args, model, num_training_steps=10)
        parsed = deepspeed_config_class(filled.config)
    finally:
        unset_hf_deepspeed_config()  # later tests must not see a ZeRO-3 run
    assert parsed.zero_optimization_stage == stage
    assert (parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) == (8, 2)
    if stage == 3:
        assert parsed.zero_config.gather_16bit_weights_on_model_save is True


def test_in_training_evaluation_under_sharded_parameters_is_refused_with_the_way_out(tiny_model, tmp_path):
    from radz.training import RadZTrainer, RadZTrainingArguments

    model, processor = tiny_model
    args = RadZTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = RadZTrainer(model=model, args=args, processing_class=processor, eval_dataset=[{"image": "x"}],
                          eval_label_names=["Cardiomegaly"])
    trainer.is_fsdp_enabled = True  # what accelerate sets under fsdp.yaml (GPU machines only)
    with pytest.raises(ValueError, match="sharded by FSDP or ZeRO-3.*--eval_strategy no"):
        trainer.evaluate()
