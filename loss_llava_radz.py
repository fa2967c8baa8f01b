"""The losses of LLaVA-RadZ, and `LlavaRadZLoss`, which computes them over the global batch (open_clip's `ClipLoss`).

The loss functions are small, as in transformers' `modeling_clip.py`. `LlavaRadZLoss` is the model's loss module:
the model's `forward(return_loss=True)` calls it once. On one process it computes the loss of the batch. Under data
parallel (`world_size > 1`; `RadZTrainer` sets it up) it all-gathers the embeddings and labels of every rank first.

Gathered negatives, and exact gradients. Each rank computes the loss of the *global* batch, which is what one
process holding the whole batch computes. DDP, FSDP and DeepSpeed ZeRO shard the parameters, not the batch, and all
three *average* the per-rank gradients. The gathering is arranged so that this average is the gradient of the
global-batch loss:
- `gather_with_grad=False` (the default): `all_gather` carries no gradient, so this rank's own rows are put back
  with their graph, and their gradient is multiplied by the world size.
- `gather_with_grad=True`: the gather is differentiable. Its backward sums the gradients of every rank's loss into
  each rank's own rows, so no scaling is needed.
- `local_loss=True` (with `gather_with_grad`): each rank computes L_CA for its own rows against all rows, a
  `[n_local, N]` logit matrix instead of `[N, N]`, weighted by its share of the batch. The ranks' losses then
  average to the global-batch loss. L_CG needs no negatives and is always computed on the gathered rows.

Parameters every rank uses in full (`logit_scale`, the anchors) get the full gradient on each rank, and averaging
leaves it unchanged. Ranks may hold different numbers of rows (the collator can skip bad samples).

This file is remote code: the modeling file imports it, so `save_pretrained` copies it into every checkpoint. It
depends only on torch and transformers (docs/design.md, "Remote code").
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as functional_collectives
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """InfoNCE for a square logit matrix whose diagonal holds the positive pairs."""
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def clip_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: the mean of the image→text and text→image losses."""
    return (contrastive_loss(logits_per_image) + contrastive_loss(logits_per_image.t())) / 2.0


def alignment_logits(image_embeds, text_embeds, image_local, text_local, logit_scale, alignment: str):
    """`[n_images, n_texts]` logits. `"global"`: image-global · text-global. `"cross"`: the mean of
    image-global · text-local and image-local · text-global (the paper's cross-level similarity)."""
    if alignment == "global":
        return logit_scale * image_embeds @ text_embeds.t()
    return logit_scale * (image_embeds @ text_local.t() + image_local @ text_embeds.t()) / 2.0


def alignment_loss(image_embeds, text_embeds, image_local, text_local, logit_scale, alignment: str):
    """L_CA of DFAT: symmetric InfoNCE over the batch, row i of the images paired with row i of the texts.

    `"global"` is CLIP's loss on the global embeddings; `"cross"` averages the losses of the two cross-level
    pairings (image-global ↔ text-local, image-local ↔ text-global). All inputs are L2-normalised `[batch, dim]`.
    """
    if alignment == "global":
        return clip_loss(logit_scale * image_embeds @ text_embeds.t())
    global_to_local = clip_loss(logit_scale * image_embeds @ text_local.t())
    local_to_global = clip_loss(logit_scale * image_local @ text_embeds.t())
    return (global_to_local + local_to_global) / 2.0


def category_loss(embeds, anchor_embeds, labels, logit_scale, kind: str = "softmax", bias=None):
    """L_CG of DKAM for one modality: align each sample's global embedding with its categories' anchors.

    Args:
        embeds: `[batch, dim]` L2-normalised global embeddings (image or text).
        anchor_embeds: `[num_categories, dim]` L2-normalised anchors.
        labels: `[batch, num_categories]` multi-hot; 1 positive, 0 negative, NaN unknown.
        kind: `"softmax"`: cross-entropy of the softmax over the known categories against the sample's positives
            as a uniform soft target; rows without a positive are skipped. `"sigmoid"`: per-category binary
            cross-entropy of `scale·cos + bias` over the known entries (a sample with only negatives counts).
    Returns the mean over contributing samples (or entries); 0 (still in the graph) when nothing contributes.
    """
    logits = logit_scale * embeds @ anchor_embeds.t()
    known = ~torch.isnan(labels)
    positive = (labels == 1) & known
    if kind == "softmax":
        rows = positive.any(dim=1)
        if not rows.any():
            return logits.sum() * 0.0
        masked = logits[rows].masked_fill(~known[rows], float("-inf"))
        target = positive[rows].float() / positive[rows].sum(dim=1, keepdim=True)
        log_probs = F.log_softmax(masked, dim=1).masked_fill(~known[rows], 0.0)
        return -(target * log_probs).sum(dim=1).mean()
    if not known.any():
        return logits.sum() * 0.0
    if bias is not None:
        logits = logits + bias
    return F.binary_cross_entropy_with_logits(logits[known], positive[known].float())


# ----------------------------------------------------------------------------------------------------------------
# Gathering across ranks
# ----------------------------------------------------------------------------------------------------------------


# The differentiable all-gather of open_clip (`torch.distributed.nn.all_gather` deadlocks beside DDP on gloo), under its
# torch 2.13 name or its older one.
_all_gather_with_grad = (
    getattr(functional_collectives, "all_gather_single_autograd", None)
    or functional_collectives.all_gather_tensor_autograd
)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by `factor`."""

    @staticmethod
    def forward(ctx, tensor, factor: float):
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def shard_sizes(n_local: int, device, world_size: int) -> list[int]:
    """The number of rows of every rank, in rank order."""
    count = torch.tensor([n_local], device=device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    return [int(c) for c in counts]


def gather_features(tensors, local_loss=False, gather_with_grad=False, rank=0, world_size=1, sizes=None):
    """All-gather each `[n_local, ...]` tensor along dim 0 from every rank, in rank order (open_clip's
    `gather_features` for any number of tensors and uneven shards: rows are padded to the longest shard).

    `gather_with_grad`: a differentiable gather. Otherwise, unless `local_loss`, this rank's own rows are put back
    with their graph and their gradient scaled by the world size (see the module docstring).
    """
    sizes = sizes or shard_sizes(len(tensors[0]), tensors[0].device, world_size)
    longest = max(sizes)
    gathered = []
    for tensor in tensors:
        padded = torch.cat([tensor, tensor.new_zeros((longest - len(tensor), *tensor.shape[1:]))])
        if gather_with_grad and tensor.requires_grad:
            parts = list(_all_gather_with_grad(padded, 0, dist.group.WORLD).split(longest))
        else:
            parts = [torch.empty_like(padded) for _ in range(world_size)]
            dist.all_gather(parts, padded.detach().contiguous())
            if not local_loss and tensor.requires_grad:
                parts[rank] = _ScaleGradient.apply(padded, float(world_size))
        gathered.append(torch.cat([part[:n] for part, n in zip(parts, sizes)]))
    return gathered


# ----------------------------------------------------------------------------------------------------------------
# The loss module
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LlavaRadZLossOutput(ModelOutput):
    """
    The terms of `λ·L_CA + (1−λ)·L_CG` (see `LlavaRadZOutput` for their meaning).
    """

    loss: torch.FloatTensor | None = None
    loss_alignment: torch.FloatTensor | None = None
    loss_category: torch.FloatTensor | None = None
    loss_category_image: torch.FloatTensor | None = None
    loss_category_text: torch.FloatTensor | None = None


class LlavaRadZLoss(nn.Module):
    """`λ·L_CA + (1−λ)·L_CG`, over the global batch when `world_size > 1` (see the module docstring).

    Args:
        local_loss: each rank computes L_CA of its own rows against the gathered rows (needs `gather_with_grad`).
        gather_with_grad: gather with a differentiable all-gather instead of scaling the own rows' gradient.
        rank, world_size: this process in the data-parallel group.
    """

    def __init__(self, local_loss=False, gather_with_grad=False, rank=0, world_size=1):
        super().__init__()
        if local_loss and not gather_with_grad:
            raise ValueError(
                "local_loss=True needs gather_with_grad=True: without it a rank's rows miss the gradient of the "
                "other ranks' losses"
            )
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.rank, self.world_size = rank, world_size

    def forward(
        self,
        image_embeds,
        text_embeds,
        image_local_embeds,
        text_local_embeds,
        logit_scale,
        alignment: str = "global",
        anchor_embeds=None,
        labels=None,
        category_kind: str = "softmax",
        category_bias=None,
        dkam_lambda: float = 0.5,
    ) -> LlavaRadZLossOutput:
        """The loss of row i of the images paired with row i of the texts; L_CG too when `labels` are given
        (`[batch, num_categories]`, 1/0/NaN, against `anchor_embeds`)."""
        embeds = [image_embeds, text_embeds, image_local_embeds, text_local_embeds]
        if self.world_size > 1:
            with_labels = embeds + ([labels.to(image_embeds.dtype)] if labels is not None else [])
            sizes = shard_sizes(len(image_embeds), image_embeds.device, self.world_size)
            gathered = gather_features(
                with_labels, self.local_loss, self.gather_with_grad, self.rank, self.world_size, sizes
            )
            all_embeds, labels = gathered[:4], (gathered[4] if labels is not None else None)
        else:
            all_embeds, sizes = embeds, None
        if self.local_loss and self.world_size > 1:
            loss_alignment = self._local_alignment_loss(embeds, all_embeds, logit_scale, alignment, sizes)
        else:
            loss_alignment = alignment_loss(*all_embeds, logit_scale, alignment)
        if labels is None:
            return LlavaRadZLossOutput(loss=loss_alignment, loss_alignment=loss_alignment)
        labels = labels.to(image_embeds.device, image_embeds.dtype)
        category_image, category_text = (
            category_loss(side, anchor_embeds, labels, logit_scale, category_kind, category_bias)
            for side in (all_embeds[0], all_embeds[1])
        )
        loss_category = (category_image + category_text) / 2.0
        return LlavaRadZLossOutput(
            loss=dkam_lambda * loss_alignment + (1.0 - dkam_lambda) * loss_category,
            loss_alignment=loss_alignment,
            loss_category=loss_category,
            loss_category_image=category_image,
            loss_category_text=category_text,
        )

    def _local_alignment_loss(self, embeds, all_embeds, logit_scale, alignment, sizes):
        """This rank's share of L_CA: its rows against all rows, weighted so that the ranks' losses average to
        the global-batch `alignment_loss`."""
        image, text, image_local, text_local = embeds
        all_image, all_text, all_image_local, all_text_local = all_embeds
        pairs = [(image, text, all_image, all_text)]
        if alignment != "global":
            pairs = [(image, text_local, all_image, all_text_local), (image_local, text, all_image_local, all_text)]
        offset = sum(sizes[: self.rank])
        targets = torch.arange(offset, offset + len(image), device=image.device)
        losses = [
            (
                F.cross_entropy(logit_scale * rows_a @ all_b.t(), targets)
                + F.cross_entropy(logit_scale * rows_b @ all_a.t(), targets)
            )
            / 2.0
            for rows_a, rows_b, all_a, all_b in pairs
        ]
        return sum(losses) / len(losses) * (len(image) * self.world_size / sum(sizes))
