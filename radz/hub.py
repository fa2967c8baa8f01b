"""A LLaVA-RadZ checkpoint on the Hugging Face hub: its model card and its upload.

- `write_model_card(dir, ...)`: the card (`README.md`, through `huggingface_hub.ModelCard`) of a saved checkpoint:
  YAML metadata (pipeline tag, library, base model, datasets, licence, tags, `model-index` results), the intended
  use, the training data and recipe, the threshold protocol, the evaluation table and how to load the model. The
  final save of training writes it.
- `update_model_card(dir, records)`: adds `evaluate_radz.py` results (its `metrics.json` records) to the card,
  replacing an earlier result of the same evaluation (`evaluate_radz.py --update_card`).
- `push_checkpoint(dir, repo_id)`: checks that the folder is a complete checkpoint (weights in safetensors, remote
  code, processor, knowledge, card) and uploads it (`radz-push`, `train_radz.py --push_to_hub`).

Everything the card shows is kept in its YAML (`llava_radz:`), so an update rebuilds the whole text from it.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

CARD_FILE = "README.md"
TASK = "zero-shot-image-classification"
# The hub id of the LLM inside each preset that starts from pretrained weights (the tiny preset has none).
PRESET_BASE_MODELS = {"demo": "HuggingFaceTB/SmolLM2-135M-Instruct"}
TAGS = ["llava-radz", "radiology", "chest-x-ray", "zero-shot-image-classification", "multimodal-llm", "custom_code"]
# Never uploaded: the Trainer's LoRA checkpoints and logs, pickled files (weights are safetensors only).
IGNORED = ["checkpoint-*", "checkpoint-*/**", "runs/**", "*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", ".*"]
RECIPE_KEYS = (
    "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
    "vision_learning_rate", "warmup_steps", "weight_decay", "lr_scheduler_type", "seed", "bf16", "fp16",
    "tower_pretraining_steps", "tower_pretraining_batch_size", "anchor_descriptions_per_step", "balance_classes",
    "gather_negatives", "calibration_samples",
)
MODEL_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "train_vision_tower", "train_llm")
CONFIG_KEYS = (
    "alignment", "dkam_lambda", "anchor_head", "category_loss", "num_cls_tokens", "feature_layer", "pooling",
    "projection_dim", "label_template",
)
PATH_KEYS = ("data_dir", "train_file", "dataset_dir")
DATA_KEYS = ("dataset_name", "data_dir", "train_file", "dataset_dir", "train_split", "label_columns", "class_names",
             "max_train_samples")
SUMMARY_KEYS = {  # task: (AUC, F1, ACC) keys of the metric module's output
    "multilabel": ("auc_macro", "f1_macro", "acc_macro"),
    "binary": ("auc", "f1", "acc"),
    "multiclass": ("auc_ovr_macro", "f1_macro", "accuracy"),
}


class CheckpointError(ValueError):
    """A folder that is not a complete LLaVA-RadZ checkpoint; the message names what is missing."""


# ----------------------------------------------------------------------------------------------------------------
# The card
# ----------------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _plain(value):
    """A YAML-safe value: enums (the scheduler type...) by their value, paths as text."""
    if isinstance(value, Enum):
        value = value.value
    return value if value is None or type(value) in (bool, int, float, str) else str(value)


def training_facts(directory, model_args=None, data_args=None, training_args=None) -> dict:
    """What the card says about training: base model, data, the recipe and the model's config."""
    directory = Path(directory)
    config = _read_json(directory / "config.json")
    facts = {"config": {k: config[k] for k in CONFIG_KEYS if k in config}}
    if model_args is not None:
        base = model_args.base_model
        facts["base_model"] = Path(base).name if base and Path(base).exists() else base
        # A preset JSON is kept by its settings: the card must not depend on a local file.
        preset = model_args.config
        facts["preset"] = json.loads(Path(preset).read_text()) if preset and Path(preset).is_file() else preset
        source = model_args.knowledge
        facts["knowledge_source"] = Path(source).name if source and Path(source).is_file() else source
        facts["model"] = {k: _plain(getattr(model_args, k)) for k in MODEL_KEYS}
    if data_args is not None:
        # Local paths by their last part only: a pushed card should not show the trainer's folders.
        data = {k: _plain(getattr(data_args, k)) for k in DATA_KEYS if getattr(data_args, k) is not None}
        facts["data"] = {k: Path(v).name if k in PATH_KEYS else v for k, v in data.items()}
    if training_args is not None:
        facts["recipe"] = {k: _plain(getattr(training_args, k)) for k in RECIPE_KEYS if hasattr(training_args, k)}
        facts["recipe"]["world_size"] = training_args.world_size
    state = _read_json(directory / "trainer_state.json")
    if state:
        facts["global_step"] = state.get("global_step")
    knowledge = _read_json(directory / "knowledge.json")
    facts["knowledge_categories"] = sorted(knowledge)
    facts["base_model_id"] = base_model_id(facts)  # kept: the preset file may be gone when the card is rebuilt
    return facts


def base_model_id(facts: dict) -> str | None:
    """The hub id this checkpoint derives from: `--base_model` when it is a hub id, the LLM of a pretrained preset."""
    base = facts.get("base_model")
    if base and base.count("/") == 1:  # a local folder was kept by its name only
        return base
    preset = facts.get("preset")
    return PRESET_BASE_MODELS.get(preset.get("preset") if isinstance(preset, dict) else preset)


def evaluation_entry(record: dict) -> dict:
    """The part of an `evaluate_radz.py` metrics.json record that the card shows."""
    metrics = record.get("metrics_oracle") or record.get("metrics") or {}
    if not metrics:
        raise ValueError(f"metrics.json of {record.get('model')!r} has no metrics block (metrics / metrics_oracle)")
    auc, f1, acc = (metrics.get(key) for key in SUMMARY_KEYS[metrics["task"]])
    settings = record.get("settings") or {}
    per_class = {
        label: {k: values.get(k) for k in ("auc", "f1", "acc")}
        for label, values in metrics.get("per_class", {}).items()
    }
    entry = {
        "dataset": record["dataset"],
        "data": Path(record.get("data_dir") or record["dataset"]).name,
        "split": record["split"],
        "method": record["method"],
        "use_knowledge": settings.get("use_knowledge"),
        "multi_label": settings.get("multi_label"),
        "template": record.get("template"),
        "threshold_protocol": record["threshold_protocol"],
        "oracle": bool(record.get("oracle")),
        "task": metrics["task"],
        "n_images": record.get("n_images"),
        "auc": auc,
        "f1": f1,
        "acc": acc,
        "per_class": per_class,
    }
    entry["name"] = evaluation_name(entry)
    return entry


def evaluation_name(entry: dict) -> str:
    """One evaluation's identity: a new result with the same name replaces the old one."""
    knowledge = {True: "anchors", False: "no anchors", None: None}[entry["use_knowledge"]]
    scoring = {True: "multi-label", False: "single-label", None: None}[entry["multi_label"]]
    parts = [entry["method"], f"{entry['dataset']} {entry['data']}/{entry['split']}", knowledge, scoring,
             entry["template"] and f"template {entry['template']!r}", f"thresholds {entry['threshold_protocol']}"]
    return " · ".join(part for part in parts if part)


def _eval_results(model_name: str, evaluations: list[dict]) -> list[EvalResult]:
    """`model-index` entries: the summary AUC (and the F1/ACC with their protocol) of each evaluation."""
    results = []
    for entry in evaluations:
        for metric, value in (("roc_auc", entry["auc"]), ("f1", entry["f1"]), ("accuracy", entry["acc"])):
            if value is None:
                continue
            protocol = "" if metric == "roc_auc" else f", thresholds {entry['threshold_protocol']}"
            protocol += ", ORACLE" if entry["oracle"] and metric != "roc_auc" else ""
            results.append(
                EvalResult(
                    task_type=TASK,
                    dataset_type=entry["dataset"],
                    dataset_name=f"{entry['dataset']} ({entry['data']})",
                    dataset_split=entry["split"],
                    metric_type=metric,
                    metric_name=f"{metric} (macro{protocol})",
                    metric_value=round(float(value), 4),
                    metric_config=entry["name"],
                )
            )
    return results


def build_model_card(model_name: str, facts: dict, evaluations: list[dict] = (), notes: list[str] = ()) -> ModelCard:
    """The `ModelCard` of a checkpoint from its training facts, its evaluations and free notes (e.g. SYNTHETIC)."""
    evaluations, notes = list(evaluations), list(notes)
    base_model = facts.get("base_model_id")
    data = facts.get("data") or {}
    datasets = [data["dataset_name"]] if data.get("dataset_name") else [
        Path(data[key]).name for key in ("train_file", "dataset_dir") if data.get(key)
    ]
    synthetic = any("SYNTHETIC" in note.upper() for note in notes)
    card_data = ModelCardData(
        pipeline_tag=TASK,
        library_name="transformers",
        base_model=base_model,
        datasets=datasets or None,
        # The package is Apache-2.0; weights derived from another base model carry that model's licence.
        license="apache-2.0" if base_model in (None, *PRESET_BASE_MODELS.values()) else "other",
        tags=TAGS + (["synthetic-data"] if synthetic else []),
        model_name=model_name,
        eval_results=_eval_results(model_name, evaluations) or None,
        llava_radz={"training": facts, "evaluations": evaluations, "notes": notes},
    )
    text = "\n".join(_card_text(model_name, facts, evaluations, notes, base_model))
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{text}\n")


def write_model_card(directory, model_args=None, data_args=None, training_args=None, notes=()) -> ModelCard:
    """Write the card of a freshly saved checkpoint; it keeps the evaluations of a card already there."""
    directory = Path(directory)
    facts = training_facts(directory, model_args, data_args, training_args)
    evaluations = []
    if (directory / CARD_FILE).is_file():
        previous = _stored(ModelCard.load(directory / CARD_FILE))
        evaluations, notes = previous["evaluations"], list(dict.fromkeys([*previous["notes"], *notes]))
    if (directory / "metrics.json").is_file():
        evaluations = _merged(evaluations, [evaluation_entry(_read_json(directory / "metrics.json"))])
    card = build_model_card(directory.resolve().name, facts, evaluations, notes)
    card.save(directory / CARD_FILE)
    return card


def update_model_card(directory, records: list[dict], notes=()) -> ModelCard:
    """Add evaluation records (metrics.json of `evaluate_radz.py`) and notes to the checkpoint's card, writing a
    card from the checkpoint alone when it has none."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: no config.json; --update_card needs a LLaVA-RadZ checkpoint directory")
    if (directory / CARD_FILE).is_file():
        stored = _stored(ModelCard.load(directory / CARD_FILE))
    else:
        stored = {"training": training_facts(directory), "evaluations": [], "notes": []}
    evaluations = _merged(stored["evaluations"], [evaluation_entry(record) for record in records])
    notes = list(dict.fromkeys([*stored["notes"], *notes]))
    card = build_model_card(directory.resolve().name, stored["training"], evaluations, notes)
    card.save(directory / CARD_FILE)
    return card


def rename_card(directory, model_name: str) -> ModelCard:
    """Rebuild the card under another name (the hub id, before an upload), so that "How to load" names it. A card
    that llava-radz did not write is left as it is."""
    directory = Path(directory)
    card = ModelCard.load(directory / CARD_FILE)
    if "training" not in (card.data.to_dict().get("llava_radz") or {}):
        return card
    stored = _stored(card)
    card = build_model_card(model_name, stored["training"], stored["evaluations"], stored["notes"])
    card.save(directory / CARD_FILE)
    return card


def _stored(card: ModelCard) -> dict:
    stored = card.data.to_dict().get("llava_radz") or {}
    if "training" not in stored:
        raise CheckpointError("the model card was not written by llava-radz (no 'llava_radz' metadata)")
    return {"training": stored["training"], "evaluations": stored.get("evaluations", []),
            "notes": stored.get("notes", [])}


def _merged(evaluations: list[dict], new: list[dict]) -> list[dict]:
    names = {entry["name"] for entry in new}
    return [entry for entry in evaluations if entry["name"] not in names] + new


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _card_text(model_name, facts, evaluations, notes, base_model) -> list[str]:
    config, data = facts.get("config", {}), facts.get("data") or {}
    lines = [f"# {model_name}", ""]
    lines += [f"> **{note}**" for note in notes] + ([""] if notes else [])
    lines += [
        "A [LLaVA-RadZ](https://arxiv.org/abs/2503.07487) zero-shot radiograph classifier trained with the "
        "llava-radz package: a LLaVA model (vision tower → projector → LLM) read as a CLIP-style dual encoder "
        "through the decoder states of special tokens (DFAT), with LLM-written disease descriptions as category "
        "anchors (DKAM).",
        "",
        "## Intended use",
        "",
        "Research on zero-shot recognition of findings in radiographs: scoring images against free-text labels, "
        "comparing methods, and as a starting point for further training. It is **not a clinical tool**: it is not "
        "validated for diagnosis, triage or any decision about a patient, and its scores are not calibrated "
        "probabilities of disease.",
        "",
        "## How to load",
        "",
        "```python",
        "from transformers import AutoModel, AutoProcessor, pipeline",
        "",
        f'clf = pipeline("{TASK}", model="{model_name}", trust_remote_code=True)',
        'clf("chest.dcm", candidate_labels=["Cardiomegaly", "Pleural Effusion", "No Finding"])',
        '# [{"label": ..., "score": ...}, ...] sorted by score; multi_label=True scores each label on its own',
        f'model = AutoModel.from_pretrained("{model_name}", trust_remote_code=True)',
        f'processor = AutoProcessor.from_pretrained("{model_name}", trust_remote_code=True)',
        "```",
        "",
        "The checkpoint carries its code (`*_llava_radz.py`), so `trust_remote_code=True` is all it needs. Labels "
        "found in its `knowledge.json` are scored against their DKAM anchor.",
        "",
        "## Training data",
        "",
    ]
    if base_model:
        lines.append(f"- Base model: [`{base_model}`](https://huggingface.co/{base_model}).")
    if facts.get("preset"):
        preset = facts["preset"]
        shown = json.dumps(preset) if isinstance(preset, dict) else preset
        pretrained = "" if base_model else " (no pretrained base model)"
        lines.append(f"- Built from the llava-radz preset `{shown}`{pretrained}.")
    for key, value in data.items():
        lines.append(f"- `{key}`: `{value}`")
    categories = facts.get("knowledge_categories") or []
    if categories:
        source = facts.get("knowledge_source") or "knowledge.json"
        lines.append(f"- DKAM knowledge ({source}): {', '.join(categories)}.")
    lines += ["", "## Training recipe", "", "| setting | value |", "|---|---|"]
    settings = {**config, **(facts.get("model") or {}), **(facts.get("recipe") or {})}
    if facts.get("global_step") is not None:
        settings["optimizer steps done"] = facts["global_step"]
    lines += [f"| {key} | `{value}` |" for key, value in settings.items()]
    lines += [
        "",
        "Loss: λ·L_CA + (1−λ)·L_CG with λ = `dkam_lambda`; L_CA is the symmetric image–report InfoNCE, L_CG "
        "pulls images and reports towards the anchors of their labels.",
        "",
        "## Threshold protocol",
        "",
        "AUC needs no threshold. F1 and ACC need one per class, chosen by one of three protocols, named beside every "
        "figure:",
        "- `validation` (the default): the threshold with the best F1 on a validation split; the test labels are "
        "never read;",
        "- `fixed`: 0.5 for every class;",
        "- `oracle`: the best F1 on the test labels themselves, as MedKLIP and KAD report. It overstates F1/ACC and is "
        "always labelled ORACLE.",
        "",
        "## Evaluation",
        "",
    ]
    if not evaluations:
        lines.append("No evaluation yet: run `radz-evaluate --model DIR ... --update_card` to add one here.")
        return lines
    lines += ["| evaluation | images | AUC | F1 | ACC |", "|---|---|---|---|---|"]
    for entry in evaluations:
        oracle = " (ORACLE)" if entry["oracle"] else ""
        lines.append(f"| {entry['name']}{oracle} | {entry['n_images']} | {_pct(entry['auc'])} | "
                     f"{_pct(entry['f1'])}{oracle} | {_pct(entry['acc'])}{oracle} |")
    lines += ["", "Macro values ×100. Per class:", ""]
    for entry in evaluations:
        if not entry["per_class"]:
            continue
        lines += [f"**{entry['name']}**", "", "| class | AUC | F1 | ACC |", "|---|---|---|---|"]
        lines += [f"| {label} | {_pct(v['auc'])} | {_pct(v['f1'])} | {_pct(v['acc'])} |"
                  for label, v in entry["per_class"].items()]
        lines.append("")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# The upload
# ----------------------------------------------------------------------------------------------------------------


def checkpoint_problems(directory) -> list[str]:
    """What keeps `directory` from being a complete checkpoint for the hub: missing config, safetensors weights,
    remote code, processor, knowledge or card; pickled weights. Empty when it is complete."""
    directory = Path(directory)
    config = _read_json(directory / "config.json")
    if not config:
        return [f"{directory}: no config.json (not a saved checkpoint)"]
    problems = []
    if not (directory / "model.safetensors").is_file():
        index = _read_json(directory / "model.safetensors.index.json")
        shards = set(index.get("weight_map", {}).values())
        if not shards:
            problems.append("no model.safetensors (weights are uploaded in safetensors only)")
        problems += [f"weight shard {s} is missing" for s in sorted(shards) if not (directory / s).is_file()]
    processor_config = _read_json(directory / "processor_config.json")
    if not processor_config:
        problems.append("no processor_config.json (save the processor beside the model)")
    references = [*config.get("auto_map", {}).values(), *processor_config.get("auto_map", {}).values()]
    references += [pipe["impl"] for pipe in (config.get("custom_pipelines") or {}).values()]
    for module in sorted({reference.split("--")[-1].rsplit(".", 1)[0] for reference in references}):
        if not (directory / f"{module}.py").is_file():
            problems.append(f"remote code {module}.py is missing")
    if not config.get("custom_pipelines"):
        problems.append("config.json declares no custom_pipelines: pipeline(...) would not find the LLaVA-RadZ one")
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        problems.append("no tokenizer files")
    for name, why in (("knowledge.json", "the DKAM knowledge"), (CARD_FILE, "the model card")):
        if not (directory / name).is_file():
            problems.append(f"no {name} ({why})")
    pickled = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth", "*.pkl") for p in directory.glob(pattern))
    problems += [f"{name} is not uploaded (pickle); the weights must be safetensors" for name in pickled
                 if not (directory / "model.safetensors").is_file()]
    return problems


def push_checkpoint(directory, repo_id: str, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload LLaVA-RadZ checkpoint") -> str:
    """Upload a saved checkpoint (the merged model with processor, knowledge and card) to `repo_id`; returns the
    repository URL. Raises `CheckpointError` naming every missing part before anything is uploaded."""
    problems = checkpoint_problems(directory)
    if problems:
        raise CheckpointError(f"{directory} is not a complete checkpoint: " + "; ".join(problems))
    rename_card(directory, repo_id)
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id, folder_path=str(directory), commit_message=commit_message, ignore_patterns=IGNORED
    )
    return str(url)


__all__ = [
    "CheckpointError",
    "build_model_card",
    "checkpoint_problems",
    "evaluation_entry",
    "push_checkpoint",
    "update_model_card",
    "write_model_card",
]
