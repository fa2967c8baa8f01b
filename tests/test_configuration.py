"""configuration_llava_radz.py: a strict v5 config, checked at init, on assignment and again at save."""

import pytest
from huggingface_hub.errors import StrictDataclassError

from configuration_llava_radz import LlavaRadZConfig
from processing_llava_radz import LlavaRadZProcessor


def test_config_checks_assignments_and_refuses_to_save_an_inconsistent_state(tmp_path):
    config = LlavaRadZConfig(pooling="last", dkam_lambda=1)
    assert (config.pooling, config.dkam_lambda) == ("last", 1)
    with pytest.raises(StrictDataclassError, match="'alignment' expected one of \\('global', 'cross'\\), got bogus"):
        config.alignment = "bogus"
    with pytest.raises(StrictDataclassError, match="contrastive_temperature"):
        config.contrastive_temperature = 0.0
    assert config.alignment == "global" and config.contrastive_temperature == 0.07  # nothing was set
    # Each field alone is valid, together they are not: save_pretrained validates and writes nothing.
    config.image_cls_token_ids, config.text_cls_token_ids = list(range(8)), list(range(8, 16))
    config.num_cls_tokens = 4
    with pytest.raises(StrictDataclassError, match="image_cls_token_ids has 8 ids but num_cls_tokens=4"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_the_processor_takes_its_defaults_from_the_config(tiny_model):
    model, processor = tiny_model
    tokenizer = LlavaRadZProcessor.add_cls_tokens(processor.tokenizer)  # the default number of tokens
    default = LlavaRadZProcessor(image_processor=processor.image_processor, tokenizer=tokenizer)
    fields = default.config_kwargs()
    fields.pop("image_cls_token_ids"), fields.pop("text_cls_token_ids")
    assert fields == {name: getattr(LlavaRadZConfig, name) for name in fields}
    # The mapping a preset built its config with is the processor's.
    assert processor.config_kwargs() == {name: getattr(model.config, name) for name in processor.config_kwargs()}


def test_config_rejects_inconsistent_fields():
    with pytest.raises(StrictDataclassError, match="'alignment' expected one of \\('global', 'cross'\\), got both"):
        LlavaRadZConfig(alignment="both")
    with pytest.raises(StrictDataclassError, match="dkam_lambda"):
        LlavaRadZConfig(dkam_lambda=1.5)
    with pytest.raises(StrictDataclassError, match="feature_layer=40"):
        LlavaRadZConfig(feature_layer=40)
    with pytest.raises(StrictDataclassError, match=r"text_prompt_template must contain \{text\}"):
        LlavaRadZConfig(text_prompt_template="no placeholder")
    with pytest.raises(StrictDataclassError, match="text_cls_token_ids has 2 ids but num_cls_tokens=8"):
        LlavaRadZConfig(text_cls_token_ids=[1, 2])
