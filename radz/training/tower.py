"""A label-free first stage: image–report contrastive pretraining of the vision tower alone.

Every real LLaVA tower is CLIP-pretrained on image–text pairs before LLaVA sees it, and the paper keeps it frozen.
Offline there is no pretrained tower, so this stage stands in for that pretraining: the tower and the projector
(mean-pooled image tokens → linear) and a TF-IDF bag of the report's words and word pairs (→ linear) are aligned
with CLIP's symmetric InfoNCE over the batch. No label is read. Word pairs keep "no effusion" apart from "small
effusion". The two linear maps are thrown away afterwards; the tower and the projector keep what they learned,
and DFAT trains on from there.

The stage runs once per run: on the main process, which sends the trained tower and projector to every rank (so
that the ranks cannot drift apart, whatever the engine), and saves them to `output_dir/tower_pretraining.safetensors`.
A resumed run loads that file instead of training again (the checkpoints do not hold a frozen tower).

The stage is cheap because the LLM is not run: on the demo model a step of 32 costs about a third of a DFAT step of
16 (0.54–0.63 s against 1.66–1.86 s in `make demo`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from loss_llava_radz import clip_loss
from radiograph_llava_radz import RadiographError, load_radiograph

logger = logging.getLogger(__name__)

TOWER_STATE_FILE = "tower_pretraining.safetensors"
TOWER_CURVE_FILE = "tower_pretraining.json"


class ReportVectorizer:
    """TF-IDF of the words and word pairs of the training reports (the stage's text encoder)."""

    def __init__(self, reports: list[str], max_features: int = 4096):
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=max_features, sublinear_tf=True)
        self.vectorizer.fit(reports)

    @property
    def dim(self) -> int:
        return len(self.vectorizer.vocabulary_)

    def __call__(self, reports: list[str]) -> torch.Tensor:
        return torch.from_numpy(self.vectorizer.transform(reports).toarray().astype(np.float32))


def pooled_image_tokens(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """`[batch, hidden]`: the mean of the projected image tokens that the LLM would receive."""
    config = model.config
    features = model.llava.model.get_image_features(
        pixel_values=pixel_values.to(model.llava.device, model.llava.dtype),
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    ).pooler_output
    return torch.stack([tokens.mean(dim=0) for tokens in features])


def pretrain_vision_tower(
    model,
    processor,
    dataset,
    steps: int,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    projection_dim: int = 256,
    seed: int = 0,
    log_every: int = 25,
) -> list[dict]:
    """Train `model`'s vision tower and projector on `dataset`'s image–report pairs for `steps` steps; in place.

    `dataset` rows need `image` and `report`. Unreadable images and empty reports are skipped and counted. Returns
    the learning curve: `{"step", "loss", "retrieval_top1"}` averaged over every `log_every` steps, with the
    `seconds` elapsed.
    """
    if steps <= 0:
        return []
    reports = [report or "" for report in dataset["report"]]
    vectorizer = ReportVectorizer([r for r in reports if r.strip()])
    inner = model.llava.model
    hidden = model.config.text_config.hidden_size
    generator = torch.Generator().manual_seed(seed)
    image_projection = nn.Linear(hidden, projection_dim)
    text_projection = nn.Linear(vectorizer.dim, projection_dim)
    for layer in (image_projection, text_projection):
        nn.init.normal_(layer.weight, std=layer.in_features**-0.5, generator=generator)
        nn.init.zeros_(layer.bias)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    trained = [inner.vision_tower, inner.multi_modal_projector, image_projection, text_projection]
    parameters = [p for module in trained for p in module.parameters()] + [logit_scale]
    was_training = model.training
    states = {id(p): p.requires_grad for p in parameters}
    for p in parameters:
        p.requires_grad_(True)
    inner.vision_tower.train()
    inner.multi_modal_projector.train()
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1)

    order, rng = [], random.Random(seed)
    curve, sums, skipped, started = [], {"loss": 0.0, "retrieval_top1": 0.0}, 0, time.time()
    for step in tqdm(range(1, steps + 1), desc="tower pretraining", unit="step"):
        images, texts = [], []
        while len(images) < batch_size:
            if not order:
                order = list(range(len(dataset)))
                rng.shuffle(order)
            index = order.pop()
            if not reports[index].strip():
                skipped += 1
                continue
            try:
                images.append(load_radiograph(dataset[index]["image"]))
            except (RadiographError, OSError) as error:
                skipped += 1
                logger.warning("tower pretraining: skipping %s", error)
                continue
            texts.append(reports[index])
        pixel_values = processor(images=images)["pixel_values"]
        image_embeds = F.normalize(image_projection(pooled_image_tokens(model, pixel_values)), dim=-1)
        text_embeds = F.normalize(text_projection(vectorizer(texts).to(image_embeds.device)), dim=-1)
        logits = logit_scale.exp().clamp(max=100.0) * image_embeds @ text_embeds.t()
        loss = clip_loss(logits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        sums["loss"] += float(loss.detach())
        sums["retrieval_top1"] += float((logits.argmax(dim=1) == torch.arange(len(logits))).float().mean())
        if step % log_every == 0 or step == steps:
            count = step - (curve[-1]["step"] if curve else 0)
            means = {k: round(v / count, 4) for k, v in sums.items()}
            curve.append({"step": step, **means, "seconds": round(time.time() - started, 1)})
            sums = dict.fromkeys(sums, 0.0)
            logger.info("tower pretraining %s", curve[-1])
    for p in parameters:
        p.requires_grad_(states[id(p)])
    model.train(was_training)
    if skipped:
        logger.warning("tower pretraining skipped %d unreadable or report-less samples", skipped)
    return curve


def run_tower_stage(model, processor, dataset, args, resuming: bool) -> None:
    """The first stage of `train_radz.py`, once (see the module docstring); `args` are the training arguments.

    On resume the saved result is loaded when it was saved with the same stage settings; otherwise the stage runs.
    """
    settings = {
        "steps": args.tower_pretraining_steps,
        "batch_size": args.tower_pretraining_batch_size,
        "learning_rate": args.tower_pretraining_learning_rate,
        "seed": args.seed,
        "rows": len(dataset),
    }
    inner = model.llava.model
    modules = {"vision_tower": inner.vision_tower, "multi_modal_projector": inner.multi_modal_projector}
    model.to(args.device)  # the stage runs where training will
    saved = Path(args.output_dir) / TOWER_STATE_FILE
    if args.process_index == 0:
        if resuming and _saved_settings(saved) == settings:
            logger.info("tower pretraining: resuming with its saved result %s", saved)
            state = load_file(saved)
            for name, module in modules.items():
                module.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(name + ".")})
        else:
            curve = pretrain_vision_tower(
                model, processor, dataset, args.tower_pretraining_steps, batch_size=args.tower_pretraining_batch_size,
                learning_rate=args.tower_pretraining_learning_rate, seed=args.seed,
            )  # fmt: skip
            saved.parent.mkdir(parents=True, exist_ok=True)
            tensors = {f"{name}.{k}": v.detach().cpu().contiguous() for name, m in modules.items()
                       for k, v in m.state_dict().items()}  # fmt: skip
            temporary = saved.with_suffix(".tmp")
            save_file(tensors, temporary, metadata={"format": "pt", "settings": json.dumps(settings)})
            os.replace(temporary, saved)
            (saved.parent / TOWER_CURVE_FILE).write_text(json.dumps(curve, indent=1))
    if dist.is_available() and dist.is_initialized():
        # The other ranks wait here while the main process trains (a long stage may need a larger --ddp_timeout).
        for module in modules.values():
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)


def _saved_settings(path: Path) -> dict | None:
    """The stage settings a saved result was trained with (None without one)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(path, framework="pt") as handle:
        return json.loads((handle.metadata() or {}).get("settings", "null"))
