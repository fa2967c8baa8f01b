"""The convolutional vision tower (vision_llava_radz.py) and its label-free first stage (radz/training/tower.py)."""

import json

import datasets
import numpy as np
import pytest
import torch
from conftest import run_python
from PIL import Image

from radz.phantom import write_phantom_dataset
from radz.presets import tiny
from radz.training.tower import pretrain_vision_tower
from vision_llava_radz import LlavaRadZConvVisionConfig, LlavaRadZConvVisionModel


def test_conv_tower_tokens_are_the_last_stage_cells():
    config = LlavaRadZConvVisionConfig(image_size=64, stage_channels=[4, 8, 16])
    assert (config.patch_size, config.hidden_size, config.num_image_tokens) == (8, 16, 64)
    tower = LlavaRadZConvVisionModel(config).eval().requires_grad_(False)
    pixels = torch.randn(2, 3, 64, 64)
    out = tower(pixels)
    assert [tuple(h.shape) for h in out.hidden_states] == [(2, 1024, 4), (2, 256, 8), (2, 64, 16)]
    assert out.last_hidden_state.shape == (2, 64, 16)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state.mean(dim=1))
    # Token k is cell (k // 8, k % 8) of the last feature map: a change in one image corner moves that corner's token.
    changed = pixels.clone()
    changed[:, :, :8, :8] += 5.0
    difference = (tower(changed).last_hidden_state - out.last_hidden_state).abs().sum(dim=(0, 2))
    assert int(difference.argmax()) == 0 and float(difference[-1]) == 0.0


def test_conv_tower_config_errors_name_the_field():
    with pytest.raises(ValueError, match="image_size=60 must be a multiple of the stride 8"):
        LlavaRadZConvVisionConfig(image_size=60, stage_channels=[4, 8, 16])
    with pytest.raises(ValueError, match="stage_channels must be positive"):
        LlavaRadZConvVisionConfig(image_size=64, stage_channels=[4, 0])


def test_conv_model_reads_all_cells_and_reloads_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    model, processor = tiny(vision="conv")
    config = model.config
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-1, "full")
    assert processor.num_image_tokens == config.vision_config.num_image_tokens == 16
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "vision_llava_radz.py").is_file()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["vision_config"]["model_type"] == "llava_radz_conv_vision"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    with torch.no_grad():
        expected = model.eval().get_image_features(**processor(images=[image])).embeds
    np.save(tmp_path / "expected.npy", expected.numpy())
    np.save(tmp_path / "image.npy", np.asarray(image))
    code = f"""
import numpy as np, torch
from PIL import Image
from transformers import AutoModel, AutoProcessor
d = {str(tmp_path)!r}
model = AutoModel.from_pretrained(d, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(d, trust_remote_code=True)
image = Image.fromarray(np.load(d + "/image.npy"))
with torch.no_grad():
    embeds = model.get_image_features(**processor(images=[image])).embeds
print(type(model.llava.model.vision_tower).__name__, np.allclose(embeds.numpy(), np.load(d + "/expected.npy"), atol=1e-6))
"""
    assert run_python(code).split()[-2:] == ["LlavaRadZConvVisionModel", "True"]


def test_tower_pretraining_learns_from_reports_and_touches_only_the_tower(tmp_path):
    write_phantom_dataset(tmp_path, n_train=96, n_validation=2, n_test=2, size=64, seed=0)
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    dataset = datasets.Dataset.from_list(
        [{"image": str(tmp_path / r["image"]), "report": r["report"]} for r in rows]
        + [{"image": str(tmp_path / "missing.png"), "report": "Heart size is normal."}]
    )
    torch.manual_seed(0)
    model, processor = tiny(vision="conv", image_size=32)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    curve = pretrain_vision_tower(model, processor, dataset, steps=60, batch_size=16, learning_rate=3e-3, log_every=20)
    assert [point["step"] for point in curve] == [20, 40, 60]
    # The contrastive loss falls well below its chance value log(16) = 2.77.
    assert curve[0]["loss"] > curve[-1]["loss"] and curve[-1]["loss"] < 2.4, curve
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("vision_tower" in name or "multi_modal_projector" in name for name in changed)
    assert any("vision_tower" in name for name in changed)
