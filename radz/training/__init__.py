"""Training of LLaVA-RadZ with the transformers Trainer (used by `train_radz.py`)."""

from .args import DataArguments, ModelArguments, RadZTrainingArguments
from .checkpoints import latest_checkpoint, resolve_resume
from .data import BadDataError, BalancedClassSampler, RadZCollator, balance_keys, load_training_data, scan_dataset
from .lora import merged_model, prepare_for_training
from .tower import pretrain_vision_tower, run_tower_stage
from .trainer import AnchorBank, RadZTrainer

__all__ = [
    "AnchorBank",
    "BadDataError",
    "BalancedClassSampler",
    "DataArguments",
    "ModelArguments",
    "RadZCollator",
    "RadZTrainer",
    "RadZTrainingArguments",
    "balance_keys",
    "latest_checkpoint",
    "load_training_data",
    "merged_model",
    "prepare_for_training",
    "pretrain_vision_tower",
    "resolve_resume",
    "run_tower_stage",
    "scan_dataset",
]
