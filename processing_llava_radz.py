"""LLaVA-RadZ processor: prompts, special tokens and the DKAM knowledge base it carries.

Images are read by radiograph_llava_radz.py; the knowledge schema and label matching live in knowledge_llava_radz.py;
the defaults (templates, token formats, `num_cls_tokens`) are those of configuration_llava_radz.py.

This file is remote code: `save_pretrained` copies it, and the files it imports, into every checkpoint. It depends
only on torch, transformers and numpy, and through those files on PIL and (lazily) pydicom (docs/design.md,
"Remote code").
"""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import cached_file

try:
    from .configuration_llava_radz import LlavaRadZConfig, format_cls_tokens
    from .convert_llava_radz import conversation_prompt, original_llava_processor, read_original_config
    from .knowledge_llava_radz import KNOWLEDGE_FILE, match_category, read_knowledge_file, validate_knowledge
    from .knowledge_llava_radz import write_knowledge_file
    from .radiograph_llava_radz import load_radiographs
except ImportError:
    from configuration_llava_radz import LlavaRadZConfig, format_cls_tokens
    from convert_llava_radz import conversation_prompt, original_llava_processor, read_original_config
    from knowledge_llava_radz import KNOWLEDGE_FILE, match_category, read_knowledge_file, validate_knowledge
    from knowledge_llava_radz import write_knowledge_file
    from radiograph_llava_radz import load_radiographs


# Generic, varied sentences for `LlavaRadZProcessor.calibration_inputs`.
CALIBRATION_SENTENCES = [
    "The lungs are clear without focal consolidation.",
    "The cardiac silhouette is enlarged.",
    "Small left pleural effusion with blunting of the costophrenic angle.",
    "Right apical pneumothorax with a visible pleural line.",
    "Patchy airspace opacity in the right lower lobe.",
    "A rounded nodule projects over the left upper zone.",
    "Bilateral perihilar haziness in keeping with pulmonary edema.",
    "Plate-like atelectasis at the left base.",
    "No acute cardiopulmonary abnormality.",
    "Degenerative changes of the thoracic spine.",
    "Support devices are in standard position.",
    "Hyperinflated lungs with flattened hemidiaphragms.",
    "Mild joint space narrowing with small osteophytes.",
    "Ground-glass opacities in both lower zones.",
    "Mediastinal contours are within normal limits.",
    "Healed fracture of the right posterior seventh rib.",
]


def llava_image_token_count(llava_processor) -> int:
    """How many `<image>` tokens a transformers `LlavaProcessor` expands one image into: the patches plus the
    additional tokens, minus one with the "default" feature-select strategy, which drops CLS."""
    image_processor = llava_processor.image_processor
    size = getattr(image_processor, "crop_size", None) or image_processor.size
    patch = llava_processor.patch_size
    count = (size["height"] // patch) * (size["width"] // patch) + llava_processor.num_additional_image_tokens
    return count - (1 if llava_processor.vision_feature_select_strategy == "default" else 0)


# ----------------------------------------------------------------------------------------------------------------
# Processor
# ----------------------------------------------------------------------------------------------------------------


class LlavaRadZProcessor(ProcessorMixin):
    r"""
    Tokenizer + image processor for [`LlavaRadZForZeroShotClassification`].

    `processor(images=..., text=...)` builds the two passes of DFAT:
    - image pass: `image_prompt_template` with `{image}` expanded to `num_image_tokens` `<image>` tokens, then
      the `<ImgCls_*>` tokens → `pixel_values`, `image_input_ids`, `image_attention_mask`;
    - text pass: `text_prompt_template` with the report (truncated to `max_text_tokens`), then the `<TxtCls_*>`
      tokens → `input_ids`, `attention_mask`.
    A knowledge base (`knowledge.json` beside the processor files) gives the DKAM category descriptions.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int = LlavaRadZConfig.image_seq_length,
        num_cls_tokens: int = LlavaRadZConfig.num_cls_tokens,
        image_prompt_template: str = LlavaRadZConfig.image_prompt_template,
        text_prompt_template: str = LlavaRadZConfig.text_prompt_template,
        image_cls_token_format: str = LlavaRadZConfig.image_cls_token_format,
        text_cls_token_format: str = LlavaRadZConfig.text_cls_token_format,
        image_token: str = "<image>",
        max_text_tokens: int = 128,
        chat_template=None,
        **kwargs,
    ):
        self.num_image_tokens = num_image_tokens
        self.num_cls_tokens = num_cls_tokens
        self.image_prompt_template = image_prompt_template
        self.text_prompt_template = text_prompt_template
        self.image_cls_token_format = image_cls_token_format
        self.text_cls_token_format = text_cls_token_format
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        self.max_text_tokens = max_text_tokens
        self.knowledge = None
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        missing = [t for t in self.cls_tokens("image") + self.cls_tokens("text") if t not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(
                f"the tokenizer lacks the special tokens {missing[:3]}…; build the processor with "
                "LlavaRadZProcessor.from_llava(...) or add_cls_tokens(tokenizer, ...)"
            )
        self._image_prompt_ids = None

    # -- special tokens --------------------------------------------------------------------------------------
    def cls_tokens(self, modality: str) -> list[str]:
        fmt = self.image_cls_token_format if modality == "image" else self.text_cls_token_format
        return format_cls_tokens(fmt, self.num_cls_tokens)

    def cls_token_ids(self, modality: str) -> list[int]:
        return self.tokenizer.convert_tokens_to_ids(self.cls_tokens(modality))

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    def config_kwargs(self) -> dict:
        """The `LlavaRadZConfig` fields that must match this processor: the special tokens, their ids and the
        prompts. `from_llava` and the presets build their configs with these."""
        return {
            "num_cls_tokens": self.num_cls_tokens,
            "image_cls_token_ids": self.cls_token_ids("image"),
            "text_cls_token_ids": self.cls_token_ids("text"),
            "image_cls_token_format": self.image_cls_token_format,
            "text_cls_token_format": self.text_cls_token_format,
            "image_prompt_template": self.image_prompt_template,
            "text_prompt_template": self.text_prompt_template,
        }

    @staticmethod
    def add_cls_tokens(
        tokenizer,
        num_cls_tokens: int = LlavaRadZConfig.num_cls_tokens,
        image_format: str = LlavaRadZConfig.image_cls_token_format,
        text_format: str = LlavaRadZConfig.text_cls_token_format,
    ):
        """Add the `<ImgCls_*>` and `<TxtCls_*>` tokens as special tokens (a no-op for those already present)."""
        tokens = format_cls_tokens(image_format, num_cls_tokens) + format_cls_tokens(text_format, num_cls_tokens)
        tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
        return tokenizer

    @classmethod
    def from_llava(cls, llava_dir_or_processor, num_cls_tokens: int = LlavaRadZConfig.num_cls_tokens, vision_tower=None, **kwargs):
        """Build a LLaVA-RadZ processor from a transformers `LlavaProcessor` (object, hub id or directory), or from
        an original-layout LLaVA-1.5 / LLaVA-Med v1.5 directory (convert_llava_radz.py; `vision_tower` overrides its
        `mm_vision_tower`), whose passes are written in that model's conversation format.

        Adds the special tokens to its tokenizer and takes the image-token count from its patch size,
        image size and feature-select strategy, as `LlavaProcessor` expands `<image>`.
        """
        from transformers import LlavaProcessor

        original = None if isinstance(llava_dir_or_processor, LlavaProcessor) else read_original_config(
            llava_dir_or_processor
        )
        if isinstance(llava_dir_or_processor, LlavaProcessor):
            llava_processor = llava_dir_or_processor
        elif original is not None:
            llava_processor = original_llava_processor(llava_dir_or_processor, vision_tower)
            kwargs.setdefault("image_prompt_template", conversation_prompt(original, LlavaRadZConfig.image_prompt_template))
            kwargs.setdefault("text_prompt_template", conversation_prompt(original, LlavaRadZConfig.text_prompt_template))
        else:
            try:
                llava_processor = LlavaProcessor.from_pretrained(llava_dir_or_processor)
            except (OSError, ValueError, TypeError) as error:
                raise ValueError(
                    f"{llava_dir_or_processor}: cannot load a LlavaProcessor from it ({error})"
                ) from error
        tokenizer = cls.add_cls_tokens(llava_processor.tokenizer, num_cls_tokens)
        image_processor = llava_processor.image_processor
        if kwargs.get("num_image_tokens") is None:
            kwargs["num_image_tokens"] = llava_image_token_count(llava_processor)
        return cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            num_cls_tokens=num_cls_tokens,
            image_token=llava_processor.image_token,
            chat_template=llava_processor.chat_template,
            **kwargs,
        )

    # -- prompts ---------------------------------------------------------------------------------------------
    def image_prompt_ids(self) -> list[int]:
        """Token ids of the (fixed) image pass: prompt, expanded image tokens, `<ImgCls_*>`."""
        if self._image_prompt_ids is None:
            before, after = self.image_prompt_template.split("{image}")
            ids = self.tokenizer(before, add_special_tokens=True)["input_ids"]
            ids += [self.image_token_id] * self.num_image_tokens
            ids += self.tokenizer(after, add_special_tokens=False)["input_ids"]
            self._image_prompt_ids = ids + self.cls_token_ids("image")
        return self._image_prompt_ids

    def plain_text_ids(self, text: str) -> list[int]:
        """Token ids of user text (a report, a description, a label prompt), not truncated: special-token strings in
        it (`<image>`, `<TxtCls_3>`, `</s>`...) are encoded as plain text, never as the special tokens."""
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def text_ids(self, text: str) -> list[int]:
        """Token ids of one text pass: prompt, the text (`plain_text_ids`, truncated to `max_text_tokens`),
        `<TxtCls_*>`."""
        before, after = self.text_prompt_template.split("{text}")
        ids = self.tokenizer(before, add_special_tokens=True)["input_ids"]
        ids += self.plain_text_ids(text)[: self.max_text_tokens]
        ids += self.tokenizer(after, add_special_tokens=False)["input_ids"]
        return ids + self.cls_token_ids("text")

    def pad_sequences(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad token id lists (with the pad token, else EOS) into `input_ids` and `attention_mask`."""
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, ids in enumerate(sequences):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        return input_ids, attention_mask

    def __call__(self, images=None, text=None, return_tensors="pt", **kwargs) -> BatchFeature:
        """Encode images and/or texts for the model.

        Returns a `BatchFeature` with `pixel_values`, `image_input_ids`, `image_attention_mask` (images) and
        `input_ids`, `attention_mask` (texts). Texts are right-padded; the model finds the special tokens by id.
        """
        if images is None and text is None:
            raise ValueError("LlavaRadZProcessor needs `images`, `text` or both")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' is supported")
        data = {}
        if images is not None:
            loaded = load_radiographs(images)
            data["pixel_values"] = self.pixel_values(loaded, **kwargs)
            prompt = torch.tensor(self.image_prompt_ids(), dtype=torch.long)
            data["image_input_ids"] = prompt.expand(len(loaded), -1).clone()
            data["image_attention_mask"] = torch.ones_like(data["image_input_ids"])
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            for index, item in enumerate(texts):
                if not isinstance(item, str):
                    raise TypeError(f"text item {index}: expected a string, got {type(item).__name__}")
            data["input_ids"], data["attention_mask"] = self.pad_sequences([self.text_ids(t) for t in texts])
        return BatchFeature(data=data)

    def calibration_inputs(self, num_samples: int = 16, seed: int = 0):
        """A generic calibration batch for `model.calibrate_heads`: seeded noise and gradient images, and
        varied radiology sentences. Prefer a sample of your own training images and reports."""
        rng = np.random.default_rng(seed)
        size = 64
        ramp = np.linspace(0, 255, size, dtype=np.float32)
        images = [
            rng.integers(0, 256, (size, size), dtype=np.uint8)
            if i % 2
            else np.clip(np.add.outer(ramp * rng.uniform(0, 1), ramp * rng.uniform(0, 1)) / 2, 0, 255).astype(np.uint8)
            for i in range(num_samples)
        ]
        texts = [CALIBRATION_SENTENCES[i % len(CALIBRATION_SENTENCES)] for i in range(num_samples)]
        return self(images=images), self(text=texts)

    # -- pixel values: the one pixel path of training, evaluation and the pipeline -----------------------------
    def pixel_values(self, images: list, **kwargs) -> torch.Tensor:
        """`[N, 3, H, W]` float32 pixel values of loaded RGB PIL images (`load_radiograph`): the image processor's
        output. For the usual CLIP-style PIL image processor (resize the shortest edge, centre crop, rescale,
        normalise) it is computed here, with the same bicubic PIL resize, crop and arithmetic, but without the
        processor's per-image numpy round trips, resizing on `torch.get_num_threads()` threads (PIL releases the
        GIL) and normalising the batch at once. `kwargs` go to the image processor, which then does all."""
        settings = None if kwargs else self._resize_settings()
        if settings is None:
            return self.image_processor(images, return_tensors="pt", **kwargs)["pixel_values"]
        with ThreadPoolExecutor(max_workers=max(1, min(len(images), torch.get_num_threads()))) as pool:
            pixels = list(pool.map(lambda image: self._resize_and_crop(image, *settings), images))
        return self._rescale_and_normalize(np.stack(pixels))

    def _resize_settings(self):
        """`(shortest_edge, crop_height, crop_width, resample)` when the image processor is the usual CLIP-style PIL
        one; None otherwise."""
        processor = self.image_processor
        size, crop = getattr(processor, "size", None) or {}, getattr(processor, "crop_size", None) or {}
        usual = (
            getattr(processor, "backend", None) == "pil"
            and all(getattr(processor, f, False) for f in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"))
            and not getattr(processor, "do_pad", False)
            and size.get("shortest_edge") and not size.get("longest_edge")
            # a crop larger than the resized image would need the processor's padding
            and 0 < (crop.get("height") or 0) <= size["shortest_edge"]
            and 0 < (crop.get("width") or 0) <= size["shortest_edge"]
        )
        return (size["shortest_edge"], crop["height"], crop["width"], processor.resample) if usual else None

    def _rescale_and_normalize(self, pixels: np.ndarray) -> torch.Tensor:
        """`[N, H, W, 3]` uint8 → `[N, 3, H, W]` float32, with the image processor's arithmetic (float64 rescale)."""
        processor = self.image_processor
        pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
        mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, -1, 1, 1)
        return (pixels.to(torch.float64) * processor.rescale_factor).to(torch.float32).sub_(mean).div_(std)

    @staticmethod
    def _resize_and_crop(image, shortest_edge: int, crop_height: int, crop_width: int, resample) -> np.ndarray:
        """The resize and centre crop of transformers' PIL image processors (`get_resize_output_image_size` with
        `default_to_square=False`, then `center_crop`), on a PIL image; returns `[H, W, 3]` uint8."""
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(shortest_edge * long / short)
        new_width, new_height = (shortest_edge, new_long) if width <= height else (new_long, shortest_edge)
        top, left = (new_height - crop_height) // 2, (new_width - crop_width) // 2
        resized = image.resize((new_width, new_height), resample=resample)
        return np.asarray(resized.crop((left, top, left + crop_width, top + crop_height)))

    # -- DKAM knowledge --------------------------------------------------------------------------------------
    def set_knowledge(self, knowledge: dict | None):
        self.knowledge = None if knowledge is None else validate_knowledge(knowledge, "processor knowledge")

    def match_category(self, label: str) -> str | None:
        """The knowledge category whose name or synonym matches `label`, or None."""
        return match_category(self.knowledge, label)

    def encode_anchors(self, categories: list[str], max_descriptions: int | None = None) -> BatchFeature:
        """Encode the descriptions of `categories` for `model.get_anchor_features`.

        Returns `anchor_input_ids`, `anchor_attention_mask` and `anchor_category_ids` (which category each
        description belongs to, an index into `categories`).
        """
        if not categories:
            raise ValueError("encode_anchors: the category list is empty")
        texts, owners = [], []
        for index, label in enumerate(categories):
            category = self.match_category(label)
            if category is None:
                raise ValueError(f"encode_anchors: category {label!r} is not in the processor's knowledge base")
            descriptions = self.knowledge[category]["descriptions"][:max_descriptions]
            texts += descriptions
            owners += [index] * len(descriptions)
        encoded = self(text=texts)
        return BatchFeature(
            data={
                "anchor_input_ids": encoded["input_ids"],
                "anchor_attention_mask": encoded["attention_mask"],
                "anchor_category_ids": torch.tensor(owners, dtype=torch.long),
            }
        )

    # -- save / load -----------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, **kwargs):
        result = super().save_pretrained(save_directory, **kwargs)
        if self.knowledge is not None:
            write_knowledge_file(self.knowledge, Path(save_directory) / KNOWLEDGE_FILE)
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
        knowledge_path = cached_file(
            pretrained_model_name_or_path,
            KNOWLEDGE_FILE,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **hub_kwargs,
        )
        if knowledge_path is not None:
            processor.knowledge = read_knowledge_file(knowledge_path)
        return processor


LlavaRadZProcessor.register_for_auto_class()

__all__ = ["LlavaRadZProcessor", "llava_image_token_count"]
