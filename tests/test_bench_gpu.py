"""benchmarks/bench_gpu.py: the 7B shape is LLaVA-1.5-7B's, and the benchmark runs end to end at the tiny shape."""

import torch

from benchmarks import bench_gpu


def test_the_7b_shape_has_llava_1_5_7b_sizes():
    config, processor = bench_gpu.build_config("7b")
    from modeling_llava_radz import LlavaRadZForZeroShotClassification

    with torch.device("meta"):
        model = LlavaRadZForZeroShotClassification(config)
    llm = sum(p.numel() for p in model.llava.model.language_model.parameters()) + model.llava.lm_head.weight.numel()
    tower = sum(p.numel() for p in model.llava.model.vision_tower.parameters())
    assert processor.num_image_tokens == 576  # (336/14)^2
    assert abs(llm / 1e9 - 6.74) < 0.02  # Llama-2-7B (Vicuna-7B v1.5) with 64 added vocabulary rows
    assert abs(tower / 1e6 - 303.5) < 1.0  # CLIP ViT-L/14-336's vision tower


def test_tiny_run_prints_consistent_figures(capsys):
    results = bench_gpu.main(["--tiny", "--pipeline_batch", "4", "--train_batch", "2", "--steps", "2"])
    printed = capsys.readouterr().out
    assert "images/s at batch 4, 14 labels" in printed and "ratio DFAT / causal-LM" in printed
    assert results["pipeline_images_per_s"] > 0 and results["dfat_step_s"] > 0 and results["causal_lm_step_s"] > 0
    assert results["step_time_ratio"] == results["dfat_step_s"] / results["causal_lm_step_s"]
    # DFAT runs an image pass and a report pass; the causal-LM step one sequence holding both.
    assert results["dfat_tokens_per_sample"] > results["causal_lm_tokens_per_sample"] > results["image_tokens"]
