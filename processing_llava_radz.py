"""LLaVA-RadZ processor: prompts, special tokens, the DKAM knowledge base; images are read by radiograph_llava_radz.

This file is remote code: `save_pretrained` copies it, and radiograph_llava_radz.py which it imports, into every
checkpoint. It depends only on torch, transformers and numpy, and through that file on PIL and (lazily) pydicom
(docs/design.md, "Remote code").
"""

import json
import re
from pathlib import Path

import numpy as np
import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import cached_file

try:
    from .radiograph_llava_radz import RadiographError, load_radiograph, load_radiographs, to_uint8
except ImportError:
    from radiograph_llava_radz import RadiographError, load_radiograph, load_radiographs, to_uint8
try:
    from .convert_llava_radz import conversation_prompt, original_llava_processor, read_original_config
except ImportError:
    from convert_llava_radz import conversation_prompt, original_llava_processor, read_original_config


KNOWLEDGE_FILE = "knowledge.json"
DEFAULT_IMAGE_PROMPT = "{image}\nDescribe the findings of this chest radiograph."
DEFAULT_TEXT_PROMPT = "Radiology report: {text}"


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


# ----------------------------------------------------------------------------------------------------------------
# Knowledge base: {category: {"synonyms": [...], "descriptions": [...]}}
# ----------------------------------------------------------------------------------------------------------------


def normalize_label(label: str) -> str:
    """Case, underscore and hyphen insensitive key: `Pleural_Thickening` == `pleural thickening`."""
    return re.sub(r"[\s_\-]+", " ", label).strip().lower()


def validate_knowledge(knowledge, source: str = "knowledge") -> dict:
    """Check the knowledge schema; raise a `ValueError` that names the source, the category and the key."""
    if not isinstance(knowledge, dict) or not knowledge:
        raise ValueError(f"{source}: expected a non-empty JSON object {{category: {{synonyms, descriptions}}}}")
    seen = {}
    for category, entry in knowledge.items():
        where = f"{source}: category {category!r}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object with 'synonyms' and 'descriptions'")
        unknown = set(entry) - {"synonyms", "descriptions"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}")
        for key in ("synonyms", "descriptions"):
            values = entry.get(key, [])
            if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
                raise ValueError(f"{where}: '{key}' must be a list of non-empty strings")
        if not entry.get("descriptions"):
            raise ValueError(f"{where}: 'descriptions' is empty; give at least one description")
        for name in [category, *entry.get("synonyms", [])]:
            key = normalize_label(name)
            if key in seen and seen[key] != category:
                raise ValueError(f"{where}: name {name!r} is already used by category {seen[key]!r}")
            seen[key] = category
    return knowledge


def read_knowledge_file(path) -> dict:
    """Read and validate a knowledge JSON file."""
    path = Path(path)
    try:
        knowledge = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{path}: knowledge file not found") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    return validate_knowledge(knowledge, source=str(path))


def write_knowledge_file(knowledge: dict, path) -> None:
    validate_knowledge(knowledge, source=str(path))
    Path(path).write_text(json.dumps(knowledge, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


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
        num_image_tokens: int = 576,
        num_cls_tokens: int = 8,
        image_prompt_template: str = DEFAULT_IMAGE_PROMPT,
        text_prompt_template: str = DEFAULT_TEXT_PROMPT,
        image_cls_token_format: str = "<ImgCls_{}>",
        text_cls_token_format: str = "<TxtCls_{}>",
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
        return [fmt.format(i) for i in range(self.num_cls_tokens)]

    def cls_token_ids(self, modality: str) -> list[int]:
        return self.tokenizer.convert_tokens_to_ids(self.cls_tokens(modality))

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @staticmethod
    def add_cls_tokens(tokenizer, num_cls_tokens: int, image_format="<ImgCls_{}>", text_format="<TxtCls_{}>"):
        """Add the `<ImgCls_*>` and `<TxtCls_*>` tokens as special tokens (a no-op for those already present)."""
        tokens = [image_format.format(i) for i in range(num_cls_tokens)]
        tokens += [text_format.format(i) for i in range(num_cls_tokens)]
        tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
        return tokenizer

    @classmethod
    def from_llava(cls, llava_dir_or_processor, num_cls_tokens: int = 8, vision_tower=None, **kwargs):
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
            kwargs.setdefault("image_prompt_template", conversation_prompt(original, DEFAULT_IMAGE_PROMPT))
            kwargs.setdefault("text_prompt_template", conversation_prompt(original, DEFAULT_TEXT_PROMPT))
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
            size = getattr(image_processor, "crop_size", None) or image_processor.size
            patch = llava_processor.patch_size
            count = (size["height"] // patch) * (size["width"] // patch)
            count += llava_processor.num_additional_image_tokens
            count -= 1 if llava_processor.vision_feature_select_strategy == "default" else 0
            kwargs["num_image_tokens"] = count
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

    def _pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
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
            data["pixel_values"] = self.image_processor(loaded, return_tensors="pt", **kwargs)["pixel_values"]
            prompt = torch.tensor(self.image_prompt_ids(), dtype=torch.long)
            data["image_input_ids"] = prompt.expand(len(loaded), -1).clone()
            data["image_attention_mask"] = torch.ones_like(data["image_input_ids"])
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            for index, item in enumerate(texts):
                if not isinstance(item, str):
                    raise TypeError(f"text item {index}: expected a string, got {type(item).__name__}")
            data["input_ids"], data["attention_mask"] = self._pad([self.text_ids(t) for t in texts])
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

    # -- DKAM knowledge --------------------------------------------------------------------------------------
    def set_knowledge(self, knowledge: dict | None):
        self.knowledge = None if knowledge is None else validate_knowledge(knowledge, "processor knowledge")

    def match_category(self, label: str) -> str | None:
        """The knowledge category whose name or synonym matches `label`, or None."""
        if not self.knowledge:
            return None
        key = normalize_label(label)
        for category, entry in self.knowledge.items():
            if key in (normalize_label(n) for n in [category, *entry.get("synonyms", [])]):
                return category
        return None

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

# The image readers are re-exported: the training code, the baselines and users import them from here.
__all__ = [
    "LlavaRadZProcessor",
    "RadiographError",
    "load_radiograph",
    "load_radiographs",
    "to_uint8",
    "validate_knowledge",
]
