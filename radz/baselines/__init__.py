"""Baselines for the MLLM-vs-vision-encoder comparison (docs/design.md): prompt-only VQA, a vision-tower linear probe
and LoRA SFT with trl. Each is a `Scorer`; `evaluate_radz.py --method ...` runs them through the same harness."""

from .base import LoadedCheckpoint, Scorer, load_checkpoint, select_rows
from .sft import SFTScorer, VQACollator, vqa_training_items
from .vision_probe import VisionProbeScorer
from .vqa import DEFAULT_QUESTION, VQAPrompt, VQAScorer, answer_metrics, default_question, parse_answer

__all__ = [
    "DEFAULT_QUESTION",
    "LoadedCheckpoint",
    "SFTScorer",
    "Scorer",
    "VQACollator",
    "VQAPrompt",
    "VQAScorer",
    "VisionProbeScorer",
    "answer_metrics",
    "default_question",
    "load_checkpoint",
    "parse_answer",
    "select_rows",
    "vqa_training_items",
]
