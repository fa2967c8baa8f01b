"""Opening a saved checkpoint, LLaVA-RadZ or plain transformers LLaVA, for the code that needs its LLM and image
processor rather than the zero-shot model: the baselines and knowledge generation."""

from __future__ import annotations

import os
from dataclasses import dataclass

from processing_llava_radz import llava_image_token_count
from transformers import AutoConfig, AutoModel, AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor


@dataclass
class LoadedCheckpoint:
    """A checkpoint opened for the baselines: the LLaVA model, its tokenizer/image processor and image-token layout.

    For a LLaVA-RadZ checkpoint `llava` is the wrapped `model.llava`; the DFAT heads are not used by the baselines.
    """

    path: str
    llava: LlavaForConditionalGeneration
    processor: object
    tokenizer: object
    image_processor: object
    image_token: str
    image_token_id: int
    num_image_tokens: int
    chat_template: str | None


def load_checkpoint(model_dir: str | os.PathLike, device: str | None = None) -> LoadedCheckpoint:
    """Open a LLaVA-RadZ checkpoint (`model_type` "llava_radz", remote code) or a plain transformers LLaVA one, in
    eval mode on `device` (default: where it loads)."""
    model_dir = str(model_dir)
    model_type = AutoConfig.from_pretrained(model_dir, trust_remote_code=True).model_type
    if model_type == "llava_radz":
        llava = AutoModel.from_pretrained(model_dir, trust_remote_code=True).llava
        processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
        num_image_tokens = processor.num_image_tokens
    elif model_type == "llava":
        llava = LlavaForConditionalGeneration.from_pretrained(model_dir)
        processor = LlavaProcessor.from_pretrained(model_dir)
        num_image_tokens = llava_image_token_count(processor)
    else:
        raise ValueError(f"{model_dir}: expected a LLaVA-RadZ or LLaVA checkpoint, found model_type {model_type!r}")
    llava = (llava if device is None else llava.to(device)).eval()
    tokenizer = processor.tokenizer
    image_token = processor.image_token
    return LoadedCheckpoint(
        path=model_dir,
        llava=llava,
        processor=processor,
        tokenizer=tokenizer,
        image_processor=processor.image_processor,
        image_token=image_token,
        image_token_id=tokenizer.convert_tokens_to_ids(image_token),
        num_image_tokens=num_image_tokens,
        chat_template=getattr(processor, "chat_template", None),
    )
