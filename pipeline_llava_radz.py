"""`pipeline("zero-shot-image-classification", model=checkpoint, trust_remote_code=True)` for LLaVA-RadZ.

Scores radiographs against free-text labels: single-label (softmax over the labels, as transformers' own
zero-shot pipeline) or multi-label (each label against its negation "no {label}", CheXzero-style), with prompt
ensembles and DKAM knowledge anchors. The label side is `zero_shot_llava_radz.build_zero_shot_classifier` (the
classifier `RadZTrainer.evaluate` measures too), built once per label set and cached on the pipeline; the pixels
come from `LlavaRadZProcessor.pixel_values`, the processor's one pixel path that training uses as well.

Each result element is exactly the hub's `ZeroShotImageClassificationOutputElement`, `{"label", "score"}`; details
(`return_anchors=True` → `"anchor"`) are added only when the caller asks. A call runs through `Pipeline`'s own
stages: `preprocess` reads every image first (so a bad item fails before any model work) and cuts the batches,
`forward` (`_forward`) scores one batch at a time on the model's device, `postprocess` ranks and assembles.

This file is remote code: every checkpoint written by `LlavaRadZForZeroShotClassification.save_pretrained` carries it
and declares it in `config.custom_pipelines`, which is how `pipeline(...)` finds it; importing it registers nothing.
It depends only on torch, transformers, numpy, PIL (docs/design.md, "Remote code").
"""

import copy
import os
import re
import tempfile
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Pipeline
from transformers.feature_extraction_utils import BatchFeature
from transformers.utils import logging

try:
    from .calibration_llava_radz import calibrated_probabilities, resolve_calibration
    from .explain_llava_radz import heatmap_method, label_heatmaps
    from .knowledge_llava_radz import describe_category, normalize_label, parse_descriptions  # noqa: F401
    from .radiograph_llava_radz import RadiographError, is_study, load_radiograph, study_files
    from .zero_shot_llava_radz import ZeroShotClassifier, build_zero_shot_classifier, label_categories, negation
except ImportError:
    from calibration_llava_radz import calibrated_probabilities, resolve_calibration
    from explain_llava_radz import heatmap_method, label_heatmaps
    from knowledge_llava_radz import describe_category, normalize_label, parse_descriptions  # noqa: F401
    from radiograph_llava_radz import RadiographError, is_study, load_radiograph, study_files
    from zero_shot_llava_radz import ZeroShotClassifier, build_zero_shot_classifier, label_categories, negation


logger = logging.get_logger(__name__)

TASK = "zero-shot-image-classification"
DEFAULT_BATCH_SIZE = 8
# The options of preprocess, with their defaults; `batch_size` is taken by `__call__` (as transformers' own
# pipelines take it), the `return_*` detail flags by postprocess.
PREPROCESS_DEFAULTS = {
    "candidate_labels": None,
    "hypothesis_template": None,
    "templates": None,
    "multi_label": False,
    "use_knowledge": True,
    "negative_template": "no {}",
    "window_index": 0,
    "timeout": None,
    "tokenizer_kwargs": None,
    "calibrated": False,
}
# Details a result element carries only when asked for: `return_<flag>=True` adds the key. `_forward` computes each
# asked-for detail as an `[images, labels, ...]` value, postprocess puts item `[n][k]` into element k of image n.
DETAILS = {"return_anchors": "anchor"}
OPTIONS = (*PREPROCESS_DEFAULTS, *DETAILS, "return_heatmap", "batch_size")
KNOWLEDGE_MODES = (True, False, "generate")
# tokenizer_kwargs (as transformers' pipeline takes them) for the label prompts: `max_length` is the processor's
# `max_text_tokens`; `truncation=False` makes a longer prompt an error; `padding` changes no score (the model reads
# the special tokens by position and ignores padding), so any value is accepted.
TOKENIZER_KWARGS = ("max_length", "truncation", "padding")
# DICOM Modality values of projection radiographs (and of the secondary captures radiographs are often exported as).
RADIOGRAPH_MODALITIES = ("CR", "DX", "DR", "RG", "SC", "OT")
CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG", "LUNGS")


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


def _check_template(template, option: str, shared_text_allowed: bool = False) -> str:
    """A template with one `{}` where the label goes; with `shared_text_allowed`, also a fixed text (no braces)."""
    if not isinstance(template, str):
        raise TypeError(f"{option}: expected a string with one '{{}}', got {type(template).__name__}")
    shared_text = shared_text_allowed and "{" not in template and "}" not in template and template.strip()
    if template.count("{}") != 1 and not shared_text:
        also = ", or a text without braces shared by every label" if shared_text_allowed else ""
        raise ValueError(f"{option} {template!r} must contain '{{}}' exactly once (where the label goes){also}")
    return template


def _check_count(value, option: str, smallest: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < smallest:
        kind = "a positive" if smallest else "a non-negative"
        raise ValueError(f"{option} must be {kind} integer, got {value!r}")
    return value


@dataclass(frozen=True)
class LabelSpec:
    """What the label side of one call is built from (and cached by)."""

    labels: tuple
    templates: tuple | None  # None: the model's config.label_template
    multi_label: bool
    use_knowledge: object  # True, False or "generate"
    negative_template: str
    max_text_tokens: int | None  # tokenizer_kwargs["max_length"]; None: the processor's own
    truncation: bool


@dataclass
class RadiographRequest:
    """The images of one call, handed to `Pipeline.__call__` as one input: they are read, batched and scored
    together (transformers' own loop would preprocess and score them one by one)."""

    images: list
    single: bool
    batch_size: int


class LlavaRadZZeroShotImageClassificationPipeline(Pipeline):
    """Zero-shot classification of radiographs with [`LlavaRadZForZeroShotClassification`].

    ```python
    clf = pipeline("zero-shot-image-classification", model=checkpoint_dir, trust_remote_code=True)
    clf("cxr.dcm", candidate_labels=["Cardiomegaly", "Pleural Effusion", "No Finding"])
    # [{"label": "Cardiomegaly", "score": 0.71}, ...]  sorted by score
    clf(["a.png", "b.dcm"], candidate_labels=[...], multi_label=True)  # a list of such lists
    clf("cxr.dcm", candidate_labels=[...], return_anchors=True)  # each element also says "anchor": True/False
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
        negative_template (`str`, defaults to `"no {}"`): what `multi_label` scores each label against, inside every
            template. Without `{}` it is one text for every label: `"No Finding"` scores each finding against a
            normal study (docs/learning.md measures both). A label that is itself a negation ("No Finding") is
            scored against the label without its "no" ("Finding").
        batch_size (`int`, defaults to 8): images (and prompts) per forward pass.
        window_index (`int`, defaults to 0): which of a DICOM's VOI LUTs or windows renders it.
        timeout (`float`, *optional*): seconds to wait for an image given as an http(s) URL.
        tokenizer_kwargs (`dict`, *optional*): `max_length`, `truncation`, `padding` for the label prompts
            (`TOKENIZER_KWARGS`).
        return_anchors (`bool`, defaults to False): add `"anchor"` to each element: whether the label was scored
            against a knowledge anchor.
        return_heatmap (`bool` or `str`, defaults to False): add `"heatmap"` to each element, its label's evidence
            `[H, W]` in [0, 1] (float32 numpy) over the model's input (the resized, centre-cropped image); True for
            the default method, or a name of `explain_llava_radz.HEATMAP_METHODS` (radz.explain.overlay draws it).
        calibrated (`bool`, defaults to False): multi-label scores Platt-scaled per label by `config.calibration`
            (`evaluate_radz.py --calibrate`), for the settings it was fitted with (`calibration_llava_radz.py`).

    `device=` and `dtype=` of `pipeline(...)` place and cast the model; images go through under the pipeline's
    inference context, batch by batch, on that device. Label embeddings are cached per label set, templates,
    knowledge and multi_label: clear `label_cache` after changing the model's weights. A study (a folder of DICOM
    files or a DICOMDIR) is one input: its result is a list of `{"file", "view", "results"}`, one per image
    (`radiograph_llava_radz.study_files`). A DICOM whose ViewPosition, BodyPartExamined or Modality does not fit a
    chest radiograph is scored with a warning (`chest_view_problems`); so is a label whose prompt is longer than the
    processor's `max_text_tokens`.
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False

    def __init__(self, model, *args, batch_size=None, **kwargs):
        # batch_size is this pipeline's, not the base class's: transformers would batch whole calls, not images.
        self.batch_size = DEFAULT_BATCH_SIZE if batch_size is None else _check_count(batch_size, "batch_size", 1)
        super().__init__(model, *args, **kwargs)
        if self.processor is None:
            raise ValueError(f"{type(self).__name__} needs the LlavaRadZProcessor: pass processor=...")
        self.label_cache: dict = {}
        self.generated_descriptions: dict[str, list[str]] = {}

    # -- the call ----------------------------------------------------------------------------------------------
    def __call__(self, image=None, candidate_labels=None, batch_size=None, **kwargs):
        """Classify one image (→ a list of `{"label", "score"}` sorted by score) or a list of images (→ a list of
        such lists). Images: PIL, numpy arrays, paths or http(s) URLs of PNG/JPEG/DICOM files, pydicom datasets; a
        study (a path to a folder of DICOM files or to a DICOMDIR) → a list of `{"file", "view", "results"}`."""
        if "images" in kwargs:  # transformers' own pipeline takes both names
            image = kwargs.pop("images")
        if image is None:
            raise ValueError("no image: pass an image, a path or a list of them")
        if candidate_labels is not None:
            kwargs["candidate_labels"] = candidate_labels
        batch_size = self.batch_size if batch_size is None else _check_count(batch_size, "batch_size", 1)
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        if not images:
            self._sanitize_parameters(**kwargs)  # bad options still fail
            return []
        return super().__call__(RadiographRequest(images, single, batch_size), **kwargs)

    def run_single(self, inputs, preprocess_params, forward_params, postprocess_params):
        """`preprocess` gives every batch at once (all images read); each goes through `forward` on its own."""
        outputs = [self.forward(batch, **forward_params) for batch in self.preprocess(inputs, **preprocess_params)]
        return self.postprocess(outputs, **postprocess_params)

    def _sanitize_parameters(self, **kwargs):
        unknown = sorted(set(kwargs) - set(OPTIONS))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unexpected option(s) {unknown}; expected some of {list(OPTIONS)}")
        preprocess = {key: kwargs[key] for key in PREPROCESS_DEFAULTS if key in kwargs}
        details = {flag: kwargs[flag] for flag in DETAILS if flag in kwargs}
        for flag, value in details.items():
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be True or False, got {value!r}")
        forward = {"details": tuple(DETAILS[f] for f, on in details.items() if on)} if details else {}
        method = heatmap_method(kwargs.get("return_heatmap", False))
        if method is not None:
            forward["heatmap"] = method
        return preprocess, forward, {}

    def label_spec(self, **options) -> LabelSpec:
        """The call's label options (pipeline defaults updated by the call), checked before any model work."""
        options = {**PREPROCESS_DEFAULTS, **options}
        labels = self._check_labels(options["candidate_labels"])
        if options["templates"] is not None and options["hypothesis_template"] is not None:
            raise ValueError("give either hypothesis_template (one template) or templates (an ensemble), not both")
        if options["templates"] is not None:
            if isinstance(options["templates"], str) or not options["templates"]:
                raise ValueError("templates must be a non-empty list of strings with '{}'")
            templates = tuple(_check_template(t, "template") for t in options["templates"])
        elif options["hypothesis_template"] is not None:
            templates = (_check_template(options["hypothesis_template"], "hypothesis_template"),)
        else:
            templates = None
        _check_template(options["negative_template"], "negative_template", shared_text_allowed=True)
        if options["use_knowledge"] not in KNOWLEDGE_MODES:
            raise ValueError(f"use_knowledge={options['use_knowledge']!r}; expected True, False or 'generate'")
        if not isinstance(options["multi_label"], bool):
            raise TypeError(f"multi_label must be True or False, got {options['multi_label']!r}")
        tokenizer_kwargs = dict(options["tokenizer_kwargs"] or {})
        unknown = sorted(set(tokenizer_kwargs) - set(TOKENIZER_KWARGS))
        if unknown:
            raise TypeError(
                f"tokenizer_kwargs: unsupported key(s) {unknown}; the label prompts take {list(TOKENIZER_KWARGS)}"
            )
        max_length = tokenizer_kwargs.get("max_length")
        if max_length is not None:
            _check_count(max_length, "tokenizer_kwargs['max_length']", 1)
        return LabelSpec(
            labels, templates, options["multi_label"], options["use_knowledge"], options["negative_template"],
            max_length, bool(tokenizer_kwargs.get("truncation", True)),
        )

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

    # -- the three stages --------------------------------------------------------------------------------------
    def preprocess(
        self, request: RadiographRequest, window_index: int = 0, timeout=None, calibrated=False, **label_options
    ) -> list:
        """Check the options, read every image (`load_radiograph`) and cut the batches: a list of `BatchFeature`s
        with the image-pass inputs, the label spec and, per image, `rows`: (input index, study file or None, DICOM
        view). An error names the item of the caller's list. Images are read on `torch.get_num_threads()` threads:
        decoding and resizing release the GIL."""
        spec = self.label_spec(**label_options)
        calibration = resolve_calibration(self.model.config, {
            "calibrated": calibrated, "multi_label": spec.multi_label, "templates": spec.templates,
            "use_knowledge": spec.use_knowledge, "negative_template": spec.negative_template,
        })
        _check_count(window_index, "window_index", 0)
        studies, flat, rows = {}, [], []
        for index, item in enumerate(request.images):
            if is_study(item):
                try:
                    studies[index] = study_files(item)
                except RadiographError as error:
                    if request.single:
                        raise
                    raise RadiographError(f"item {index} of the batch: {error}") from error
            for file in studies.get(index, [item]):
                flat.append(file)
                rows.append((index, str(file) if index in studies else None))
        owners = [None if request.single else index for index, _ in rows]

        def read(owner, image):
            name = "image" if owner is None else f"image {owner}"
            try:
                loaded = self._read(image, name, window_index, timeout)
            except (RadiographError, TypeError) as error:
                if owner is None:
                    raise
                raise type(error)(f"item {owner} of the batch: {error}") from error
            facts = loaded.info.get("dicom", {})
            for problem in chest_view_problems(facts):
                where = str(image) if isinstance(image, (str, os.PathLike)) else getattr(image, "filename", "") or name
                logger.warning(f"{where}: {problem}")
            return loaded, facts.get("view")

        batches, size = [], request.batch_size
        image_ids = torch.tensor(self.processor.image_prompt_ids(), dtype=torch.long)
        with ThreadPoolExecutor(max_workers=max(1, min(size, torch.get_num_threads()))) as pool:
            for start in range(0, len(flat), size):
                # raises the first bad item's error
                loaded, views = zip(*pool.map(read, owners[start : start + size], flat[start : start + size]))
                ids = image_ids.expand(len(loaded), -1)
                batch_rows = [(*row, view) for row, view in zip(rows[start : start + size], views)]
                batches.append(BatchFeature({
                    "pixel_values": self.processor.pixel_values(list(loaded)),
                    "image_input_ids": ids,
                    "image_attention_mask": torch.ones_like(ids),
                    "spec": spec,
                    "calibration": calibration,
                    "rows": batch_rows,
                    "single": request.single,
                }))
        return batches

    @staticmethod
    def _read(image, name: str, window_index: int, timeout):
        """`load_radiograph`, and http(s) URLs fetched first (with `timeout`); the error names the URL."""
        if not (isinstance(image, str) and image.startswith(("http://", "https://"))):
            return load_radiograph(image, name=name, window_index=window_index)
        try:
            with urllib.request.urlopen(image, timeout=timeout) as response:
                content = response.read()
        except (OSError, ValueError) as error:  # URLError, timeouts and HTTP errors are OSErrors
            raise RadiographError(f"{image}: could not be fetched ({error})") from error
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / (Path(urllib.parse.urlparse(image).path).name or "image")
            path.write_bytes(content)
            try:
                return load_radiograph(path, name=image, window_index=window_index)
            except RadiographError as error:
                raise RadiographError(str(error).replace(str(path), image)) from error

    def _forward(self, model_inputs, details=(), heatmap=None) -> dict:
        """Scores `[batch, K]` of one image batch (`classifier.probabilities`: softmax or per label; or Platt-scaled
        per label by `config.calibration` with `calibrated=True`) and the asked-for details (`DETAILS`, and the
        `heatmap` of that method, `[batch, K, H, W]`), each `[batch, K, ...]`."""
        classifier = self.label_embeddings(model_inputs["spec"])
        keys = ("pixel_values", "image_input_ids", "image_attention_mask")
        features = self.model.get_image_features(**{key: model_inputs[key] for key in keys})
        calibration = model_inputs["calibration"]
        if calibration is None:
            scores = classifier.probabilities(features)
        else:
            scores = calibrated_probabilities(classifier, features, calibration)
        computed = {}
        if "anchor" in details:
            computed["anchor"] = classifier.anchored.expand(len(scores), -1)
        if heatmap is not None:
            computed["heatmap"] = label_heatmaps(self.model, classifier, model_inputs, heatmap)
        return {"scores": scores, "details": computed, "labels": classifier.labels, "rows": model_inputs["rows"],
                "single": model_inputs["single"]}

    def postprocess(self, model_outputs: list) -> list:
        """Rank the labels of each image; reassemble the caller's inputs (a study's images into one entry)."""
        scored, rows = [], []
        for output in model_outputs:
            labels = output["labels"]
            # A heatmap stays a float32 numpy array `[H, W]`; the other details become Python values.
            details = {
                key: value.numpy() if key == "heatmap" else value.tolist() for key, value in output["details"].items()
            }
            for n, scores in enumerate(output["scores"].tolist()):
                elements = [
                    {"label": label, "score": score, **{key: value[n][k] for key, value in details.items()}}
                    for k, (label, score) in enumerate(zip(labels, scores))
                ]
                scored.append(sorted(elements, key=lambda element: -element["score"]))
            rows += output["rows"]
        results = {}  # per input of the caller, in order
        for (index, file, view), result in zip(rows, scored):
            if file is None:
                results[index] = result
            else:
                results.setdefault(index, []).append({"file": file, "view": view, "results": result})
        results = list(results.values())
        return results[0] if model_outputs[0]["single"] else results

    # -- label embeddings --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def label_embeddings(self, spec_or_labels, batch_size=None, **options) -> ZeroShotClassifier:
        """The (cached) `build_zero_shot_classifier` of a label set; see `ZeroShotClassifier`. Takes a `LabelSpec` or
        the labels with the call's label options (`templates=`, `multi_label=`, `use_knowledge=`...)."""
        spec = spec_or_labels if isinstance(spec_or_labels, LabelSpec) else self.label_spec(
            candidate_labels=list(spec_or_labels), **options
        )
        templates = (self.model.config.label_template,) if spec.templates is None else spec.templates
        if spec.use_knowledge == "generate":
            self._generate_missing_knowledge(spec.labels)
        processor = self.processor
        if spec.max_text_tokens is not None:
            processor = copy.copy(processor)
            processor.max_text_tokens = spec.max_text_tokens
        categories = label_categories(processor, spec.labels, spec.use_knowledge)
        # The key holds the descriptions themselves, so an edited knowledge base is never served stale anchors.
        knowledge = tuple(None if c is None else tuple(processor.knowledge[c]["descriptions"]) for c in categories)
        negative = spec.negative_template if spec.multi_label else None
        key = (spec.labels, templates, spec.multi_label, negative, knowledge, processor.max_text_tokens)
        key += (spec.truncation,)
        if key not in self.label_cache:
            prompted = [label for label, category in zip(spec.labels, categories) if category is None]
            self._check_long_labels(processor, prompted, templates, negative, spec.truncation)
            self.label_cache[key] = build_zero_shot_classifier(
                self.model,
                processor,
                spec.labels,
                templates=templates,
                multi_label=spec.multi_label,
                use_knowledge=bool(spec.use_knowledge),
                negative_template=spec.negative_template,
                batch_size=batch_size or self.batch_size,
            )
        return self.label_cache[key]

    @staticmethod
    def _check_long_labels(processor, labels, templates, negative_template, truncation: bool):
        """Each prompted label whose prompt (any template, and its negation) is longer than the processor's
        `max_text_tokens`: a warning (the text pass truncates it there), or an error with `truncation=False`."""
        limit = processor.max_text_tokens
        for label in labels:
            texts = [label] + ([negation(label, negative_template)] if negative_template else [])
            length = max(len(processor.plain_text_ids(t.format(text))) for t in templates for text in texts)
            if length > limit:
                shown = repr(label) if len(label) <= 60 else f"{label[:60]!r}… ({len(label)} characters)"
                if not truncation:
                    raise ValueError(
                        f"candidate label {shown}: its prompt is {length} tokens, over max_length={limit}, and "
                        "tokenizer_kwargs has truncation=False"
                    )
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
        return describe_category(self.model, self.processor.tokenizer, label, max_new_tokens=64)[1]


__all__ = ["LlavaRadZZeroShotImageClassificationPipeline", "chest_view_problems", "parse_descriptions"]
