"""Explanation heatmaps (explain_llava_radz.py, through the pipeline), overlays and the pointing game
(radz/explain.py)."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from explain_llava_radz import HEATMAP_METHODS, token_maps
from pipeline_llava_radz import LlavaRadZZeroShotImageClassificationPipeline
from radz.explain import crop_box, heatmap_peak, overlay, pointing_game
from radz.presets import tiny
from zero_shot_llava_radz import build_zero_shot_classifier

LABELS = ["Cardiomegaly", "Nodule", "Pleural Effusion"]


@pytest.fixture
def clf(tiny_model):
    model, processor = tiny_model
    return LlavaRadZZeroShotImageClassificationPipeline(model=model.eval(), processor=processor, device="cpu")


def image(seed, shape=(48, 40)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_checkpoint_carries_the_explanation_and_calibration_code(tiny_checkpoint):
    for name in ("explain_llava_radz.py", "calibration_llava_radz.py"):
        source = (tiny_checkpoint / name).read_text()
        assert not re.search(r"^\s*(from|import)\s+\.?radz\b", source, re.MULTILINE), name  # remote code


def test_return_heatmap_adds_one_map_per_label(clf):
    plain = clf(image(0), candidate_labels=LABELS)
    assert all(set(result) == {"label", "score"} for result in plain)  # only when asked
    for method in (True, *HEATMAP_METHODS):
        for multi_label in (False, True):
            results = clf([image(0), image(1)], candidate_labels=LABELS, return_heatmap=method,
                          multi_label=multi_label)
            reference = clf([image(0), image(1)], candidate_labels=LABELS, multi_label=multi_label)
            for ranked, expected in zip(results, reference):
                assert [(r["label"], r["score"]) for r in ranked] == [(r["label"], r["score"]) for r in expected]
                for result in ranked:
                    heatmap = result["heatmap"]
                    assert heatmap.shape == (32, 32) and heatmap.dtype == np.float32  # the model's input
                    assert heatmap.min() == 0 and heatmap.max() == pytest.approx(1)
            maps = [result["heatmap"] for result in results[0]]
            assert not np.allclose(maps[0], maps[1])  # each label its own map
    with pytest.raises(ValueError, match="return_heatmap='occlusion'"):
        clf(image(0), candidate_labels=LABELS, return_heatmap="occlusion")


def _inputs(processor, images):
    return processor(images=[Image.fromarray(i).convert("RGB").resize((32, 32)) for i in images], return_tensors="pt")


@pytest.mark.parametrize("multi_label", [False, True])
def test_similarity_map_is_each_image_token_through_the_local_head(tiny_model, multi_label):
    model, processor = tiny_model
    model.eval()
    inputs = _inputs(processor, [image(2), image(3)])
    with torch.inference_mode():
        classifier = build_zero_shot_classifier(model, processor, LABELS, multi_label=multi_label)
        maps = token_maps(model, classifier, inputs, "similarity")
        # By hand: the states of the <image> positions at the feature layer, one at a time through the local head.
        out = model.llava.model(input_ids=inputs["image_input_ids"], pixel_values=inputs["pixel_values"],
                                attention_mask=inputs["image_attention_mask"], output_hidden_states=True)
        states = out.hidden_states[model.config.feature_layer]
        positions = (inputs["image_input_ids"][0] == model.config.image_token_id).nonzero().flatten()
        assert len(positions) == processor.num_image_tokens == maps.shape[-1] == 16
        for n in range(2):
            for t, position in enumerate(positions.tolist()):
                local = F.normalize(model.image_local_head(states[n, position]), dim=-1)
                expected = local @ classifier.embeds.t()
                if multi_label:
                    expected = expected - local @ classifier.negative_embeds.t()
                torch.testing.assert_close(maps[n, :, t], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("alignment", ["global", "cross"])
def test_gradient_map_is_gradient_times_input_of_the_readout_score(alignment):
    torch.manual_seed(0)
    model, processor = tiny(alignment=alignment)
    model.eval()
    inputs = _inputs(processor, [image(4)])
    with torch.inference_mode():
        classifier = build_zero_shot_classifier(model, processor, LABELS, use_knowledge=False)
    maps = token_maps(model, classifier, inputs, "gradient")
    # By finite differences: scale the input embedding x of one image token by 1 ± eps; the special-token score
    # (the global image embedding against the labels' global text embeddings, or their local ones under cross
    # alignment) changes by about 2 eps (gradient · x).
    target = classifier.embeds if alignment == "global" else classifier.local_embeds
    ids = inputs["image_input_ids"]
    with torch.no_grad():
        base = model.llava.model(input_ids=ids, pixel_values=inputs["pixel_values"],
                                 output_hidden_states=True).hidden_states[0]

        def score(embeds):
            # The image pass by hand from given input embeddings (the full LLM run, which test_feature_layer shows
            # equals the stopped one): the special-token states at the feature layer, mean-pooled, the global head.
            states = model.llava.model(inputs_embeds=embeds, output_hidden_states=True).hidden_states
            cls_states = states[model.config.feature_layer][torch.isin(ids, model._cls_ids("image"))]
            pooled = cls_states.view(1, model.config.num_cls_tokens, -1).mean(dim=1)
            embeds = F.normalize(model.image_global_head(pooled), dim=-1)
            return (embeds @ target.t())[0]

        positions = (inputs["image_input_ids"][0] == model.config.image_token_id).nonzero().flatten()
        eps = 1e-2
        for t in (0, 5, 15):
            up, down = base.clone(), base.clone()
            up[0, positions[t]] *= 1 + eps
            down[0, positions[t]] *= 1 - eps
            expected = (score(up) - score(down)) / (2 * eps)
            assert expected.abs().max() > 1e-4  # the token matters to the readout
            torch.testing.assert_close(maps[0, :, t], expected, rtol=0.02, atol=1e-5)


def test_overlay_blends_the_centre_crop(tmp_path):
    gray = np.full((40, 60), 100, np.uint8)  # wide: the heatmap covers the centred 40 x 40 square
    heatmap = np.zeros((8, 8), np.float32)
    heatmap[2:6, 2:6] = 1.0
    path = tmp_path / "overlay.png"
    result = overlay(gray, heatmap, path, alpha=0.5)
    assert crop_box(60, 40) == (10, 0, 50, 40)
    written = np.asarray(Image.open(path))
    assert written.shape == (40, 60, 3) and np.array_equal(written, np.asarray(result))
    assert (written[:, :10] == 100).all() and (written[:, 50:] == 100).all()  # outside the crop: unchanged
    assert (written[0, 10] == 100).all()  # heatmap 0: unchanged
    centre = written[20, 30].astype(int)
    assert not (centre == 100).all() and centre.max() > 150  # heatmap 1: half the colormap's bright end
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        overlay(gray, heatmap * 2)
    with pytest.raises(ValueError, match="2-D"):
        overlay(gray, heatmap[None])


def test_pointing_game_by_hand():
    mask = np.zeros((10, 10), bool)
    mask[0:4, 0:4] = True  # area 16 %, not the centre
    hit = np.zeros((5, 5))
    hit[0, 0] = 1  # maximum at heatmap cell (0, 0) → image pixel (1, 1): inside
    miss = np.zeros((5, 5))
    miss[4, 4] = 1
    plateau = np.ones((5, 5))  # all equal: the centroid, (5, 5): outside
    assert heatmap_peak(hit, (10, 10)) == (1, 1) and heatmap_peak(plateau, (10, 10)) == (5, 5)
    result = pointing_game([hit, miss, plateau, hit], [mask, mask, mask, np.zeros((10, 10), bool)])
    assert result == {"n": 3, "hit_rate": pytest.approx(1 / 3), "random": pytest.approx(0.16), "centre": 0.0,
                      "empty": 1}
    # With a tolerance, the region widens: (5, 5) is 2.83 px from the region's corner pixel (3, 3).
    assert pointing_game([plateau], [mask], tolerance=2)["hit_rate"] == 0
    widened = pointing_game([plateau], [mask], tolerance=3)
    assert widened["hit_rate"] == 1 and widened["random"] > 0.16
    with pytest.raises(ValueError):
        pointing_game([hit], [mask, mask])
