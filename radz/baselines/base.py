"""What every scoring method shares: the `Scorer` interface, checkpoint loading, pixel batches and the label budget.

A method scores a batch of images against a list of label names: `score(images, labels) -> [N, C]` array (higher =
more likely positive). The evaluation harness owns the loop (chunks, batches, resume); a method only scores.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModel, AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

from radiograph_llava_radz import load_radiographs


class Scorer:
    """One scoring method. Subclasses set `name` and implement `score`; the rest has working defaults.

    - `settings()`: everything besides the model files and the data that changes the scores (it keys the resume
      cache, so a changed setting never reuses stale predictions);
    - `prepare()`: one-off work before the first batch (training a probe or an adapter), run lazily so that a fully
      resumed run trains nothing;
    - `outputs()`: the per-image arrays to store, `{"score": [N, C]}` plus method-specific ones (VQA's parsed
      answers);
    - `template`: the prompt template with `{}` for the label, for methods that take one (`supports_templates`).
    """

    name = "scorer"
    supports_templates = False
    template: str | None = None

    def settings(self) -> dict:
        return {"method": self.name, "template": self.template}

    def prepare(self) -> None:
        """Train whatever the method trains; a no-op for zero-shot methods."""

    def score(self, images: list[str], labels: list[str]) -> np.ndarray:
        raise NotImplementedError

    def outputs(self, images: list[str], labels: list[str]) -> dict[str, np.ndarray]:
        return {"score": self.score(images, labels)}

    def summary(self) -> dict:
        """Facts about the method to record in metrics.json (training set size, adapter path...)."""
        return {}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class LoadedCheckpoint:
    """A checkpoint opened for the baselines: the LLaVA model, its tokenizer/image processor and image-token layout.

    For a LLaVA-RadZ checkpoint `llava` is the wrapped `model.llava`; the DFAT heads are not used by the baselines.
    """

    path: str
    llava: LlavaForConditionalGeneration
    processor: object
    tokenizer: object
    image_processor: object
    image_token: str
    image_token_id: int
    num_image_tokens: int
    chat_template: str | None


def load_checkpoint(model_dir: str | os.PathLike, device: str | None = None) -> LoadedCheckpoint:
    """Open a LLaVA-RadZ checkpoint (`model_type` "llava_radz", remote code) or a plain transformers LLaVA one."""
    model_dir = str(model_dir)
    device = device or default_device()
    model_type = AutoConfig.from_pretrained(model_dir, trust_remote_code=True).model_type
    if model_type == "llava_radz":
        llava = AutoModel.from_pretrained(model_dir, trust_remote_code=True).llava.to(device).eval()
        processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
        num_image_tokens = processor.num_image_tokens
    elif model_type == "llava":
        llava = LlavaForConditionalGeneration.from_pretrained(model_dir).to(device).eval()
        processor = LlavaProcessor.from_pretrained(model_dir)
        num_image_tokens = llava_image_token_count(processor)
    else:
        raise ValueError(f"{model_dir}: expected a LLaVA-RadZ or LLaVA checkpoint, found model_type {model_type!r}")
    tokenizer = processor.tokenizer
    image_token = processor.image_token
    return LoadedCheckpoint(
        path=model_dir,
        llava=llava,
        processor=processor,
        tokenizer=tokenizer,
        image_processor=processor.image_processor,
        image_token=image_token,
        image_token_id=tokenizer.convert_tokens_to_ids(image_token),
        num_image_tokens=num_image_tokens,
        chat_template=getattr(processor, "chat_template", None),
    )


def llava_image_token_count(processor: LlavaProcessor) -> int:
    """How many `<image>` tokens `LlavaProcessor` expands one image into: the patches plus the additional tokens,
    minus one with the "default" strategy, which drops CLS."""
    image_processor = processor.image_processor
    size = getattr(image_processor, "crop_size", None) or image_processor.size
    count = (size["height"] // processor.patch_size) * (size["width"] // processor.patch_size)
    count += processor.num_additional_image_tokens
    return count - (1 if processor.vision_feature_select_strategy == "default" else 0)


def pixel_values(image_processor, images: list, device, dtype) -> torch.Tensor:
    """Read radiographs (paths, PIL, arrays, DICOM) and run the image processor: `[N, 3, H, W]`."""
    loaded = load_radiographs(list(images))
    return image_processor(loaded, return_tensors="pt")["pixel_values"].to(device, dtype)


def model_fingerprint(model_dir: str | os.PathLike) -> dict:
    """Name, size and modification time of every file of a checkpoint directory (cheap, unlike hashing weights).

    A hub id or any non-directory is fingerprinted by its name alone.
    """
    path = Path(model_dir)
    if not path.is_dir():
        return {"model": str(model_dir)}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {
        "model": str(path.resolve()),
        "files": [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }


def select_rows(
    classes: np.ndarray, shots: int | None, balance: bool, max_samples: int | None, seed: int
) -> np.ndarray:
    """The label budget: which training items to use, sorted. `classes` holds one int per item (-1 = unusable).

    - `shots`: at most K items per class;
    - `balance`: every class cut to the size of the smallest (class-balanced, as the knee study's 500 images);
      otherwise the natural class mix is kept;
    - `max_samples`: at most this many items in all; with `balance` split evenly between the classes.
    Items are drawn at random with `seed`, so a budget is reproducible.
    """
    rng = np.random.default_rng(seed)
    by_class = {c: rng.permutation(np.flatnonzero(classes == c)) for c in np.unique(classes[classes >= 0])}
    if not by_class:
        return np.array([], dtype=np.int64)
    per_class = min(len(rows) for rows in by_class.values()) if balance else None
    if shots is not None:
        per_class = shots if per_class is None else min(per_class, shots)
    if balance and max_samples is not None:
        per_class = min(per_class, max_samples // len(by_class))
    chosen = np.concatenate([rows[:per_class] for rows in by_class.values()])
    if max_samples is not None and len(chosen) > max_samples:
        chosen = rng.permutation(chosen)[:max_samples]
    return np.sort(chosen)


def settings_key(settings: dict, length: int = 16) -> str:
    """A short stable hash of JSON-able settings (sorted keys), to name caches."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def training_data_key(images: list[str], labels: np.ndarray) -> str:
    """Identity of a training split (paths and labels), part of a trained method's settings."""
    return settings_key({"images": list(images), "labels": np.asarray(labels, dtype=np.float64).tolist()})
