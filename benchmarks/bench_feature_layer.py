"""The image and text passes stopped at `feature_layer` against today's full run with every hidden state, on the
demo-size model (`radz.presets.demo`: SmolLM2-135M cut to 4 layers, the convolutional tower), measured side by
side in one run.

Time: both paths in one process on the same model and inputs, alternating, best of `--repeats`, by wall time and
by process CPU time (robust to other load on the machine). Memory: each path in its own fresh subprocess, the peak
RSS during the forward passes minus the RSS before them (CPU has no allocator peak counter). The full-run path is
the reference the tests compare against: `llava.model(..., output_hidden_states=True).hidden_states[feature_layer]`.

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


def setup(batch: int):
    import numpy as np
    import torch
    from PIL import Image

    from radz.presets import demo

    torch.manual_seed(0)
    model, processor = demo()
    model.eval()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (128, 128), dtype=np.uint8)) for _ in range(batch)]
    return model, processor(images=images, text=[REPORT] * batch)


def forward(model, inputs, path: str):
    """One image + text forward by `path`: "stopped" (the model's own) or "full" (every layer, every state)."""
    import torch

    stopped = model._llm_states

    def full_run(input_ids, attention_mask, pixel_values=None):
        outputs = model.llava.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                                    output_hidden_states=True, use_cache=False)
        return outputs.hidden_states[model.config.feature_layer]

    model._llm_states = full_run if path == "full" else stopped
    try:
        with torch.inference_mode():
            return model(**inputs)
    finally:
        model._llm_states = stopped


def peak_memory(path: str, batch: int) -> dict:
    model, inputs = setup(batch)
    before = rss_mib()
    forward(model, inputs, path)
    return {"path": path, "peak_rss_delta_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory_of", help=argparse.SUPPRESS)  # one path's peak RSS, in a subprocess
    args = parser.parse_args()
    if args.memory_of:
        print(json.dumps(peak_memory(args.memory_of, args.batch)))
        return
    memory = {}
    for path in ("full", "stopped"):
        command = [sys.executable, __file__, "--memory_of", path, "--batch", str(args.batch)]
        output = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO).stdout
        memory[path] = json.loads(output.strip().splitlines()[-1])["peak_rss_delta_mib"]

    model, inputs = setup(args.batch)
    outputs = {path: forward(model, inputs, path) for path in ("full", "stopped")}  # also the warm-up
    same = all(
        bool((outputs["full"][key] - outputs["stopped"][key]).abs().max() < 1e-5)
        for key in ("image_embeds", "text_embeds", "image_local_embeds", "text_local_embeds")
    )
    best = {path: (float("inf"), float("inf")) for path in ("full", "stopped")}
    for _ in range(args.repeats):
        for path in ("full", "stopped"):
            wall, cpu = time.perf_counter(), time.process_time()
            forward(model, inputs, path)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[path] = (min(best[path][0], wall), min(best[path][1], cpu))
    print(f"demo-size model ({model.config.text_config.num_hidden_layers} LLM layers, feature_layer "
          f"{model.config.feature_layer}), batch {args.batch}, image + text pass, inference, best of {args.repeats}")
    for path in ("full", "stopped"):
        print(f"  {path:8s} wall {best[path][0] * 1e3:8.1f} ms   CPU {best[path][1] * 1e3:8.1f} ms   "
              f"peak RSS +{memory[path]:.0f} MiB")
    print(f"stopped / full: wall time {best['stopped'][0] / best['full'][0]:.2f}, "
          f"CPU time {best['stopped'][1] / best['full'][1]:.2f}, "
          f"peak memory {memory['stopped'] / max(memory['full'], 1e-9):.2f}; same embeddings: {same}")


if __name__ == "__main__":
    main()
