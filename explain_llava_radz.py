"""Explanation heatmaps of LLaVA-RadZ zero-shot scores: where on the image the model finds each label.

Two methods, both over the image tokens (the tower's grid of cells or patches, as the LLM reads them):

- `"similarity"`: each image token's state at `config.feature_layer`, through the image-local head, compared with the
  label's embedding (the comparison `alignment_logits` makes for the image's mean content state), as in CLIP
  patch-similarity maps;
- `"gradient"`: gradient × input on the image tokens as the LLM reads them (layer 0, the projector output), of the
  label's score read from the special tokens (the global-embedding term), as in Grad-CAM / input × gradient.

With a multi-label classifier a label's map is its evidence against its negation ("no {label}"). Each map is upsampled
to the model's input size (the resized, centre-cropped image) and scaled to [0, 1]: 1 where the evidence for the
label is strongest, 0 where it is weakest. `DEFAULT_METHOD` is the one that localised the phantoms' findings better
in `benchmarks/bench_pointing_game.py` (docs/explain.md): the gradient, by a small margin.

This file is remote code: `LlavaRadZForZeroShotClassification.save_pretrained` copies it into every checkpoint,
beside the pipeline that imports it. It depends only on torch (docs/design.md, "Remote code").
"""

import math

import torch
import torch.nn.functional as F

HEATMAP_METHODS = ("similarity", "gradient")
# The pointing game on the make-demo model (SYNTHETIC): similarity 0.068 vs gradient 0.060 strict, 0.146 vs 0.120
# within 8 px; a smaller model reversed the order (0.060 vs 0.070). The margin is a few findings of 383.
DEFAULT_METHOD = "similarity"


def label_heatmaps(model, classifier, model_inputs, method: str = DEFAULT_METHOD) -> torch.Tensor:
    """Heatmaps `[n_images, K, H, W]` in [0, 1] (float32, on the CPU) of n images against the K labels of
    `classifier` (a `ZeroShotClassifier`), over the model's input pixels `[H, W]`: `token_maps` upsampled.

    `model_inputs`: the image keys of `processor(images=...)` (`pixel_values`, `image_input_ids`,
    `image_attention_mask`).
    """
    maps = token_maps(model, classifier, model_inputs, method)
    return _to_pixels(maps, tuple(model_inputs["pixel_values"].shape[-2:]))


def token_maps(model, classifier, model_inputs, method: str = DEFAULT_METHOD) -> torch.Tensor:
    """Per image, label and image token, the evidence of `method`: `[n_images, K, num_image_tokens]` (float32, in
    the tower's row-major order). Runs outside inference mode (the gradient method needs autograd); changes no
    weight."""
    if method not in HEATMAP_METHODS:
        raise ValueError(f"heatmap method {method!r}; expected one of {HEATMAP_METHODS}")
    inputs = {key: model_inputs[key].to(model.device) for key in ("pixel_values", "image_input_ids")}
    mask = model_inputs.get("image_attention_mask")
    inputs["image_attention_mask"] = None if mask is None else mask.to(model.device)
    with torch.inference_mode(False), torch.enable_grad():
        # The classifier is built under inference mode; autograd needs ordinary tensors.
        targets = _readout_targets(classifier)
        pixel_values = inputs["pixel_values"].clone().requires_grad_(method == "gradient")
        features, input_states, feature_states = model.get_image_hidden_states(
            pixel_values, inputs["image_input_ids"], inputs["image_attention_mask"]
        )
        is_image = inputs["image_input_ids"] == model.config.image_token_id
        n = len(is_image)
        if method == "similarity":
            states = feature_states[is_image].view(n, -1, feature_states.shape[-1])
            local = F.normalize(model.image_local_head(states), dim=-1)
            maps = local @ targets["local"].t()  # [n, tokens, K]
            if classifier.multi_label:
                maps = maps - local @ targets["negative_local"].t()
        else:
            maps = _gradient_maps(features, input_states, is_image, targets, classifier.multi_label)
    return maps.detach().float().transpose(1, 2).cpu()


def heatmap_method(return_heatmap):
    """The pipeline's `return_heatmap` option → a method name, or None: False → None, True → `DEFAULT_METHOD`, a
    name of `HEATMAP_METHODS` → itself."""
    if return_heatmap is False or return_heatmap is None:
        return None
    if return_heatmap is True:
        return DEFAULT_METHOD
    if return_heatmap not in HEATMAP_METHODS:
        raise ValueError(f"return_heatmap={return_heatmap!r}; expected True, False or one of {HEATMAP_METHODS}")
    return return_heatmap


def _readout_targets(classifier) -> dict:
    """What each image-side embedding is compared with, per label (and per negation for multi-label): `"global"`
    for the special-token embedding, `"local"` for the content-token embedding (`alignment_logits`; anchored
    labels compare the global embedding with their anchor)."""

    def plain(tensor):
        return None if tensor is None else tensor.clone()

    embeds, local_embeds = plain(classifier.embeds), plain(classifier.local_embeds)
    anchored = classifier.anchored.clone().unsqueeze(1)
    cross = classifier.alignment != "global"
    targets = {
        "global": torch.where(anchored, embeds, local_embeds) if cross else embeds,
        "local": embeds,
    }
    if classifier.multi_label:
        negative, negative_local = plain(classifier.negative_embeds), plain(classifier.negative_local_embeds)
        targets["negative_global"] = negative_local if cross else negative
        targets["negative_local"] = negative
    return targets


def _gradient_maps(features, input_states, is_image, targets, multi_label: bool) -> torch.Tensor:
    """Gradient × input of each label's special-token score on the image tokens at layer 0: `[n, tokens, K]`."""
    scores = features.embeds @ targets["global"].t()  # [n, K]
    if multi_label:
        scores = scores - features.embeds @ targets["negative_global"].t()
    maps = []
    for k in range(scores.shape[1]):
        (grad,) = torch.autograd.grad(scores[:, k].sum(), input_states, retain_graph=k + 1 < scores.shape[1])
        maps.append((grad * input_states).sum(dim=-1)[is_image].view(len(is_image), -1))
    return torch.stack(maps, dim=-1)


def _to_pixels(maps: torch.Tensor, size: tuple) -> torch.Tensor:
    """`[n, K, tokens]` on a square token grid → `[n, K, H, W]` (bilinear), each map scaled to [0, 1]."""
    n, k, tokens = maps.shape
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"heatmaps need a square grid of image tokens; the model has {tokens}")
    grid = maps.reshape(n * k, 1, side, side)
    pixels = F.interpolate(grid, size=size, mode="bilinear", align_corners=False).reshape(n, k, *size)
    low = pixels.amin(dim=(-2, -1), keepdim=True)
    high = pixels.amax(dim=(-2, -1), keepdim=True)
    return ((pixels - low) / (high - low).clamp(min=1e-12)).cpu()


__all__ = ["DEFAULT_METHOD", "HEATMAP_METHODS", "heatmap_method", "label_heatmaps", "token_maps"]
