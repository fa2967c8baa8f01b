"""Cost of a LLaVA-RadZ training step against plain LLaVA fine-tuning on the same batch.

For each model size, one fresh process per measurement (so peak RSS belongs to that measurement alone):
- `dfat`: the DFAT step of `RadZTrainer` with λ = 1 — image pass + text pass + L_CA + backward + AdamW;
- `dfat+cg` (K descriptions): the full step with λ = 0.5 — plus the DKAM anchors re-encoded with gradients from
  K descriptions per category (14 categories), and L_CG;
- `llava`: `LlavaForConditionalGeneration` forward with labels over `[image tokens] + prompt + report`, backward,
  AdamW — the causal-LM (SFT) step one would otherwise run.
All use the same trainable setup (vision tower frozen, projector trainable, LoRA r=16 on every LLM linear layer).

Models have RANDOM weights (timings do not depend on them):
- tiny: CLIP hidden 32 × 2 layers at 32 px / patch 8; Llama hidden 32 × 2 layers, vocab ~530;
- demo: CLIP hidden 256 × 4 layers at 128 px / patch 16 (64 image tokens); Llama hidden 576 × 8 layers, 9 heads,
  3 kv heads, intermediate 1536, vocab 49152 (SmolLM2-135M's shape, first 8 layers).
Batch 8, reports of 60 tokens.

    python benchmarks/bench_train.py            # 10 timed rounds after 2 warm-up steps
    python benchmarks/bench_train.py --quick    # 3 timed rounds after 1 warm-up step

Timing runs the four steps of a size interleaved in one process; peak RSS comes from a separate process per step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BATCH = 8
REPORT_TOKENS = 60
CATEGORIES = [
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
]  # fmt: skip
DESCRIPTIONS_PER_CATEGORY = 6
MEASUREMENTS = ["llava", "dfat", "dfat+cg:1", "dfat+cg:4"]


def build(size: str):
    """(LlavaRadZ model, processor) of the given size, random weights."""
    from transformers import CLIPVisionConfig, LlamaConfig

    from modeling_llava_radz import LlavaRadZForZeroShotClassification
    from radz import presets

    if size == "tiny":
        return presets.tiny(num_cls_tokens=8)
    processor = presets.build_processor(presets.build_tokenizer(), image_size=128, patch_size=16, num_cls_tokens=8)
    vision = CLIPVisionConfig(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=128,
        patch_size=16,
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=9, num_key_value_heads=3,
        max_position_embeddings=2048, pad_token_id=processor.tokenizer.pad_token_id,
    )  # fmt: skip
    config = presets.config_for_processor(processor, vision, text, projection_dim=256)
    config.text_config.vocab_size = 49152  # SmolLM2's vocabulary; the tokenizer uses its first ids only
    return LlavaRadZForZeroShotClassification(config), processor


def make_batch(processor, image_size: int):
    """A collated batch of `BATCH` random images and `REPORT_TOKENS`-token reports, with labels."""
    import numpy as np
    import torch
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (image_size, image_size), dtype=np.uint8)) for _ in range(BATCH)]
    from radz.presets import TOKENIZER_CORPUS

    words = processor.tokenizer(" ".join(TOKENIZER_CORPUS * 4), add_special_tokens=False)["input_ids"]
    reports = [processor.tokenizer.decode(words[i * 7 : i * 7 + REPORT_TOKENS]) for i in range(BATCH)]
    batch = dict(processor(images=images, text=reports))
    labels = torch.zeros(BATCH, len(CATEGORIES))
    labels[torch.arange(BATCH), torch.arange(BATCH) % len(CATEGORIES)] = 1.0
    batch["labels"] = labels
    return batch, reports, images


def knowledge():
    return {
        name: {"synonyms": [], "descriptions": [f"{name}: radiographic sign number {k} of {name.lower()}"
                                                for k in range(DESCRIPTIONS_PER_CATEGORY)]}
        for name in CATEGORIES
    }  # fmt: skip


def radz_step_fn(size: str, per_step: int | None):
    """A closure running one RadZTrainer step (compute_loss, backward, AdamW); per_step None = L_CA only."""
    import torch

    from radz.training import AnchorBank, ModelArguments, RadZTrainer, RadZTrainingArguments, prepare_for_training

    model, processor = build(size)
    processor.set_knowledge(knowledge())
    model.config.dkam_lambda = 1.0 if per_step is None else 0.5
    model = prepare_for_training(model, ModelArguments(config=size, lora_r=16, lora_dropout=0.0))
    args = RadZTrainingArguments(output_dir="/tmp/bench_train", use_cpu=True, report_to="none")
    bank = None if per_step is None else AnchorBank(processor, CATEGORIES, per_step=per_step)
    trainer = RadZTrainer(model=model, args=args, anchor_bank=bank)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch, _, _ = make_batch(processor, processor.image_processor.crop_size["height"])
    model.train()

    def step():
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step, model


def llava_step_fn(size: str):
    """A closure running one causal-LM step of the wrapped LLaVA on the same images and reports."""
    import torch
    from peft import LoraConfig, get_peft_model

    from radz.training.args import DEFAULT_LORA_TARGETS

    radz, processor = build(size)
    llava = radz.llava
    llava.requires_grad_(False)
    targets = "|".join(DEFAULT_LORA_TARGETS.split(","))
    model = get_peft_model(llava, LoraConfig(r=16, lora_alpha=32, target_modules=rf"model\.language_model\..*\.({targets})"))
    llava.model.multi_modal_projector.requires_grad_(True)
    _, reports, images = make_batch(processor, processor.image_processor.crop_size["height"])
    image_part = processor.image_prompt_ids()[: -processor.num_cls_tokens]  # image tokens + prompt, no <ImgCls_*>
    sequences = [image_part + processor.tokenizer(r, add_special_tokens=False)["input_ids"] for r in reports]
    input_ids, attention_mask = processor.pad_sequences(sequences)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, : len(image_part)] = -100  # the loss covers the report tokens
    pixel_values = processor(images=images)["pixel_values"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step():
        loss = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step, model


def step_fn(size: str, what: str):
    if what == "llava":
        return llava_step_fn(size)
    return radz_step_fn(size, None if what == "dfat" else int(what.split(":")[1]))


def time_steps(size: str, warmup: int, rounds: int) -> dict:
    """Seconds per step of every measurement, its steps interleaved round-robin so that load from other processes
    on a shared machine hits all of them alike. Returns {what: (fastest, median)}."""
    import torch

    torch.manual_seed(0)
    steps = {what: step_fn(size, what)[0] for what in MEASUREMENTS}
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {what: [] for what in MEASUREMENTS}
    for _ in range(rounds):
        for what, step in steps.items():
            start = time.perf_counter()
            step()
            times[what].append(time.perf_counter() - start)
    return {what: (min(t), statistics.median(t)) for what, t in times.items()}


def peak_memory(size: str, what: str) -> dict:
    """Peak RSS of a process that builds one model and runs two steps; parameter counts."""
    import torch

    torch.manual_seed(0)
    step, model = step_fn(size, what)
    step()
    step()
    return {
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "trainable_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
    }


def child(*args: str) -> dict:
    """Run this script with `args` in a fresh process; return the JSON it prints."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 warm-up step and 3 timed rounds")
    parser.add_argument("--sizes", default="tiny,demo")
    # Child processes: one timing process per size, one memory process per measurement.
    parser.add_argument("--time", metavar="SIZE", help=argparse.SUPPRESS)
    parser.add_argument("--memory", nargs=2, metavar=("SIZE", "WHAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    warmup, rounds = (1, 3) if args.quick else (2, 10)
    if args.time:
        print(json.dumps(time_steps(args.time, warmup, rounds)))
        return
    if args.memory:
        print(json.dumps(peak_memory(*args.memory)))
        return

    import torch

    print(f"batch {BATCH}, reports {REPORT_TOKENS} tokens, {len(CATEGORIES)} categories; random weights; "
          f"{torch.get_num_threads()} threads; fastest and median step of {rounds} interleaved rounds")  # fmt: skip
    print(f"{'model':6} {'step':16} {'s/step':>7} {'median':>7} {'vs llava':>9} {'peak RSS GiB':>13} {'params M':>9} "
          f"{'trainable M':>12}")  # fmt: skip
    for size in args.sizes.split(","):
        timing = child("--time", size, *(["--quick"] if args.quick else []))
        for what in MEASUREMENTS:
            memory = child("--memory", size, what)
            fastest, median = timing[what]
            label = {"llava": "llava causal-LM", "dfat": "dfat (L_CA)"}.get(what, what.replace("dfat+cg:", "dfat+L_CG K="))
            print(
                f"{size:6} {label:16} {fastest:7.3f} {median:7.3f} {fastest / timing['llava'][0]:9.2f} "
                f"{memory['peak_rss_gib']:13.2f} {memory['params_m']:9.1f} {memory['trainable_m']:12.2f}"
            )


if __name__ == "__main__":
    main()
