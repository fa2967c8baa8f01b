"""Command-line arguments of `train_radz.py`, as dataclasses for `HfArgumentParser`.

`RadZTrainingArguments` subclasses `TrainingArguments`, so every Trainer flag (`--learning_rate`, `--save_steps`,
`--resume_from_checkpoint`, `--use_cpu`, ...) works unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .precision import ATTN_IMPLEMENTATIONS, DTYPES

# Every linear layer of a Llama/Mistral/Vicuna decoder block. The LoRA regex restricts them to the LLM, because the
# CLIP vision tower has modules named q_proj/k_proj/v_proj too.
DEFAULT_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class ModelArguments:
    base_model: str | None = field(
        default=None,
        metadata={"help": "A transformers LLaVA checkpoint (hub id or directory), converted with `from_llava`."},
    )
    vision_tower: str | None = field(
        default=None,
        metadata={
            "help": "With an original-layout --base_model (LLaVA-1.5, LLaVA-Med v1.5): the CLIP tower directory to use "
            "instead of its config's mm_vision_tower."
        },
    )
    config: str | None = field(
        default=None,
        metadata={"help": "Instead of --base_model: a preset name ('tiny') or a preset JSON for `build_from_preset`."},
    )
    knowledge: str | None = field(
        default=None,
        metadata={
            "help": "DKAM knowledge: a bundled set name or a JSON file {category: {synonyms, descriptions}}. It is "
            "set on the processor and saved with every checkpoint."
        },
    )
    num_cls_tokens: int | None = field(default=None, metadata={"help": "Special tokens per modality (config default 8)."})
    dkam_lambda: float | None = field(default=None, metadata={"help": "λ in λ·L_CA + (1−λ)·L_CG (config default 0.5)."})
    alignment: str | None = field(
        default=None, metadata={"help": "'global' (config default) or 'cross' (the paper's) InfoNCE."}
    )
    lora_r: int = field(
        default=16,
        metadata={
            "help": "LoRA rank on the LLM. 0 = no LoRA: the LLM stays frozen except the new special-token rows, "
            "or is trained in full with --train_llm."
        },
    )
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(
        default=DEFAULT_LORA_TARGETS,
        metadata={"help": "Comma-separated module names that get LoRA, matched inside the LLM only."},
    )
    train_vision_tower: bool = field(default=False, metadata={"help": "Unfreeze the vision tower (frozen by default)."})
    train_llm: bool = field(
        default=False, metadata={"help": "With --lora_r 0: train every LLM weight instead of the token rows only."}
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Weights of the base model: bfloat16, float16 or float32 (default: bfloat16 with --bf16, float16 "
            "with --fp16, else float32). The trainable weights stay float32."
        },
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "sdpa, flash_attention_2 or eager (default: transformers' choice)."}
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "QLoRA: the LLM's linear layers in 4-bit NF4 (bitsandbytes) under LoRA; the heads and the new "
            "token rows stay float32, and the final merged checkpoint is written in bfloat16."
        },
    )

    def __post_init__(self):
        if (self.base_model is None) == (self.config is None):
            raise ValueError("give exactly one of --base_model (a LLaVA checkpoint) or --config (a preset)")
        if self.lora_r < 0:
            raise ValueError(f"--lora_r must be >= 0, got {self.lora_r}")
        if self.train_llm and self.lora_r > 0:
            raise ValueError("--train_llm trains the full LLM and needs --lora_r 0")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: expected one of {sorted(DTYPES)}")
        if self.attn_implementation is not None and self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"--attn_implementation {self.attn_implementation!r}: expected one of {ATTN_IMPLEMENTATIONS}")
        if self.load_in_4bit and (self.base_model is None or self.lora_r == 0):
            raise ValueError("--load_in_4bit (QLoRA) needs --base_model (a checkpoint to quantise) and --lora_r > 0")


@dataclass
class DataArguments:
    train_file: str | None = field(
        default=None, metadata={"help": "Training data: JSONL, CSV or parquet, one row per image."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Labelled validation data (same formats) for the zero-shot AUC evaluation."}
    )
    dataset_dir: str | None = field(
        default=None, metadata={"help": "A `datasets` `save_to_disk` folder (a Dataset or a DatasetDict)."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "A reader of `radz.datasets` (e.g. mimic_cxr, chexpert); needs --data_dir."}
    )
    data_dir: str | None = field(default=None, metadata={"help": "Root folder of --dataset_name."})
    train_split: str = field(default="train", metadata={"help": "Split for --dataset_dir / --dataset_name."})
    validation_split: str | None = field(
        default=None, metadata={"help": "Validation split for --dataset_dir / --dataset_name."}
    )
    image_column: str = field(default="image", metadata={"help": "Column of image paths."})
    report_column: str = field(default="report", metadata={"help": "Column of report texts."})
    label_columns: str | None = field(
        default=None, metadata={"help": "Comma-separated 0/1 label columns (blank or -1 = unknown); their names are the class names."}
    )
    class_names: str | None = field(
        default=None,
        metadata={"help": "Comma-separated names of the entries of a `labels` list column, in order."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})

    def __post_init__(self):
        sources = [self.train_file is not None, self.dataset_dir is not None, self.dataset_name is not None]
        if sum(sources) != 1:
            raise ValueError("give exactly one of --train_file, --dataset_dir or --dataset_name")
        if self.validation_file is not None and self.train_file is None:
            raise ValueError("--validation_file goes with --train_file; use --validation_split for the other sources")
        if self.dataset_name is not None and self.data_dir is None:
            raise ValueError("--dataset_name needs --data_dir")
        if self.label_columns and self.class_names:
            raise ValueError("--label_columns and --class_names exclude each other")

    @staticmethod
    def split_list(value: str | None) -> list[str]:
        return [item.strip() for item in value.split(",") if item.strip()] if value else []


@dataclass
class RadZTrainingArguments(TrainingArguments):
    # The collator needs the image/report/labels columns that the model's forward does not name.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False for LLaVA-RadZ."})
    gather_negatives: bool = field(
        default=True,
        metadata={"help": "Under data parallel, compute the contrastive loss over the global batch (all ranks)."},
    )
    gather_with_grad: bool = field(
        default=False,
        metadata={"help": "Gather the embeddings with a differentiable all-gather (open_clip's --gather-with-grad)."},
    )
    local_loss: bool = field(
        default=False,
        metadata={
            "help": "Each rank computes L_CA of its own rows against all rows ([n_local, N] logits instead of [N, N]; "
            "open_clip's --local-loss); needs --gather_with_grad."
        },
    )
    anchor_descriptions_per_step: int = field(
        default=1,
        metadata={
            "help": "DKAM anchors are re-encoded with gradients every step from a random subset of at most this "
            "many descriptions per category (0 = all). Every description is an extra text sequence per step: with "
            "14 categories, 1 per category costs about as much as the batch's report pass (benchmarks/bench_train.py)."
        },
    )
    balance_classes: bool = field(
        default=False, metadata={"help": "Sample so that every class comes equally often in an epoch."}
    )
    vision_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the vision tower and projector (default: --learning_rate)."},
    )
    tower_pretraining_steps: int = field(
        default=0,
        metadata={
            "help": "Before DFAT, a label-free first stage of this many steps: image–report contrastive pretraining of "
            "the vision tower and projector alone (radz.training.tower), standing in for the CLIP pretraining of a "
            "real LLaVA tower. For towers trained from scratch."
        },
    )
    tower_pretraining_batch_size: int = field(default=32, metadata={"help": "Batch size of the first stage."})
    tower_pretraining_learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate of the first stage."})
    calibration_samples: int = field(
        default=64,
        metadata={
            "help": "Before training, set the heads' input standardisation from the first N training pairs "
            "(`calibrate_heads`; 0 keeps the generic calibration of the model builder)."
        },
    )
    eval_use_knowledge: bool = field(
        default=True,
        metadata={
            "help": "Zero-shot evaluation: score a label found in the knowledge base against its DKAM anchor, as the "
            "pipeline's use_knowledge=True does (False: every label by the text pass of its name)."
        },
    )
    eval_multi_label: bool = field(
        default=False,
        metadata={
            "help": "Zero-shot evaluation: score each label against 'no {label}', as the pipeline's multi_label=True "
            "(default: a softmax over the labels)."
        },
    )
    max_bad_fraction: float = field(
        default=0.05,
        metadata={"help": "Stop when more than this fraction of the samples seen are unreadable or have no report."},
    )
    bad_check_min_samples: int = field(
        default=20, metadata={"help": "Samples to see before --max_bad_fraction is enforced during an epoch."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.remove_unused_columns:
            raise ValueError("--remove_unused_columns must be False: the collator reads image/report/labels")
        if self.local_loss and not self.gather_with_grad:
            raise ValueError("--local_loss needs --gather_with_grad (otherwise the gradient misses other ranks' terms)")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"--max_bad_fraction must lie in [0, 1], got {self.max_bad_fraction}")
