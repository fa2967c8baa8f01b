"""Training of LLaVA-RadZ with the transformers Trainer (used by `train_radz.py`)."""

from .args import DataArguments, ModelArguments, RadZTrainingArguments
from .data import BadDataError, BalancedClassSampler, RadZCollator, balance_keys, load_training_data, scan_dataset
from .lora import merged_model, prepare_for_training
from .tower import pretrain_vision_tower
from .trainer import AnchorBank, RadZTrainer, gather_rows

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
    "gather_rows",
    "load_training_data",
    "merged_model",
    "prepare_for_training",
    "pretrain_vision_tower",
    "scan_dataset",
]
