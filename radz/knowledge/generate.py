"""DKAM knowledge written by the model's own LLM, for a whole label set: `generate_knowledge`.

The prompting and the parsing of one category's answer are `knowledge_llava_radz.describe_category` (the pipeline's
`use_knowledge="generate"` uses the same); this module adds the curated fallback and synonyms, and a disk cache keyed
by a hash of everything that shapes the answers.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

from tqdm.auto import tqdm

from knowledge_llava_radz import (
    DEFAULT_PROMPT,
    GENERATION_KWARGS,
    RESPONSE_PREFIX,
    SYSTEM_PROMPT,
    describe_category,
    match_category,
    normalize_label,
    parse_descriptions,
    validate_knowledge,
)


def default_cache_dir() -> Path:
    """`$LLAVA_RADZ_CACHE/knowledge` when that variable is set, else `~/.cache/llava_radz/knowledge`."""
    root = os.environ.get("LLAVA_RADZ_CACHE") or Path.home() / ".cache" / "llava_radz"
    return Path(root) / "knowledge"


def _model_identity(model, model_id: str | None) -> str | None:
    if model_id:
        return model_id
    config = getattr(model, "config", None)
    return getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None) or None


def _curated_entry(fallback: dict | None, category: str) -> dict | None:
    match = match_category(fallback, category)
    return fallback[match] if match else None


def cache_key(**fields) -> str:
    """A stable SHA-256 of the JSON-serialised fields."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def generate_knowledge(
    model,
    tokenizer,
    categories: list[str],
    num_descriptions: int = 3,
    prompt_template: str = DEFAULT_PROMPT,
    cache_dir: str | os.PathLike | None = None,
    max_new_tokens: int = 96,
    fallback: dict | None = None,
    model_id: str | None = None,
    system_prompt: str = SYSTEM_PROMPT,
    response_prefix: str = RESPONSE_PREFIX,
    generation_kwargs: dict | None = None,
) -> dict:
    """Write a DKAM knowledge base for `categories` with the LLM of `model`.

    Args:
        model: anything with `.generate(input_ids=..., attention_mask=..., ...)`: a LLaVA-RadZ model, a
            `LlavaForConditionalGeneration` or a causal LM.
        tokenizer: its tokenizer; its chat template is used when it has one.
        categories: the category names; every prompt lists all of them.
        num_descriptions: how many descriptions to ask for (and keep at most) per category.
        prompt_template: the user message, with `{category}`, `{categories}` and `{num_descriptions}`.
        cache_dir: where results are cached (default: `default_cache_dir()`).
        max_new_tokens: the generation budget per category.
        fallback: a knowledge base (e.g. `load_knowledge("phantom")`) used for a category whose answer holds no
            usable description (with a warning) and for synonyms.
        model_id: names the model in the cache key; defaults to its `name_or_path`. A model with neither (built
            in memory) is not cached, since its weights cannot be identified.
        system_prompt: the system message (chat templates) or first line (plain prompts).
        response_prefix: the start of the answer, written for the model; may use {category}.
        generation_kwargs: `generate` settings, default `GENERATION_KWARGS` (greedy).

    Returns:
        `{category: {"synonyms": [...], "descriptions": [...]}}`, validated.

    Raises:
        ValueError: a category yields no usable description and `fallback` has no entry for it.
    """
    categories = list(dict.fromkeys(categories))
    if not categories:
        raise ValueError("generate_knowledge: the category list is empty")
    generation_kwargs = dict(GENERATION_KWARGS if generation_kwargs is None else generation_kwargs)
    curated = {category: _curated_entry(fallback, category) for category in categories}
    # A curated synonym that names another requested category ("consolidation" under Pneumonia when
    # Consolidation is a category too) would make the knowledge base ambiguous, so it is left out.
    requested = {normalize_label(c) for c in categories}
    synonyms = {
        category: [name for name in (entry or {}).get("synonyms", []) if normalize_label(name) not in requested]
        for category, entry in curated.items()
    }
    identity = _model_identity(model, model_id)
    cache_file = None
    if identity:
        key = cache_key(
            model=identity,
            categories=categories,
            prompt_template=prompt_template,
            system_prompt=system_prompt,
            response_prefix=response_prefix,
            num_descriptions=num_descriptions,
            max_new_tokens=max_new_tokens,
            generation_kwargs=generation_kwargs,
            prompt_synonyms={category: names[:2] for category, names in synonyms.items()},
        )
        cache_file = Path(cache_dir or default_cache_dir()) / f"{key}.json"
        if cache_file.is_file():
            cached = json.loads(cache_file.read_text(encoding="utf-8"))
            return validate_knowledge(cached["knowledge"], source=str(cache_file))

    knowledge, answers = {}, {}
    for category in tqdm(categories, desc="writing DKAM knowledge", unit="category"):
        text, descriptions = describe_category(
            model, tokenizer, category, categories, num_descriptions, prompt_template, synonyms[category],
            system_prompt, response_prefix, max_new_tokens, generation_kwargs,
        )
        answers[category] = text
        if not descriptions:
            if curated[category] is None:
                raise ValueError(
                    f"generate_knowledge: the answer for category {category!r} holds no usable description and "
                    f"no fallback knowledge covers it; answer was: {text[:200]!r}"
                )
            warnings.warn(
                f"generate_knowledge: no usable description for category {category!r} in the LLM answer; "
                "using the curated descriptions from the fallback knowledge base",
                stacklevel=2,
            )
            descriptions = list(curated[category]["descriptions"])
        knowledge[category] = {"synonyms": synonyms[category], "descriptions": descriptions}
    validate_knowledge(knowledge, source="generated knowledge")

    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # The raw answers are kept beside the result so that a poor parse can be inspected.
        record = {"model": identity, "prompt_template": prompt_template, "answers": answers, "knowledge": knowledge}
        cache_file.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return knowledge


__all__ = ["cache_key", "default_cache_dir", "generate_knowledge", "parse_descriptions"]
