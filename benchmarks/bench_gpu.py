"""GPU figures of a 7B LLaVA-RadZ, ready to run on one GPU: a LLaVA-1.5-7B-shaped model built from config (CLIP
ViT-L/14 at 336 px, 576 image tokens; a Llama-2-7B-shaped LLM, vocabulary 32,064) with RANDOM weights, in bf16,
no hub access. Speed and memory do not depend on the weights' values.

It prints, side by side in one run:
- pipeline images/s: the zero-shot pipeline at batch 32 over 14 labels (label embeddings cached, as in use);
- the DFAT + DKAM training step (image pass, report pass, the 14 category anchors from one description each,
  L_CA + L_CG; LoRA r=16 on the LLM, gradient checkpointing, AdamW) at `--train_batch` per GPU: seconds per step
  and peak memory;
- the same for the LLaVA causal-LM step (image + prompt + report with next-token labels, same LoRA, same
  checkpointing), the denominator of the ratio: what fine-tuning LLaVA itself costs on the same data.

    python benchmarks/bench_gpu.py                 # 7B on cuda (about 16 GB of weights + activations)
    python benchmarks/bench_gpu.py --tiny          # the test preset's shape, on CPU (the suite runs this)
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import CLIPVisionConfig, LlamaConfig  # noqa: E402

from benchmarks.bench_pipeline import LABELS, write_images  # noqa: E402

REPORT = (
    "FINDINGS: The cardiac silhouette is enlarged. There is blunting of the left costophrenic angle with a small "
    "pleural effusion. No pneumothorax. IMPRESSION: Cardiomegaly and a small left effusion."
)
# LLaVA-1.5-7B: openai/clip-vit-large-patch14-336 + Vicuna-7B v1.5 (Llama-2-7B), vocabulary 32,000 + <image> + pad,
# padded to 32,064 by transformers' conversion.
SHAPES = {
    "7b": dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, projection_dim=768),
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, max_position_embeddings=4096),
        vocab=32064,
    ),
    "tiny": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    image_size=32, patch_size=8),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=2048),
        vocab=1024,
    ),
}  # fmt: skip


def build_config(shape: str):
    """(LlavaRadZConfig, processor) of a shape; the processor's small BPE tokenizer uses the first ids only."""
    from radz.presets import build_processor, build_tokenizer, config_for_processor

    spec = SHAPES[shape]
    vision = CLIPVisionConfig(**spec["vision"])
    processor = build_processor(build_tokenizer(), vision.image_size, vision.patch_size, num_cls_tokens=8)
    tokenizer = processor.tokenizer
    text = LlamaConfig(
        **spec["text"], pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    config = config_for_processor(processor, vision, text, projection_dim=512 if shape == "7b" else 32)
    config.text_config.vocab_size = spec["vocab"]
    return config, processor


def build_model(shape: str, device: torch.device, dtype: torch.dtype):
    from modeling_llava_radz import LlavaRadZForZeroShotClassification

    config, processor = build_config(shape)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlavaRadZForZeroShotClassification(config)
    finally:
        torch.set_default_dtype(previous)
    for name, module in model.named_children():  # the heads in float32, as from_llava keeps them
        if name != "llava":
            module.float()
    model.logit_scale.data = model.logit_scale.data.float()
    return model.eval(), processor


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # CPU: the process's peak RSS


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def pipeline_images_per_second(model, processor, paths, batch_size, device) -> float:
    from pipeline_llava_radz import LlavaRadZZeroShotImageClassificationPipeline

    clf = LlavaRadZZeroShotImageClassificationPipeline(model=model, processor=processor, device=device)
    options = {"candidate_labels": LABELS, "batch_size": batch_size}
    clf(paths[:batch_size], **options)  # warm-up; the label embeddings are cached from here on
    synchronize(device)
    start = time.perf_counter()
    clf(paths, **options)
    synchronize(device)
    return len(paths) / (time.perf_counter() - start)


def lora_model(model, lora_r: int):
    from radz.training import ModelArguments, prepare_for_training

    peft_model = prepare_for_training(model, ModelArguments(config="benchmark", lora_r=lora_r, lora_dropout=0.0))
    peft_model.gradient_checkpointing_enable()
    return peft_model.train()


def time_steps(step, steps: int, device) -> tuple[float, float]:
    """(seconds per step, peak memory in GiB) over `steps` steps after one warm-up step."""
    step()
    synchronize(device)
    reset_peak(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps, peak_memory_gib(device)


def dfat_step_fn(peft_model, processor, images, device, dtype):
    """The trainer's step: image pass, report pass and the DKAM anchors of the 14 CheXpert categories re-encoded with
    gradients from one description each (`--anchor_descriptions_per_step 1`), L_CA + L_CG."""
    from radz.knowledge import load_knowledge
    from radz.training import AnchorBank

    processor.set_knowledge(load_knowledge("chexpert"))
    anchors = AnchorBank(processor, LABELS, per_step=1).sample(step=0)
    inputs = processor(images=images, text=[REPORT] * len(images))
    labels = torch.zeros(len(images), len(LABELS))
    labels[:, [2, 10]] = 1.0  # Cardiomegaly, Pleural Effusion: what the report says
    inputs = {k: v.to(device) for k, v in {**inputs, **anchors, "labels": labels}.items()}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = peft_model(**inputs, return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, inputs["image_input_ids"].shape[1] + inputs["input_ids"].shape[1]


def causal_lm_step_fn(peft_model, processor, images, device, dtype):
    """LLaVA's own fine-tuning step: one sequence of image tokens + prompt + report, next-token loss on the report."""
    image_ids = processor.image_prompt_ids()[: -processor.num_cls_tokens]  # the image prompt without <ImgCls_*>
    report_ids = processor.plain_text_ids(REPORT) + [processor.tokenizer.eos_token_id]
    ids = torch.tensor([image_ids + report_ids] * len(images), device=device)
    labels = ids.clone()
    labels[:, : len(image_ids)] = -100
    pixel_values = processor(images=images)["pixel_values"].to(device, dtype)
    llava = peft_model.get_base_model().llava
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = llava(input_ids=ids, pixel_values=pixel_values, labels=labels, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, ids.shape[1]


def run(shape: str, device: torch.device, dtype: torch.dtype, pipeline_batch: int, train_batch: int, steps: int):
    from processing_llava_radz import load_radiographs

    model, processor = build_model(shape, device, dtype)
    results = {
        "shape": shape,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).split(".")[-1],
        "params_b": sum(p.numel() for p in model.parameters()) / 1e9,
        "image_tokens": processor.num_image_tokens,
    }
    with tempfile.TemporaryDirectory() as directory:
        paths = write_images(Path(directory), 2 * pipeline_batch, size=512)
        with torch.inference_mode():
            results["pipeline_images_per_s"] = pipeline_images_per_second(
                model, processor, paths, pipeline_batch, device
            )
        images = load_radiographs(paths[:train_batch])

    peft_model = lora_model(model, lora_r=16)
    dfat, results["dfat_tokens_per_sample"] = dfat_step_fn(peft_model, processor, images, device, dtype)
    results["dfat_step_s"], results["dfat_peak_gib"] = time_steps(dfat, steps, device)
    del dfat
    causal, results["causal_lm_tokens_per_sample"] = causal_lm_step_fn(peft_model, processor, images, device, dtype)
    results["causal_lm_step_s"], results["causal_lm_peak_gib"] = time_steps(causal, steps, device)
    results["step_time_ratio"] = results["dfat_step_s"] / results["causal_lm_step_s"]
    results["peak_memory_ratio"] = results["dfat_peak_gib"] / results["causal_lm_peak_gib"]
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny test shape on CPU in float32 (for the suite)")
    parser.add_argument("--pipeline_batch", type=int, default=32)
    parser.add_argument("--train_batch", type=int, default=8, help="training samples per GPU")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.tiny:
        shape, device, dtype = "tiny", torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_gpu.py needs a CUDA GPU for the 7B shape; --tiny runs the test shape on CPU")
        shape, device, dtype = "7b", torch.device("cuda"), torch.bfloat16
    results = run(shape, device, dtype, args.pipeline_batch, args.train_batch, args.steps)
    memory = "peak GPU memory" if device.type == "cuda" else "peak process RSS"
    print(f"LLaVA-RadZ {shape} shape ({results['params_b']:.2f} B parameters, RANDOM weights), {results['dtype']}, "
          f"{results['device']}")
    print(f"pipeline: {results['pipeline_images_per_s']:.1f} images/s at batch {args.pipeline_batch}, "
          f"{len(LABELS)} labels")
    print(f"DFAT step, LoRA r=16 + gradient checkpointing, batch {args.train_batch}: "
          f"{results['dfat_step_s']:.3f} s, {memory} {results['dfat_peak_gib']:.2f} GiB")
    print(f"LLaVA causal-LM step, same LoRA + checkpointing, batch {args.train_batch}: "
          f"{results['causal_lm_step_s']:.3f} s, {memory} {results['causal_lm_peak_gib']:.2f} GiB")
    print(f"ratio DFAT / causal-LM: step time {results['step_time_ratio']:.2f}, "
          f"peak memory {results['peak_memory_ratio']:.2f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
