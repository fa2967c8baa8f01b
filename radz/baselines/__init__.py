"""Baselines for the MLLM-vs-vision-encoder comparison (docs/design.md): prompt-only VQA, a vision-tower linear probe
and LoRA SFT with trl. Each is a `radz.evaluation.scorer.Scorer`; importing this package registers them as methods
of the evaluation harness, so that `evaluate_radz.py --method vqa|vision_probe|sft` runs them through the same loop.
"""

from radz.checkpoints import LoadedCheckpoint, load_checkpoint
from radz.evaluation.methods import EvaluationError, register_method

from .base import select_rows
from .sft import SFTScorer, VQACollator, vqa_training_items
from .vision_probe import VisionProbeScorer
from .vqa import DEFAULT_QUESTION, VQAPrompt, VQAScorer, answer_metrics, default_question, parse_answer


def build_baseline(config, train=None):
    """The `config.method` baseline scorer. `train` (an `EvalData` of the training split) is needed by the trained
    methods."""
    checkpoint = load_checkpoint(config.model, config.device)
    # The question asked: the first template, else the dataset's default. sft trains on it once; further
    # --templates only vary the question at scoring time.
    question = (config.templates or [default_question(config.dataset)])[0]
    if config.method == "vqa":
        return VQAScorer(checkpoint, question=question, max_new_tokens=config.max_new_tokens)
    if train is None:
        raise EvaluationError(f"--method {config.method} trains on the training split, which was not loaded")
    if config.method == "vision_probe":
        return VisionProbeScorer(
            checkpoint,
            train.images,
            train.label_matrix,
            train.label_names,
            train.task,
            pooling=config.probe_pooling,
            shots=config.shots,
            balance_classes=config.balance_classes,
            seed=config.seed,
            C=config.probe_C,
            batch_size=config.batch_size,
            save_path=config.output_dir / "vision_probe.safetensors",
        )
    return SFTScorer(
        checkpoint,
        train.images,
        train.label_matrix,
        train.label_names,
        output_dir=config.output_dir / "sft_adapter",
        question=question,
        shots=config.shots,
        balance_classes=config.balance_classes,
        max_samples=config.sft_max_samples,
        seed=config.seed,
        steps=config.sft_steps,
        epochs=config.sft_epochs,
        batch_size=config.sft_batch_size,
        learning_rate=config.sft_learning_rate,
        lora_r=config.lora_r,
        lora_alpha=config.lora_alpha,
        max_new_tokens=config.max_new_tokens,
    )


register_method("vqa", build_baseline)
register_method("vision_probe", build_baseline, trained=True)
register_method("sft", build_baseline, trained=True)

__all__ = [
    "DEFAULT_QUESTION",
    "LoadedCheckpoint",
    "SFTScorer",
    "VQACollator",
    "VQAPrompt",
    "VQAScorer",
    "VisionProbeScorer",
    "answer_metrics",
    "build_baseline",
    "default_question",
    "load_checkpoint",
    "parse_answer",
    "select_rows",
    "vqa_training_items",
]
