"""DKAM in the model: anchor encoding, the category loss L_CG and the total loss."""

import math

import numpy as np
import pytest
import torch

from conftest import TINY_KNOWLEDGE
from modeling_llava_radz import category_loss
from radz.presets import tiny

CATEGORIES = list(TINY_KNOWLEDGE)
REPORTS = ["the heart is enlarged", "fluid at the left base", "clear lungs", "big heart and effusion"]
LABELS = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=torch.float32)


def images(count, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (32, 32), dtype=np.uint8) for _ in range(count)]


def test_anchor_features_have_one_normalised_row_per_category(tiny_model):
    model, processor = tiny_model
    anchors = processor.encode_anchors(CATEGORIES)
    assert anchors["anchor_category_ids"].tolist() == [0, 0, 1, 1, 2, 2]
    embeds = model.get_anchor_features(**anchors)
    assert embeds.shape == (3, model.config.projection_dim)
    torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(3))
    # A synonym finds its category; the order of the categories is the order asked for.
    reordered = model.get_anchor_features(**processor.encode_anchors(["normal", "Effusion", "enlarged heart"]))
    torch.testing.assert_close(reordered, embeds.flip(0))


@pytest.mark.parametrize("anchor_head", ["shared", "separate"])
def test_anchor_is_the_head_of_the_mean_description_state(anchor_head):
    torch.manual_seed(0)
    model, processor = tiny(anchor_head=anchor_head)
    processor.set_knowledge(TINY_KNOWLEDGE)
    head = model.text_global_head if anchor_head == "shared" else model.anchor_head
    assert (model.anchor_head is None) == (anchor_head == "shared")
    anchors = processor.encode_anchors(["Cardiomegaly"])
    with torch.no_grad():
        pooled = model.get_text_features(
            anchors["anchor_input_ids"], anchors["anchor_attention_mask"]
        ).pooled_cls_states
        expected = torch.nn.functional.normalize(head(pooled.mean(dim=0, keepdim=True)), dim=-1)
        torch.testing.assert_close(model.get_anchor_features(**anchors), expected)


@pytest.mark.parametrize("anchor_head", ["shared", "separate"])
def test_gradients_reach_the_anchor_head_and_the_special_token_rows(anchor_head):
    torch.manual_seed(0)
    model, processor = tiny(anchor_head=anchor_head)
    processor.set_knowledge(TINY_KNOWLEDGE)
    inputs = processor(images=images(4), text=REPORTS)
    out = model(**inputs, **processor.encode_anchors(CATEGORIES), labels=LABELS, return_loss=True)
    out.loss.backward()
    head = model.text_global_head if anchor_head == "shared" else model.anchor_head
    assert head.fc2.weight.grad.abs().sum() > 0
    embedding_grad = model.get_input_embeddings().weight.grad
    for token_id in model.config.text_cls_token_ids + model.config.image_cls_token_ids:
        assert embedding_grad[token_id].abs().sum() > 0, token_id


def test_total_loss_is_the_lambda_mix_and_unlabelled_samples_add_nothing(tiny_model):
    model, processor = tiny_model
    inputs = processor(images=images(4), text=REPORTS)
    anchors = processor.encode_anchors(CATEGORIES)
    with torch.no_grad():
        out = model(**inputs, **anchors, labels=LABELS, return_loss=True)
        lam = model.config.dkam_lambda
        torch.testing.assert_close(out.loss, lam * out.loss_alignment + (1 - lam) * out.loss_category)
        # Sample 2 unlabelled (NaN): L_CG equals that over the three labelled samples only.
        partial = LABELS.clone()
        partial[2] = float("nan")
        with_nan = model(**inputs, **anchors, labels=partial, return_loss=True).loss_category
        keep = [0, 1, 3]
        expected = model.category_loss(out.image_embeds[keep], out.text_embeds[keep], out.anchor_embeds, LABELS[keep])
        torch.testing.assert_close(with_nan, expected)
        # No labelled sample at all: L_CG is zero.
        none = model(**inputs, **anchors, labels=torch.full_like(LABELS, float("nan")), return_loss=True)
        assert none.loss_category.item() == 0.0


def test_category_loss_forms():
    anchors = torch.eye(3)
    embeds = torch.eye(3)
    labels = torch.eye(3)
    scale = torch.tensor(10.0)
    # Softmax: each row's own anchor at cos 1, the others at 0.
    expected = -math.log(math.exp(10) / (math.exp(10) + 2))
    torch.testing.assert_close(category_loss(embeds, anchors, labels, scale, "softmax"), torch.tensor(expected))
    # Two positives share the target mass.
    two = category_loss(torch.tensor([[1.0, 0, 0]]), anchors, torch.tensor([[1.0, 1, 0]]), scale, "softmax")
    logp = torch.log_softmax(torch.tensor([10.0, 0, 0]), 0)
    torch.testing.assert_close(two, -(logp[0] + logp[1]) / 2)
    # Unknown categories leave the softmax.
    masked = category_loss(embeds[:1], anchors, torch.tensor([[1.0, float("nan"), 0]]), scale, "softmax")
    torch.testing.assert_close(masked, torch.tensor(-math.log(math.exp(10) / (math.exp(10) + 1))))
    # Sigmoid: a binary loss per known entry.
    sig = category_loss(embeds, anchors, labels, scale, "sigmoid", bias=torch.tensor(-5.0))
    logits = 10 * torch.eye(3) - 5
    torch.testing.assert_close(sig, torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.eye(3)))


def test_unknown_category_and_shape_mismatch_are_named(tiny_model):
    model, processor = tiny_model
    with pytest.raises(ValueError, match="'Hernia' is not in the processor's knowledge base"):
        processor.encode_anchors(["Cardiomegaly", "Hernia"])
    with pytest.raises(ValueError, match="category list is empty"):
        processor.encode_anchors([])
    inputs = processor(images=images(4), text=REPORTS)
    with pytest.raises(ValueError, match=r"labels have shape \(4, 2\), expected \(batch=4, num_categories=3\)"):
        model(**inputs, **processor.encode_anchors(CATEGORIES), labels=LABELS[:, :2], return_loss=True)
    with pytest.raises(ValueError, match="labels need anchors"):
        model(**inputs, labels=LABELS, return_loss=True)


@pytest.mark.parametrize("kind, lr, steps", [("softmax", 1e-3, 40), ("sigmoid", 3e-4, 80)])
def test_category_loss_falls_when_training_on_a_labelled_batch(kind, lr, steps):
    torch.manual_seed(0)
    model, processor = tiny(category_loss=kind, dkam_lambda=0.0)
    processor.set_knowledge(TINY_KNOWLEDGE)
    inputs = processor(images=images(4, seed=2), text=REPORTS)
    anchors = processor.encode_anchors(CATEGORIES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        out = model(**inputs, **anchors, labels=LABELS, return_loss=True)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss_category.item())
    assert losses[-1] < 0.5 * losses[0], losses[::5]
    # The trained anchors rank each image's own categories first.
    with torch.no_grad():
        out = model(**inputs, **anchors)
        scores = out.image_embeds @ out.anchor_embeds.t()
    for row, labels in enumerate(LABELS):
        top = scores[row].topk(int(labels.sum())).indices
        assert set(top.tolist()) == set(labels.nonzero().flatten().tolist())
