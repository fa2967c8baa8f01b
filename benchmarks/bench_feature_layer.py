"""The image and text passes stopped at `feature_layer` against today's full run with every hidden state, on the
demo-size model (`radz.presets.demo`: SmolLM2-135M cut to 4 layers, the convolutional tower), measured side by
side in one run.

Each path runs in its own fresh subprocess (same seed, same inputs) so that its peak RSS is its own: the figure
is the peak RSS during the forward passes minus the RSS before them (CPU has no allocator peak counter). Times are
the best of `--repeats`. The full-run path is the reference the tests compare against: `llava.model(...,
output_hidden_states=True).hidden_states[feature_layer]`.

    python benchmarks/bench_feature_layer.py            # batch 16, inference (image + text pass)
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

REPORT = "The cardiac silhouette is enlarged. Small left pleural effusion. No pneumothorax."


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def measure(path: str, batch: int, repeats: int) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from radz.presets import demo

    torch.manual_seed(0)
    model, processor = demo()
    model.eval()
    if path == "full":
        def full_run(input_ids, attention_mask, pixel_values=None):
            outputs = model.llava.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                                        output_hidden_states=True, use_cache=False)
            return outputs.hidden_states[model.config.feature_layer]

        model._llm_states = full_run
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (128, 128), dtype=np.uint8)) for _ in range(batch)]
    inputs = processor(images=images, text=[REPORT] * batch)
    before = rss_mib()
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            out = model(**inputs)
            best = min(best, time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"path": path, "seconds": best, "peak_rss_delta_mib": peak - before,
            "embeds_sum": float(out.image_embeds.sum() + out.text_embeds.sum())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--path", help=argparse.SUPPRESS)  # one measurement, in a subprocess
    args = parser.parse_args()
    if args.path:
        print(json.dumps(measure(args.path, args.batch, args.repeats)))
        return
    results = {}
    for path in ("full", "stopped"):
        command = [sys.executable, __file__, "--path", path, "--batch", str(args.batch), "--repeats", str(args.repeats)]
        output = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO).stdout
        results[path] = json.loads(output.strip().splitlines()[-1])
    full, stopped = results["full"], results["stopped"]
    print(f"demo-size model, batch {args.batch}, image + text pass, inference, best of {args.repeats}")
    for row in (full, stopped):
        print(f"  {row['path']:8s} {row['seconds'] * 1e3:8.1f} ms   peak RSS +{row['peak_rss_delta_mib']:.0f} MiB")
    print(f"stopped / full: time {stopped['seconds'] / full['seconds']:.2f}, "
          f"peak memory {stopped['peak_rss_delta_mib'] / max(full['peak_rss_delta_mib'], 1e-9):.2f}; "
          f"same embeddings: {abs(full['embeds_sum'] - stopped['embeds_sum']) < 1e-3}")


if __name__ == "__main__":
    main()
