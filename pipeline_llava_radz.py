"""`pipeline("zero-shot-image-classification", model=checkpoint, trust_remote_code=True)` for LLaVA-RadZ.

Scores radiographs against free-text labels: single-label (softmax over the labels, as transformers' own
zero-shot pipeline) or multi-label (each label against its negation "no {label}", CheXzero-style), with prompt
ensembles and DKAM knowledge anchors. The label side is `zero_shot_llava_radz.build_zero_shot_classifier` (the
classifier `RadZTrainer.evaluate` measures too), built once per label set and cached on the pipeline.

This file is remote code: every checkpoint written by `LlavaRadZForZeroShotClassification.save_pretrained` carries it
and declares it in `config.custom_pipelines`. It depends only on torch, transformers, numpy, PIL
(docs/design.md, "Remote code").
"""

import os
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from transformers import AutoModel, Pipeline, ZeroShotImageClassificationPipeline
from transformers.feature_extraction_utils import BatchFeature
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.utils import logging

try:
    from .calibration_llava_radz import calibrated_probabilities, resolve_calibration
    from .explain_llava_radz import add_heatmaps, heatmap_method
    from .processing_llava_radz import RadiographError, load_radiograph, normalize_label
    from .radiograph_llava_radz import is_study, study_files
    from .zero_shot_llava_radz import ZeroShotClassifier, build_zero_shot_classifier, label_categories
except ImportError:
    from calibration_llava_radz import calibrated_probabilities, resolve_calibration
    from explain_llava_radz import add_heatmaps, heatmap_method
    from processing_llava_radz import RadiographError, load_radiograph, normalize_label
    from radiograph_llava_radz import is_study, study_files
    from zero_shot_llava_radz import ZeroShotClassifier, build_zero_shot_classifier, label_categories


logger = logging.get_logger(__name__)

TASK = "zero-shot-image-classification"
OPTIONS = (
    "candidate_labels",
    "hypothesis_template",
    "templates",
    "multi_label",
    "use_knowledge",
    "negative_template",
    "batch_size",
    "window_index",
    "return_heatmap",
    "calibrated",
)
DEFAULT_OPTIONS = {
    "candidate_labels": None,
    "hypothesis_template": None,
    "templates": None,
    "multi_label": False,
    "use_knowledge": True,
    "negative_template": "no {}",
    "batch_size": 8,
    "window_index": 0,
    "return_heatmap": False,
    "calibrated": False,
}
KNOWLEDGE_MODES = (True, False, "generate")
# use_knowledge="generate": the prompt asking the model's LLM to describe a label it has no knowledge of.
DESCRIPTION_PROMPT = (
    "Describe how {} appears on a radiograph and what distinguishes it from other findings, "
    "in at most three short sentences."
)
MAX_GENERATED_DESCRIPTIONS = 3
# DICOM Modality values of projection radiographs (and of the secondary captures radiographs are often exported as).
RADIOGRAPH_MODALITIES = ("CR", "DX", "DR", "RG", "SC", "OT")
CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG", "LUNGS")


def parse_descriptions(text: str) -> list[str]:
    """Sentences of a generated answer, without list markers; at most `MAX_GENERATED_DESCRIPTIONS`."""
    sentences = []
    for piece in re.split(r"(?<=[.!?])\s+|\n+", text):
        piece = re.sub(r"^\s*(?:[-*•]|\d+[.)])\s*", "", piece).strip()
        if re.search(r"[A-Za-z]{2}", piece):
            sentences.append(piece)
    return sentences[:MAX_GENERATED_DESCRIPTIONS]


def chest_view_problems(facts: dict) -> list[str]:
    """Why a DICOM (`radiograph_llava_radz.dicom_facts`) may not suit a chest radiograph classifier: a lateral
    view, a body part other than chest, a modality other than a radiograph's. Absent facts raise nothing."""
    problems = []
    view, body_part, modality = facts.get("view"), facts.get("body_part"), facts.get("modality")
    if view and (view in ("LL", "RL", "LAT") or "LATERAL" in view):
        problems.append(f"ViewPosition {view} is a lateral view; the classifier expects frontal (PA or AP) views")
    if body_part and not set(re.split(r"[^A-Z]+", body_part)) & set(CHEST_BODY_PARTS):
        problems.append(f"BodyPartExamined is {body_part}, not chest")
    if modality and modality not in RADIOGRAPH_MODALITIES:
        problems.append(f"Modality is {modality}, not a radiograph (CR or DX)")
    return problems


def _check_template(template, option: str) -> str:
    if not isinstance(template, str):
        raise TypeError(f"{option}: expected a string with one '{{}}', got {type(template).__name__}")
    if template.count("{}") != 1:
        raise ValueError(f"{option} {template!r} must contain '{{}}' exactly once (where the label goes)")
    return template


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


class LlavaRadZZeroShotImageClassificationPipeline(Pipeline):
    """Zero-shot classification of radiographs with [`LlavaRadZForZeroShotClassification`].

    ```python
    clf = pipeline("zero-shot-image-classification", model=checkpoint_dir, trust_remote_code=True)
    clf("cxr.dcm", candidate_labels=["Cardiomegaly", "Pleural Effusion", "No Finding"])
    # [{"score": 0.71, "label": "Cardiomegaly", "anchor": True}, ...]  sorted by score
    clf(["a.png", "b.dcm"], candidate_labels=[...], multi_label=True)  # a list of such lists
    ```

    Call options (also accepted by `pipeline(...)` as defaults):
        candidate_labels (`list[str]`): the labels; no empty or duplicate ones.
        hypothesis_template (`str`, *optional*): one prompt template with `{}` for the label (default: the model's
            `config.label_template`, "IMPRESSION: {}."; the processor's text prompt wraps it).
        templates (`list[str]`, *optional*): a prompt ensemble; a label's embedding is the normalised mean over them.
        multi_label (`bool`, defaults to False): score each label independently as
            `softmax([s(label prompt), s(negative prompt)])[0]`, in [0, 1]; otherwise softmax over the labels.
        use_knowledge (`True`, `False` or `"generate"`): score labels found in the processor's knowledge base against
            their DKAM anchor. `"generate"` first has the model's LLM describe labels the base lacks (once per label
            for the pipeline's lifetime) and adds them to `processor.knowledge`.
        negative_template (`str`, defaults to `"no {}"`): the negation used by `multi_label`, inside every template.
        batch_size (`int`, defaults to 8): images (and prompts) per forward pass.
        window_index (`int`, defaults to 0): which of a DICOM's VOI LUTs or windows renders it.
        return_heatmap (`bool` or `str`, defaults to False): also give each result its label's `"heatmap"`, `[H, W]`
            in [0, 1] over the model's input (the resized, centre-cropped image); True for the default method, or a
            name of `explain_llava_radz.HEATMAP_METHODS` (`overlay` in the package's radz/explain.py draws it).
        calibrated (`bool`, defaults to False): multi-label scores Platt-scaled per label by `config.calibration`
            (`evaluate_radz.py --calibrate`), for the settings it was fitted with (`calibration_llava_radz.py`).

    Each result dict also says `"anchor"`: whether the label was scored against a knowledge anchor. Label
    embeddings are cached per (labels, templates, knowledge, multi_label): clear `label_cache` after changing
    the model's weights. A study (a folder of DICOM files or a DICOMDIR) is one input: its result is a list of
    `{"file", "view", "results"}`, one per image (`radiograph_llava_radz.study_files`). A DICOM whose
    ViewPosition, BodyPartExamined or Modality does not fit a chest radiograph is scored with a warning
    (`chest_view_problems`); so is a label whose prompt is longer than the processor's `max_text_tokens`.
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False

    def __new__(cls, model=None, *args, **kwargs):
        # Registering this class takes over the task for the whole process; other models (CLIP, SigLIP...) keep
        # transformers' own pipeline.
        if model is not None and getattr(model.config, "model_type", None) != "llava_radz":
            return ZeroShotImageClassificationPipeline(*args, model=model, **kwargs)
        return super().__new__(cls)

    def __init__(self, model, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        if self.processor is None:
            raise ValueError(f"{type(self).__name__} needs the LlavaRadZProcessor: pass processor=...")
        self.label_cache: dict = {}
        self.generated_descriptions: dict[str, list[str]] = {}

    # -- options -----------------------------------------------------------------------------------------------
    def _sanitize_parameters(self, **kwargs):
        unknown = sorted(set(kwargs) - set(OPTIONS))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unexpected option(s) {unknown}; expected some of {list(OPTIONS)}")
        # `__call__` reads every option at once (labels and images are batched there), so all go to one dict.
        return {}, dict(kwargs), {}

    def _options(self, kwargs) -> dict:
        """Pipeline defaults updated by the call's options, validated (before any model work)."""
        options = dict(DEFAULT_OPTIONS)
        if self._batch_size is not None:
            options["batch_size"] = self._batch_size
        options.update(self._forward_params)
        options.update(self._sanitize_parameters(**kwargs)[1])

        options["candidate_labels"] = self._check_labels(options["candidate_labels"])
        if options["templates"] is not None and options["hypothesis_template"] is not None:
            raise ValueError("give either hypothesis_template (one template) or templates (an ensemble), not both")
        if options["templates"] is not None:
            if isinstance(options["templates"], str) or not options["templates"]:
                raise ValueError("templates must be a non-empty list of strings with '{}'")
            templates = tuple(_check_template(t, "template") for t in options["templates"])
        elif options["hypothesis_template"] is not None:
            templates = (_check_template(options["hypothesis_template"], "hypothesis_template"),)
        else:
            templates = None  # label_embeddings uses the model's config.label_template
        options["templates"] = templates
        _check_template(options["negative_template"], "negative_template")
        if options["use_knowledge"] not in KNOWLEDGE_MODES:
            raise ValueError(f"use_knowledge={options['use_knowledge']!r}; expected True, False or 'generate'")
        if not isinstance(options["multi_label"], bool):
            raise TypeError(f"multi_label must be True or False, got {options['multi_label']!r}")
        for option, smallest in (("batch_size", 1), ("window_index", 0)):
            value = options[option]
            if not isinstance(value, int) or isinstance(value, bool) or value < smallest:
                kind = "a positive" if smallest else "a non-negative"
                raise ValueError(f"{option} must be {kind} integer, got {value!r}")
        options["return_heatmap"] = heatmap_method(options["return_heatmap"])
        options["calibrated"] = resolve_calibration(self.model.config, options)
        return options

    @staticmethod
    def _check_labels(labels) -> tuple:
        if labels is None:
            raise ValueError("candidate_labels is missing: pass candidate_labels=[...]")
        if isinstance(labels, str):
            labels = [labels]
        if not isinstance(labels, (list, tuple)):
            raise TypeError(f"candidate_labels must be a list of strings, got {type(labels).__name__}")
        if not labels:
            raise ValueError("candidate_labels is empty; give at least one label")
        seen = {}
        for index, label in enumerate(labels):
            if not isinstance(label, str):
                raise TypeError(f"candidate_labels[{index}]: expected a string, got {type(label).__name__}")
            if not label.strip():
                raise ValueError(f"candidate_labels[{index}] is empty")
            key = normalize_label(label)
            if key in seen:
                raise ValueError(
                    f"candidate_labels has a duplicate: {label!r} (item {index}) repeats {seen[key][1]!r} "
                    f"(item {seen[key][0]})"
                )
            seen[key] = (index, label)
        return tuple(labels)

    # -- the call ----------------------------------------------------------------------------------------------
    def __call__(self, images, **kwargs):
        """Classify one image (→ a list of `{"score", "label", "anchor"}` sorted by score) or a list of images (→ a
        list of such lists). Images: PIL, numpy arrays, paths to PNG/JPEG/DICOM files, pydicom datasets; a study
        (a path to a folder of DICOM files or to a DICOMDIR) → a list of `{"file", "view", "results"}`."""
        options = self._options(kwargs)
        single = not isinstance(images, (list, tuple))
        inputs = [images] if single else list(images)
        if not inputs:
            return []
        # A study stands for its image files; `owners` says which input each image comes from.
        studies, flat, owners = {}, [], []
        for index, item in enumerate(inputs):
            if is_study(item):
                try:
                    studies[index] = study_files(item)
                except RadiographError as error:
                    if single:
                        raise
                    raise RadiographError(f"item {index} of the batch: {error}") from error
            files = studies.get(index, [item])
            flat += files
            owners += [None if single else index] * len(files)
        batch_size = options["batch_size"]
        # Every image is read and preprocessed before the model runs, so a bad item fails fast.
        window_index = options["window_index"]
        batches = [
            self.preprocess(flat[start : start + batch_size], owners[start : start + batch_size], window_index)
            for start in range(0, len(flat), batch_size)
        ]
        scored = []
        with torch.inference_mode():
            classifier = self.label_embeddings(
                options["candidate_labels"],
                templates=options["templates"],
                multi_label=options["multi_label"],
                use_knowledge=options["use_knowledge"],
                negative_template=options["negative_template"],
                batch_size=batch_size,
            )
            for batch in batches:
                scored += self.postprocess(self._forward(batch, classifier, options["calibrated"]), classifier)
                if options["return_heatmap"]:
                    method = options["return_heatmap"]
                    add_heatmaps(scored[-len(batch["dicom"]) :], self.model, classifier, batch, method)
        views = [facts.get("view") for batch in batches for facts in batch["dicom"]]
        results, position = [], 0
        for index in range(len(inputs)):
            if index in studies:
                files = studies[index]
                entries = zip(files, views[position:], scored[position:])
                results.append([{"file": str(f), "view": view, "results": r} for f, view, r in entries])
                position += len(files)
            else:
                results.append(scored[position])
                position += 1
        return results[0] if single else results

    def preprocess(self, images, items=None, window_index: int = 0) -> BatchFeature:
        """Read a batch of images (`load_radiograph`) and build the image-pass inputs.

        `items`: per image, its position in the caller's list (a study's files share it), so that errors name the
        item; None (or a None entry) for a single input. `window_index`: see `load_radiograph`. The result's
        `"dicom"` holds each image's `dicom_facts` (empty for non-DICOM input); the DICOM facts that do not fit a
        chest radiograph are logged as warnings. Images are read on `torch.get_num_threads()` threads: decoding
        and resizing release the GIL.
        """
        resize = self._resize_settings()
        items = [None] * len(images) if items is None else items

        def read(item, image):
            name = "image" if item is None else f"image {item}"
            try:
                loaded = load_radiograph(image, name=name, window_index=window_index)
            except (RadiographError, TypeError) as error:
                if item is None:
                    raise
                raise type(error)(f"item {item} of the batch: {error}") from error
            facts = loaded.info.get("dicom", {})
            for problem in chest_view_problems(facts):
                where = str(image) if isinstance(image, (str, os.PathLike)) else getattr(image, "filename", "") or name
                logger.warning(f"{where}: {problem}")
            return (loaded if resize is None else _resize_and_crop(loaded, *resize)), facts

        with ThreadPoolExecutor(max_workers=max(1, min(len(images), torch.get_num_threads()))) as pool:
            read_images, facts = zip(*pool.map(read, items, images))  # raises the first bad item's error
        if resize is None:
            pixel_values = self.image_processor(read_images, return_tensors="pt")["pixel_values"]
        else:
            pixel_values = self._rescale_and_normalize(np.stack(read_images))
        image_ids = torch.tensor(self.processor.image_prompt_ids(), dtype=torch.long).expand(len(images), -1)
        return BatchFeature(
            {
                "pixel_values": pixel_values,
                "image_input_ids": image_ids,
                "image_attention_mask": torch.ones_like(image_ids),
                "dicom": list(facts),
            }
        )

    def _resize_settings(self):
        """`(shortest_edge, crop_height, crop_width, resample)` when the image processor is the usual CLIP-style PIL one
        (resize the shortest edge, centre crop, rescale, normalise); None otherwise. For those, the pipeline computes
        the processor's exact output itself (same bicubic PIL resize, same crop and arithmetic) without its
        per-image numpy round trips, and normalises the batch at once."""
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
        """`[N, H, W, 3]` uint8 → `[N, 3, H, W]` float32, with the processor's arithmetic (float64 rescale)."""
        processor = self.image_processor
        pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
        mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, -1, 1, 1)
        return (pixels.to(torch.float64) * processor.rescale_factor).to(torch.float32).sub_(mean).div_(std)

    def _forward(self, model_inputs, classifier: ZeroShotClassifier, calibrated=None) -> torch.Tensor:
        """Scores `[batch, K]` of one image batch: `classifier.probabilities` (softmax or per-label), or the
        per-label Platt-scaled ones of `config.calibration` (`calibrated`, checked by `_options`)."""
        keys = ("pixel_values", "image_input_ids", "image_attention_mask")
        features = self.model.get_image_features(**{key: model_inputs[key].to(self.device) for key in keys})
        if calibrated:
            return calibrated_probabilities(classifier, features, calibrated)
        return classifier.probabilities(features)

    def postprocess(self, model_outputs, classifier: ZeroShotClassifier) -> list[list[dict]]:
        anchored = classifier.anchored.tolist()
        results = []
        for scores in model_outputs.tolist():
            ranked = sorted(zip(scores, classifier.labels, anchored), key=lambda item: -item[0])
            results.append([{"score": s, "label": label, "anchor": a} for s, label, a in ranked])
        return results

    # -- label embeddings --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def label_embeddings(
        self,
        candidate_labels,
        templates=None,
        multi_label=False,
        use_knowledge=True,
        negative_template="no {}",
        batch_size=8,
    ) -> ZeroShotClassifier:
        """The (cached) `build_zero_shot_classifier` of a label set; see `ZeroShotClassifier`."""
        labels = tuple(candidate_labels)
        templates = (self.model.config.label_template,) if templates is None else tuple(templates)
        if use_knowledge == "generate":
            self._generate_missing_knowledge(labels)
        categories = label_categories(self.processor, labels, use_knowledge)
        # The key holds the descriptions themselves, so an edited knowledge base is never served stale anchors.
        knowledge = tuple(
            None if c is None else tuple(self.processor.knowledge[c]["descriptions"]) for c in categories
        )
        key = (labels, templates, multi_label, negative_template if multi_label else None, knowledge)
        if key not in self.label_cache:
            prompted = [label for label, category in zip(labels, categories) if category is None]
            self._warn_long_labels(prompted, templates, negative_template if multi_label else None)
            self.label_cache[key] = build_zero_shot_classifier(
                self.model,
                self.processor,
                labels,
                templates=templates,
                multi_label=multi_label,
                use_knowledge=bool(use_knowledge),
                negative_template=negative_template,
                batch_size=batch_size,
            )
        return self.label_cache[key]

    def _warn_long_labels(self, labels, templates, negative_template):
        """Warn about each prompted label whose prompt (any template, and its negation) is longer than the
        processor's `max_text_tokens`: the text pass truncates it there."""
        limit = self.processor.max_text_tokens
        for label in labels:
            texts = [label] + ([negative_template.format(label)] if negative_template else [])
            length = max(len(self.processor.plain_text_ids(t.format(text))) for t in templates for text in texts)
            if length > limit:
                shown = repr(label) if len(label) <= 60 else f"{label[:60]!r}… ({len(label)} characters)"
                logger.warning(
                    f"candidate label {shown}: its prompt is {length} tokens, truncated at the processor's "
                    f"max_text_tokens={limit}"
                )

    def save_pretrained(self, save_directory, **kwargs):
        """Save the model, this code and the processor with its knowledge: transformers' `Pipeline.save_pretrained`
        saves the tokenizer and the image processor only, so the folder would not load back."""
        super().save_pretrained(save_directory, **kwargs)
        self.processor.save_pretrained(save_directory, **kwargs)

    # -- use_knowledge="generate" ------------------------------------------------------------------------------
    def _generate_missing_knowledge(self, labels):
        """Have the LLM describe the labels that match no knowledge category; add them to `processor.knowledge`."""
        knowledge = dict(self.processor.knowledge or {})
        added = False
        for label in labels:
            if self.processor.match_category(label) is not None:
                continue
            key = normalize_label(label)
            if key not in self.generated_descriptions:
                self.generated_descriptions[key] = self._describe(label)
            if self.generated_descriptions[key]:
                knowledge[label] = {"synonyms": [], "descriptions": self.generated_descriptions[key]}
                added = True
            else:
                logger.warning_once(f"use_knowledge='generate': no usable description of {label!r}; scoring its prompt")
        if added:
            self.processor.set_knowledge(knowledge)

    def _describe(self, label: str) -> list[str]:
        tokenizer = self.tokenizer
        question = DESCRIPTION_PROMPT.format(label)
        if getattr(tokenizer, "chat_template", None):
            inputs = tokenizer.apply_chat_template(
                [{"role": "user", "content": question}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )
        else:
            inputs = tokenizer(f"{question}\nAnswer:", return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        output = self.model.generate(
            **inputs, max_new_tokens=64, min_new_tokens=8, do_sample=False, pad_token_id=pad_id
        )
        text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return parse_descriptions(text)


PIPELINE_REGISTRY.register_pipeline(
    TASK, pipeline_class=LlavaRadZZeroShotImageClassificationPipeline, pt_model=AutoModel
)

__all__ = ["LlavaRadZZeroShotImageClassificationPipeline", "chest_view_problems", "parse_descriptions"]
