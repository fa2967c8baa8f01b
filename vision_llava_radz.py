"""A small convolutional vision tower that LLaVA's vision interface accepts.

`LlavaForConditionalGeneration` builds its tower with `AutoModel.from_config(config.vision_config)` and reads
`outputs.hidden_states[vision_feature_layer]` as `[batch, tokens, hidden]`. This tower is a stack of
conv–BatchNorm–ReLU–maxpool stages (the CheXNet/torchxrayvision family of chest classifiers, here small enough to
train from scratch on a CPU); each stage's feature map, flattened row by row, is one entry of `hidden_states`, so
the last stage's `(H/2^S)·(W/2^S)` cells become the image tokens. Use it with
`vision_feature_select_strategy="full"` (there is no CLS token) and `vision_feature_layer=-1`.

Why a CNN: a ViT trained from scratch on a few thousand radiographs learns little in a CPU budget, while every real
LLaVA tower is pretrained. A CNN's locality prior stands in for that pretraining (docs/learning.md has the numbers).

This file is remote code: `save_pretrained` copies it into every checkpoint, and importing it registers the tower
with `AutoConfig`/`AutoModel`, so a checkpoint whose `vision_config` names it loads in a fresh process.
"""

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling


class LlavaRadZConvVisionConfig(PreTrainedConfig):
    r"""
    Configuration of [`LlavaRadZConvVisionModel`].

    Args:
        num_channels (`int`, defaults to 3): input channels.
        image_size (`int`, defaults to 128): input height and width.
        stage_channels (`list[int]`, defaults to `[32, 64, 128, 256, 256]`): output channels of each stage; every
            stage halves the resolution, so the tower's stride is `2 ** len(stage_channels)`.
        hidden_size (`int`): channels of the last stage (the width of the image tokens); set from `stage_channels`.
        patch_size (`int`): the stride `2 ** len(stage_channels)`, under the name LLaVA processors use to count image
            tokens (`(image_size // patch_size) ** 2`); set from `stage_channels`.
    """

    model_type = "llava_radz_conv_vision"

    num_channels: int = 3
    image_size: int = 128
    stage_channels: list[int] | None = None
    hidden_size: int | None = None
    patch_size: int | None = None

    def __post_init__(self, **kwargs):
        self.stage_channels = list(self.stage_channels or [32, 64, 128, 256, 256])
        if not self.stage_channels or any(int(c) < 1 for c in self.stage_channels):
            raise ValueError(f"LlavaRadZConvVisionConfig.stage_channels must be positive ints, got {self.stage_channels}")
        self.hidden_size = self.stage_channels[-1]
        self.patch_size = 2 ** len(self.stage_channels)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"LlavaRadZConvVisionConfig.image_size={self.image_size} must be a multiple of the stride "
                f"{self.patch_size} (2 ** {len(self.stage_channels)} stages)"
            )
        super().__post_init__(**kwargs)

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class LlavaRadZConvStage(nn.Module):
    """3×3 conv → BatchNorm → ReLU → 2×2 max-pool."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)

    def forward(self, hidden_states):
        return self.pool(self.act(self.norm(self.conv(hidden_states))))


class LlavaRadZConvVisionModel(PreTrainedModel):
    """The convolutional tower. `forward(pixel_values)` → `BaseModelOutputWithPooling` with
    `last_hidden_state` `[batch, tokens, hidden]` (the last stage's cells), `pooler_output` `[batch, hidden]` (their
    mean) and `hidden_states`, one `[batch, cells, channels]` entry per stage (always returned: LLaVA selects one)."""

    config_class = LlavaRadZConvVisionConfig
    config: LlavaRadZConvVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = []

    def __init__(self, config: LlavaRadZConvVisionConfig):
        super().__init__(config)
        channels = [config.num_channels] + list(config.stage_channels)
        self.stages = nn.ModuleList(LlavaRadZConvStage(a, b) for a, b in zip(channels[:-1], channels[1:]))
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)

    def forward(self, pixel_values: torch.Tensor, return_dict: bool | None = None, **unused) -> BaseModelOutputWithPooling:
        hidden_states = []
        features = pixel_values.to(self.dtype)
        for stage in self.stages:
            features = stage(features)
            hidden_states.append(features.flatten(2).transpose(1, 2))
        tokens = hidden_states[-1]
        return BaseModelOutputWithPooling(
            last_hidden_state=tokens, pooler_output=tokens.mean(dim=1), hidden_states=tuple(hidden_states)
        )


AutoConfig.register(LlavaRadZConvVisionConfig.model_type, LlavaRadZConvVisionConfig, exist_ok=True)
AutoModel.register(LlavaRadZConvVisionConfig, LlavaRadZConvVisionModel, exist_ok=True)

__all__ = ["LlavaRadZConvVisionConfig", "LlavaRadZConvVisionModel"]
