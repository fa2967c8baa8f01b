"""radz/presets.py: models built from a pretrained LLM."""

import pytest
import torch
from transformers import LlamaConfig

from conftest import REPORTS, random_images
from radz.presets import build_tokenizer


@pytest.mark.parametrize("tied", [True, False])
def test_build_from_llm_keeps_the_first_layers_of_a_pretrained_llm(tied):
    from transformers import CLIPVisionConfig, LlamaForCausalLM

    from radz.presets import build_from_llm

    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    torch.manual_seed(0)
    llm = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
            vocab_size=vocab, tie_word_embeddings=tied,
        )
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    model, processor = build_from_llm(llm, tokenizer, vision, num_llm_layers=2, num_cls_tokens=3, projection_dim=16)
    language_model = model.llava.model.language_model
    assert len(language_model.layers) == 2 and model.config.text_config.num_hidden_layers == 2
    for key, value in llm.model.state_dict().items():
        if key.startswith("layers.2."):
            continue
        ours = language_model.state_dict()[key]
        if key == "embed_tokens.weight":
            torch.testing.assert_close(ours[: len(value)], value)
            torch.testing.assert_close(ours[len(value) :], value.mean(0).expand(len(ours) - len(value), -1))
        else:
            torch.testing.assert_close(ours, value, msg=key)
    if not tied:
        torch.testing.assert_close(model.llava.lm_head.weight[:vocab], llm.lm_head.weight)
    out = model(**processor(images=random_images(2), text=REPORTS[:2]), return_loss=True)
    assert torch.isfinite(out.loss) and out.image_embeds.shape == (2, 16)
