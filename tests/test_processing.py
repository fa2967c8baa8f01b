"""processing_llava_radz.py: the two DFAT passes and their special tokens."""

from conftest import random_images


def test_processor_builds_both_prompts_with_special_tokens(tiny_model):
    model, processor = tiny_model
    inputs = processor(images=random_images(2), text=["short", "a much longer report about the lungs"])
    image_ids = inputs["image_input_ids"]
    assert (image_ids == model.config.image_token_id).sum(dim=1).tolist() == [processor.num_image_tokens] * 2
    assert image_ids[0, -processor.num_cls_tokens :].tolist() == model.config.image_cls_token_ids
    for row in range(2):
        length = int(inputs["attention_mask"][row].sum())
        tail = inputs["input_ids"][row, length - processor.num_cls_tokens : length].tolist()
        assert tail == model.config.text_cls_token_ids
    # Long reports are truncated, never their special tokens.
    processor.max_text_tokens = 5
    ids = processor(text=["word " * 200])["input_ids"][0].tolist()
    assert ids[-processor.num_cls_tokens :] == model.config.text_cls_token_ids
    assert len(ids) < 40
