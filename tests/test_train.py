"""Training (`train_radz.py`, `radz.training`): end-to-end launch, data parallel with gathered negatives, LoRA,
resume, bad samples, class-balanced sampling.

Tiny model (`--config tiny`, 32-px images), a few dozen samples, a few steps; subprocesses go through
`accelerate launch` as a user would.
"""

import json
import logging
import math
import os
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import REPO, TINY_KNOWLEDGE, run_python

LABELS = ["Cardiomegaly", "Pleural Effusion", "No Finding"]
REPORTS = [
    "the cardiac silhouette is enlarged",
    "blunting of the costophrenic angle, a small effusion",
    "the lungs are clear, no acute abnormality",
]


def write_dataset(root: Path, n: int, name: str = "train.jsonl", seed: int = 0) -> Path:
    """`n` 32-px PNGs of three classes (a bright square, a bright base, nothing) with matching reports and 0/1
    label columns, as JSONL with image paths relative to the file."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        cls = i % 3
        pixels = rng.integers(0, 40, (32, 32)).astype(np.uint8)
        if cls == 0:
            pixels[8:24, 8:24] += 180
        elif cls == 1:
            pixels[22:, :] += 180
        Image.fromarray(pixels).save(root / "img" / f"{name}-{i}.png")
        row = {"image": f"img/{name}-{i}.png", "report": REPORTS[cls]}
        row.update({label: int(cls == k) for k, label in enumerate(LABELS)})
        rows.append(row)
    path = root / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    knowledge = root / "knowledge.json"
    knowledge.write_text(json.dumps(TINY_KNOWLEDGE))
    return {
        "root": root,
        "train": write_dataset(root, 24),
        "valid": write_dataset(root, 9, name="valid.jsonl", seed=1),
        "knowledge": knowledge,
    }


def train_args(data, output_dir, *extra) -> list[str]:
    return [
        "--config", "tiny",
        "--train_file", str(data["train"]),
        "--label_columns", ",".join(LABELS),
        "--knowledge", str(data["knowledge"]),
        "--output_dir", str(output_dir),
        "--lora_r", "4",
        "--lora_dropout", "0",
        "--learning_rate", "3e-3",
        "--logging_steps", "1",
        "--seed", "0",
        "--use_cpu",
        "--dataloader_pin_memory", "False",
        "--report_to", "none",
        *extra,
    ]  # fmt: skip


def launch(args: list[str], processes: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """`accelerate launch train_radz.py ARGS`, on one process (`--cpu`) or several CPU processes (gloo)."""
    mode = ["--cpu"] if processes == 1 else ["--multi_gpu", "--num_processes", str(processes)]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "train_radz.py", *args,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"accelerate launch failed:\n{result.stderr[-5000:]}"
    return result


def log_history(output_dir) -> list[dict]:
    return json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]


def train_losses(output_dir) -> list[dict]:
    return [entry for entry in log_history(output_dir) if "loss" in entry]


def run_in_process(args):
    import train_radz

    return train_radz.main(args)


# ----------------------------------------------------------------------------------------------------------------
# End to end, resume
# ----------------------------------------------------------------------------------------------------------------

E2E_STEPS = ["--max_steps", "9", "--per_device_train_batch_size", "8", "--save_steps", "3"]


@pytest.fixture(scope="module")
def e2e_run(data, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("e2e")
    evaluation = ["--validation_file", str(data["valid"]), "--eval_strategy", "steps", "--eval_steps", "9"]
    launch(train_args(data, output_dir, *E2E_STEPS, *evaluation))
    return output_dir


def test_launch_end_to_end_loss_falls_and_checkpoint_loads(e2e_run, data):
    logs = train_losses(e2e_run)
    assert len(logs) == 9
    for key in ("loss_alignment", "loss_category", "temperature", "retrieval_top1"):
        assert key in logs[0], key
    assert logs[0]["loss"] == pytest.approx(0.5 * logs[0]["loss_alignment"] + 0.5 * logs[0]["loss_category"], rel=1e-3)
    first, last = logs[0]["loss"], np.mean([entry["loss"] for entry in logs[-3:]])
    assert last < first - 0.05, [entry["loss"] for entry in logs]
    evaluation = [entry for entry in log_history(e2e_run) if "eval_mean_auc" in entry]
    assert evaluation and 0.0 <= evaluation[-1]["eval_mean_auc"] <= 1.0
    assert set(evaluation[-1]) >= {f"eval_auc_{label}" for label in LABELS}

    # Checkpoints hold safetensors (adapter + projector/heads) and JSON, no pickled weights or arguments.
    checkpoint = e2e_run / "checkpoint-3"
    names = set(os.listdir(checkpoint))
    assert {"adapter_model.safetensors", "non_adapter_trainable.safetensors", "training_args.json"} <= names
    assert not {"training_args.bin", "pytorch_model.bin", "adapter_model.bin"} & names

    # The final directory is a merged, complete checkpoint loading in a fresh process.
    assert not (e2e_run / "adapter_config.json").exists()
    image = str(data["root"] / "img" / "train.jsonl-0.png")
    out = run_python(
        f"""
import torch
from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained({str(e2e_run)!r}, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained({str(e2e_run)!r}, trust_remote_code=True)
assert sorted(processor.knowledge) == sorted({sorted(TINY_KNOWLEDGE)!r})
with torch.no_grad():
    out = model(**processor(images=[{image!r}], text={REPORTS!r}))
print(out.logits_per_image.shape[1], type(model.llava.model.language_model.layers[0].self_attn.q_proj).__name__)
"""
    )
    assert out.split() == ["3", "Linear"]


def test_resume_reproduces_the_unbroken_run(e2e_run, data, tmp_path):
    """Resume the e2e run from its step-3 checkpoint up to step 9: the weights equal the unbroken run's."""
    output_dir = tmp_path / "resumed"
    resume = ["--resume_from_checkpoint", str(e2e_run / "checkpoint-3")]
    run_in_process(train_args(data, output_dir, *E2E_STEPS, *resume))
    resumed, unbroken = load_file(output_dir / "model.safetensors"), load_file(e2e_run / "model.safetensors")
    assert resumed.keys() == unbroken.keys()
    for name in unbroken:
        torch.testing.assert_close(resumed[name], unbroken[name], atol=1e-5, rtol=1e-4, msg=name)
    # The log history (steps 1–3 restored from the checkpoint, 4–9 trained again) is the unbroken run's.
    resumed_losses = [entry["loss"] for entry in train_losses(output_dir)]
    assert resumed_losses == pytest.approx([entry["loss"] for entry in train_losses(e2e_run)], rel=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Data parallel: gathered negatives
# ----------------------------------------------------------------------------------------------------------------

DDP_ARGS = [
    "--max_steps", "2", "--save_strategy", "no", "--train_sampling_strategy", "sequential",
    "--ddp_find_unused_parameters", "True",
]  # fmt: skip


def test_two_processes_equal_one_process_with_the_global_batch(data, tmp_path):
    run_in_process(train_args(data, tmp_path / "one", *DDP_ARGS, "--per_device_train_batch_size", "8"))
    one = train_losses(tmp_path / "one")[0]

    launch(train_args(data, tmp_path / "two", *DDP_ARGS, "--per_device_train_batch_size", "4"), processes=2)
    two = train_losses(tmp_path / "two")[0]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)
    assert two["loss_category"] == pytest.approx(one["loss_category"], rel=1e-4)
    # The gradient too: DDP averages the per-rank gradients of the shards, scaled by the world size.
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-3)

    # Without gathering each rank sees 4 pairs only: the loss differs, so the comparison above can fail.
    launch(
        train_args(data, tmp_path / "local", *DDP_ARGS, "--per_device_train_batch_size", "4",
                   "--gather_negatives", "False"),
        processes=2,
    )  # fmt: skip
    local = train_losses(tmp_path / "local")[0]
    assert abs(local["loss"] - one["loss"]) > 1e-2


# ----------------------------------------------------------------------------------------------------------------
# LoRA: what trains, merge
# ----------------------------------------------------------------------------------------------------------------


def _tiny_trainer(data, output_dir, model, processor, dataset, label_names, steps=3):
    from radz.training import AnchorBank, RadZCollator, RadZTrainer, RadZTrainingArguments

    args = RadZTrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-2,
        use_cpu=True, dataloader_pin_memory=False, report_to="none", save_strategy="no", logging_steps=1,
        max_bad_fraction=0.2, bad_check_min_samples=4,
    )  # fmt: skip
    collator = RadZCollator(processor, args.max_bad_fraction, args.bad_check_min_samples, fallback_dataset=dataset)
    return RadZTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator, processing_class=processor,
        anchor_bank=AnchorBank(processor, label_names, per_step=1),
    )  # fmt: skip


def test_lora_trains_adapter_projector_heads_and_token_rows_only(data, tmp_path, tiny_model, caplog):
    from radz.training import DataArguments, ModelArguments, load_training_data, merged_model, prepare_for_training

    model, processor = tiny_model
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    peft_model = prepare_for_training(model, ModelArguments(config="tiny", lora_r=4, lora_dropout=0.0))
    args = DataArguments(train_file=str(data["train"]), label_columns=",".join(LABELS))
    dataset, label_names = load_training_data(args, "train")
    # One corrupt image among 24: skipped with a warning naming it, and the run goes on.
    corrupt = data["root"] / "img" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    dataset = dataset.add_item({"image": str(corrupt), "report": REPORTS[0], "labels": [1.0, 0.0, 0.0]})
    trainer = _tiny_trainer(data, tmp_path, peft_model, processor, dataset, label_names)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert [path for path, _ in trainer.data_collator.bad_log.bad] == [str(corrupt)]
    assert str(corrupt) in caplog.text

    inputs = processor(images=[data["root"] / "img" / "train.jsonl-1.png"], text=REPORTS)
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(**inputs).logits_per_image
    merged = merged_model(peft_model)
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits_per_image, adapted, atol=1e-5, rtol=1e-5)

    after = merged.state_dict()
    assert after.keys() == before.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    token_ids = model.config.image_cls_token_ids + model.config.text_cls_token_ids
    embed = "llava.model.language_model.embed_tokens.weight"
    lora_names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for name in changed:
        trainable = (
            name.startswith(("llava.model.multi_modal_projector.", "image_", "text_", "anchor_head.", "logit_scale"))
            or (name.startswith("llava.model.language_model.layers.") and name.split(".")[-2] in lora_names)
            or name == embed
        )
        assert trainable, f"{name} changed but should be frozen"
    assert not any(name.startswith("llava.model.vision_tower.") for name in changed)
    assert "llava.model.multi_modal_projector.linear_1.weight" in changed and "logit_scale" in changed
    assert "llava.model.language_model.layers.0.self_attn.q_proj.weight" in changed  # LoRA merged in
    rows_changed = (before[embed] != after[embed]).any(dim=1).nonzero().flatten().tolist()
    assert rows_changed and set(rows_changed) <= set(token_ids)


@pytest.mark.parametrize("train_llm", [False, True])
def test_without_lora_only_token_rows_or_the_whole_llm_train(tiny_model, train_llm):
    from radz.training import ModelArguments, prepare_for_training

    model, _ = tiny_model
    prepared = prepare_for_training(model, ModelArguments(config="tiny", lora_r=0, train_llm=train_llm))
    trainable = {name for name, param in prepared.named_parameters() if param.requires_grad}
    in_llm = {name for name in trainable if ".language_model." in name}
    assert not any("vision_tower" in name for name in trainable)
    assert any("multi_modal_projector" in name for name in trainable) and any("logit_scale" in n for n in trainable)
    if train_llm:
        assert in_llm == {f"llava.model.language_model.{n}" for n, _ in model.llava.model.language_model.named_parameters()}
    else:
        assert len(in_llm) == 1 and "embed_tokens" in next(iter(in_llm)) and "trainable_tokens_delta" in next(iter(in_llm))


# ----------------------------------------------------------------------------------------------------------------
# Bad samples
# ----------------------------------------------------------------------------------------------------------------


def test_bad_samples_are_dropped_counted_and_stop_the_run_over_the_threshold(data, tmp_path, tiny_model, caplog):
    import datasets

    from radz.training import BadDataError, RadZCollator, scan_dataset

    _, processor = tiny_model
    good = [{"image": str(data["root"] / "img" / f"train.jsonl-{i}.png"), "report": REPORTS[i % 3]} for i in range(6)]
    corrupt = tmp_path / "truncated.png"
    corrupt.write_bytes((data["root"] / "img" / "train.jsonl-0.png").read_bytes()[:60])
    missing, empty = str(tmp_path / "missing.png"), good[0]["image"]
    rows = good + [
        {"image": missing, "report": "a report"},
        {"image": empty, "report": "   "},
        {"image": str(corrupt), "report": "a report"},
    ]
    dataset = datasets.Dataset.from_list(rows)

    # Up front: missing files and empty reports go, without decoding; the corrupt file is not detectable yet.
    kept, dropped = scan_dataset(dataset, max_bad_fraction=0.5)
    assert len(kept) == 7
    assert dropped == [(missing, "image file not found"), (empty, "empty report")]
    with pytest.raises(BadDataError, match=r"2 of 9 rows of the dataset are bad.*missing\.png"):
        scan_dataset(dataset, max_bad_fraction=0.1)

    # In the collator: the corrupt image is skipped, named in a warning and counted; the batch goes on.
    collator = RadZCollator(processor, max_bad_fraction=0.5, min_samples=4)
    with caplog.at_level(logging.WARNING):
        batch = collator([kept[i] for i in range(len(kept))])
    assert batch["pixel_values"].shape[0] == batch["input_ids"].shape[0] == 6
    assert collator.bad_log.seen == 7 and [p for p, _ in collator.bad_log.bad] == [str(corrupt)]
    assert str(corrupt) in caplog.text

    # Over the threshold: a clear error with the count and the path.
    strict = RadZCollator(processor, max_bad_fraction=0.05, min_samples=4)
    with pytest.raises(BadDataError, match=r"1 of 7 samples seen so far are bad \(14\.3% > .*truncated\.png"):
        strict([kept[i] for i in range(len(kept))])
    # Below the minimum count only the end of an epoch enforces it.
    small = RadZCollator(processor, max_bad_fraction=0.05, min_samples=20)
    small([kept[i] for i in (0, 6)])
    with pytest.raises(BadDataError, match="1 of 2"):
        small.bad_log.check(final=True)


# ----------------------------------------------------------------------------------------------------------------
# Class-balanced sampling, data loading, CLI
# ----------------------------------------------------------------------------------------------------------------


def test_balanced_sampler_gives_even_class_counts_per_epoch():
    from radz.training import BalancedClassSampler, balance_keys

    # 80 normal (no positive), 15 effusion, 4 cardiomegaly, 1 with both (counts for the rarer: cardiomegaly).
    labels = [[0, 0]] * 80 + [[0, 1]] * 15 + [[1, 0]] * 4 + [[1, 1]] + [[math.nan, 1]]
    keys = balance_keys(labels)
    assert Counter(keys.tolist()) == {2: 80, 1: 16, 0: 5}
    sampler = BalancedClassSampler(keys, seed=3)
    epoch0 = list(sampler)
    assert len(epoch0) == len(labels)
    counts = Counter(keys[epoch0].tolist())
    assert max(counts.values()) - min(counts.values()) <= 1, counts
    # Rare members are all used before any repeats; the order depends on the seed and the epoch only.
    assert set(np.flatnonzero(keys == 0)) <= set(epoch0)
    assert list(BalancedClassSampler(keys, seed=3)) == epoch0
    sampler.set_epoch(1)
    assert list(sampler) != epoch0


def test_balance_classes_flag_uses_the_balanced_sampler(data, tmp_path, tiny_model):
    from radz.training import BalancedClassSampler, DataArguments, RadZTrainer, RadZTrainingArguments
    from radz.training import load_training_data

    model, processor = tiny_model
    data_args = DataArguments(train_file=str(data["train"]), label_columns=",".join(LABELS))
    dataset, _ = load_training_data(data_args, "train")
    args = RadZTrainingArguments(output_dir=str(tmp_path), balance_classes=True, use_cpu=True, report_to="none")
    sampler = RadZTrainer(model=model, args=args, train_dataset=dataset)._get_train_sampler()
    assert isinstance(sampler, BalancedClassSampler) and len(sampler) == len(dataset)


def test_load_split_reads_csv_label_columns_and_jsonl_label_lists(tmp_path):
    from radz.training import DataArguments, load_training_data

    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "data.csv").write_text("path,text,Effusion,Edema\na.png,some report,1,\n/abs/b.png,,0,-1\n")
    args = DataArguments(train_file=str(tmp_path / "data.csv"), image_column="path", report_column="text",
                         label_columns="Effusion,Edema")  # fmt: skip
    ds, names = load_training_data(args, "train")
    assert names == ["Effusion", "Edema"]
    assert ds["image"] == [str(tmp_path / "a.png"), "/abs/b.png"]
    assert ds["report"] == ["some report", ""]
    np.testing.assert_array_equal(np.array(ds["labels"]), [[1, np.nan], [0, np.nan]])

    (tmp_path / "data.jsonl").write_text(json.dumps({"image": "a.png", "report": "r", "labels": [1, None]}) + "\n")
    ds, names = load_training_data(DataArguments(train_file=str(tmp_path / "data.jsonl"), class_names="A,B"), "train")
    assert names == ["A", "B"] and np.isnan(ds["labels"][0][1])
    with pytest.raises(ValueError, match="--class_names"):
        load_training_data(DataArguments(train_file=str(tmp_path / "data.jsonl")), "train")


def test_generate_knowledge_subcommand_dispatches(monkeypatch):
    import train_radz

    seen = []
    fake = types.ModuleType("radz.knowledge.cli")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "radz.knowledge.cli", fake)
    assert train_radz.main(["generate-knowledge", "--categories", "Effusion"]) == 0
    assert seen == [["--categories", "Effusion"]]


def test_vision_learning_rate_gives_the_tower_and_projector_their_own_group(tmp_path, tiny_model):
    from radz.training import RadZTrainer, RadZTrainingArguments

    model, _ = tiny_model
    args = RadZTrainingArguments(
        output_dir=str(tmp_path), learning_rate=1e-4, vision_learning_rate=3e-3, use_cpu=True, report_to="none"
    )
    optimizer = RadZTrainer(model=model, args=args).create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    by_lr = {}
    for group in optimizer.param_groups:
        by_lr.setdefault(group["lr"], set()).update(names[id(p)] for p in group["params"])
    assert set(by_lr) == {1e-4, 3e-3}
    assert all("vision_tower" in n or "multi_modal_projector" in n for n in by_lr[3e-3])
    assert any("multi_modal_projector" in n for n in by_lr[3e-3])
    assert not any("vision_tower" in n or "multi_modal_projector" in n for n in by_lr[1e-4])
    assert sum(len(v) for v in by_lr.values()) == sum(p.requires_grad for p in model.parameters())
