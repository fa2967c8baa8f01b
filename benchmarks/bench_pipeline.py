"""Throughput of the zero-shot pipeline against the bare image encoder, on one machine in one run.

For each model size, N radiograph PNGs × K labels:
- pipeline images/s: `clf(paths, candidate_labels=labels, batch_size=B)` with the label embeddings already cached
  (image reading + preprocessing + model + scoring);
- raw images/s: `model.get_image_features` over the same images, preprocessed beforehand, same batch size;
- their ratio (target >= 0.85), by wall time and by process CPU time (robust to other load on the machine),
  the one-off label encoding time, and the peak RSS of the process.

Each model runs in its own subprocess so that its peak RSS is its own. Times are the best of `--repeats`
alternating runs.
The models have RANDOM weights (throughput does not depend on them): "tiny" is the test preset; "demo-size" has
the shape of the embedded demo (CLIP-ViT 256×4 at 128/16; a SmolLM2-135M-shaped Llama cut to 8 layers, vocabulary
49,152). The images are synthetic phantoms (radz.phantom), written as 8-bit grayscale PNGs.

    python benchmarks/bench_pipeline.py            # 64 images × 14 labels, 512×512 PNGs
    python benchmarks/bench_pipeline.py --quick    # 16 images, one repeat
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

LABELS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
]  # the 14 CheXpert observations
SMOLLM2_VOCAB = 49152


def build_model(name: str):
    """(model, processor) with random weights, in eval mode."""
    from transformers import CLIPVisionConfig, LlamaConfig

    from modeling_llava_radz import LlavaRadZForZeroShotClassification
    from radz.presets import build_processor, build_tokenizer, config_for_processor, tiny

    torch.manual_seed(0)
    if name == "tiny":
        model, processor = tiny()
    else:
        processor = build_processor(build_tokenizer(), image_size=128, patch_size=16, num_cls_tokens=8)
        tokenizer = processor.tokenizer
        vision = CLIPVisionConfig(
            hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
            image_size=128, patch_size=16,
        )
        text = LlamaConfig(
            hidden_size=576, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        config = config_for_processor(processor, vision, text)
        config.text_config.vocab_size = SMOLLM2_VOCAB  # the small BPE tokenizer uses only the first ids
        model = LlavaRadZForZeroShotClassification(config)
    return model.eval(), processor


def write_images(directory: Path, count: int, size: int) -> list[str]:
    from radz.phantom import generate_phantom

    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = directory / f"phantom_{index:03d}.png"
        Image.fromarray(generate_phantom(rng, size=size).image).save(path)
        paths.append(str(path))
    return paths


def best_times(functions, repeats: int) -> list[tuple[float, float]]:
    """Best (wall, CPU) seconds of each function. The functions alternate, so load from other processes hits them
    alike; the process CPU time is what a machine to itself would spend (with one thread, the wall time)."""
    best = [(float("inf"), float("inf"))] * len(functions)
    for _ in range(repeats):
        for index, function in enumerate(functions):
            wall, cpu = time.perf_counter(), time.process_time()
            function()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[index] = (min(best[index][0], wall), min(best[index][1], cpu))
    return best


def run_one(name: str, paths: list[str], batch_size: int, repeats: int) -> dict:
    from pipeline_llava_radz import LlavaRadZZeroShotImageClassificationPipeline
    from radiograph_llava_radz import load_radiographs

    model, processor = build_model(name)
    clf = LlavaRadZZeroShotImageClassificationPipeline(model=model, processor=processor, device=-1)
    options = {"candidate_labels": LABELS, "batch_size": batch_size}

    clf(paths[:batch_size], **options)  # warm-up
    clf.label_cache.clear()
    start = time.perf_counter()
    with torch.inference_mode():
        clf.label_embeddings(LABELS, batch_size=batch_size)
    label_seconds = time.perf_counter() - start

    batches = [
        processor(images=load_radiographs(paths[i : i + batch_size])) for i in range(0, len(paths), batch_size)
    ]

    def raw():
        with torch.inference_mode():
            for batch in batches:
                model.get_image_features(**batch)

    (pipeline_wall, pipeline_cpu), (raw_wall, raw_cpu) = best_times([lambda: clf(paths, **options), raw], repeats)
    return {
        "model": name,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "image_tokens": processor.num_image_tokens,
        "pipeline_ips": len(paths) / pipeline_wall,
        "raw_ips": len(paths) / raw_wall,
        "ratio": raw_wall / pipeline_wall,
        "pipeline_cpu_ms": pipeline_cpu / len(paths) * 1e3,
        "raw_cpu_ms": raw_cpu / len(paths) * 1e3,
        "cpu_ratio": raw_cpu / pipeline_cpu,
        "label_seconds": label_seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 images and one repeat")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=512, help="side of the square PNGs")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="tiny,demo-size")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one model, print JSON
    parser.add_argument("--image-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.images, args.repeats = 16, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.worker:
        paths = sorted(str(p) for p in Path(args.image_dir).glob("*.png"))
        print(json.dumps(run_one(args.worker, paths, args.batch_size, args.repeats)))
        return

    with tempfile.TemporaryDirectory() as directory:
        write_images(Path(directory), args.images, args.image_size)
        rows = []
        for name in args.models.split(","):
            command = [sys.executable, __file__, "--worker", name, "--image-dir", directory,
                       "--batch-size", str(args.batch_size), "--repeats", str(args.repeats)]
            if args.threads:
                command += ["--threads", str(args.threads)]
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            output = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
            rows.append(json.loads(output.strip().splitlines()[-1]))

    print(
        f"{args.images} images ({args.image_size}x{args.image_size} PNG) x {len(LABELS)} labels, batch "
        f"{args.batch_size}, best of {args.repeats}; {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads; random weights"
    )
    header = (
        "| model | params | image tokens | pipeline img/s | raw img/s | ratio | pipeline CPU ms/img | raw CPU ms/img "
        "| CPU ratio | labels once (s) | peak RSS |"
    )
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['params_m']:.1f} M | {r['image_tokens']} | {r['pipeline_ips']:.1f} | "
            f"{r['raw_ips']:.1f} | {r['ratio']:.2f} | {r['pipeline_cpu_ms']:.1f} | {r['raw_cpu_ms']:.1f} | "
            f"{r['cpu_ratio']:.2f} | {r['label_seconds']:.2f} | {r['peak_rss_mib']:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
