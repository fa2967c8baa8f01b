"""DKAM knowledge written by the model's own LLM.

`generate_knowledge` prompts the LLM once per category. Each prompt still lists every category, so the model
is asked what distinguishes this category from the others, but it only has to write a short list about one
category at a time: small LLMs (SmolLM2-135M) lose track of a single long answer that covers all categories
and drift into describing the wrong one. Decoding is greedy, so the same model and prompt give the same text;
results are cached on disk by a hash of everything that shapes the answer.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm
from processing_llava_radz import normalize_label, validate_knowledge

from . import lookup

SYSTEM_PROMPT = "You are an expert radiologist. Answer briefly."
# The category list gives the contrast set. Asking SmolLM2-135M outright "how does it differ from the others"
# made it write about the other findings instead, so the question is about this category's appearance only;
# {also_called} names the curated synonyms ("enlarged heart"), which a small model knows better than the label.
DEFAULT_PROMPT = (
    "The findings on a chest X-ray are: {categories}.\n"
    "What does {category}{also_called} look like on a chest X-ray? Give {num_descriptions} short numbered sentences."
)
# Starting the answer for the model keeps a small LLM in a numbered list about the right category.
RESPONSE_PREFIX = "1. In {category}, the"
# Greedy; a repeated 4-gram is the usual way a small model gets stuck.
GENERATION_KWARGS = {"do_sample": False, "no_repeat_ngram_size": 4}
MIN_WORDS = 4
MIN_LETTER_FRACTION = 0.75
MIN_WORDLIKE_FRACTION = 0.85
NEAR_DUPLICATE_RATIO = 0.85

_MARKER = re.compile(r"^\s*(?:\(?\d{1,2}[.):]|[-*•+–])\s+")
_MARKDOWN = re.compile(r"\*\*|__|`+|^#+\s*|^>\s*", re.MULTILINE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\"'])")
_WORD = re.compile(r"[(\"']?(?:[A-Za-z][a-z'’]{0,24}(?:-[A-Za-z][a-z]{0,24})*|[A-Z0-9]{1,6}(?:-[A-Z0-9]{1,6})*|\d+(?:\.\d+)?%?)[)\"',.;:!?]*")
_PREFIX_LABEL = re.compile(r"^([A-Za-z0-9 _\-/()]{2,60}):\s+(.*)$")


def default_cache_dir() -> Path:
    """`$LLAVA_RADZ_CACHE/knowledge` when that variable is set, else `~/.cache/llava_radz/knowledge`."""
    root = os.environ.get("LLAVA_RADZ_CACHE") or Path.home() / ".cache" / "llava_radz"
    return Path(root) / "knowledge"


def build_prompt(
    category: str, categories: list[str], num_descriptions: int, prompt_template: str, synonyms: list[str] = ()
) -> str:
    """The user message for one category. The template may use {category}, {categories}, {num_descriptions} and
    {also_called} (" (also called a, b)" from the first two synonyms, or empty)."""
    also_called = f" (also called {', '.join(synonyms[:2])})" if synonyms else ""
    return prompt_template.format(
        category=category, categories=", ".join(categories), num_descriptions=num_descriptions, also_called=also_called
    )


def format_for_model(tokenizer, prompt: str, system_prompt: str = SYSTEM_PROMPT, response_prefix: str = "") -> str:
    """The full model input: the tokenizer's chat template when it has one, else a LLaVA-1.5 style USER/ASSISTANT
    turn (what LLaVA checkpoints expect when their tokenizer carries no template)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + response_prefix
    return f"{system_prompt}\nUSER: {prompt}\nASSISTANT: {response_prefix}"


def _clean_item(line: str) -> str:
    line = _MARKDOWN.sub("", line)
    line = re.sub(r"\s+", " ", line).strip(" \t\"'")
    return line


def _is_usable(sentence: str, category: str) -> bool:
    words = sentence.split()
    if len(words) < MIN_WORDS:
        return False
    # Gibberish (an untrained model, broken byte-level decoding) has replacement characters, control
    # characters, digits inside words, run-on letter strings or stuttered words ("No No No").
    if "\ufffd" in sentence or not sentence.isprintable():
        return False
    bare = [re.sub(r"\W", "", w).lower() for w in words]
    if any(a == b for a, b in zip(bare, bare[1:])) or len(set(bare)) < 0.6 * len(bare):
        return False
    letters = sum(ch.isalpha() or ch.isspace() for ch in sentence)
    wordlike = sum(bool(_WORD.fullmatch(w)) for w in words)
    if letters / len(sentence) < MIN_LETTER_FRACTION or wordlike < MIN_WORDLIKE_FRACTION * len(words):
        return False
    # A sentence that only restates the category ("Cardiomegaly is cardiomegaly.") says nothing.
    stripped = normalize_label(re.sub(r"[^\w\s-]", " ", sentence))
    residue = stripped.replace(normalize_label(category), " ")
    residue_words = [w for w in residue.split() if w not in {"is", "a", "an", "the", "of", "on", "x", "ray", "chest"}]
    return len(residue_words) >= 2


def parse_descriptions(
    text: str, category: str, categories: list[str] | None = None, limit: int | None = None, answer_prefix: str = ""
) -> list[str]:
    """Descriptions of `category` from an LLM answer.

    Reads numbered (`1.`, `2)`, `(3)`) or bulleted (`-`, `*`, `•`) items when the answer has any, dropping the
    preamble and closing remarks around them; otherwise splits the text into sentences. Markdown is stripped,
    an item labelled with the category ("Cardiomegaly: ...") keeps its text, an item labelled with another of
    `categories` is dropped (small models wander), and each item is cut to its first sentence. A trailing item
    without a sentence end (the answer hit the token limit) is dropped. Too short, non-text, near-duplicate and
    name-only items are dropped; `answer_prefix` (the start of the answer written for the model) does not count
    toward an item's words. Returns at most `limit` descriptions, each ending with a full stop.
    """
    lines = [line for line in text.replace("\r", "\n").split("\n") if line.strip()]
    marked = [_MARKER.sub("", line) for line in lines if _MARKER.match(line)]
    if marked:
        items = marked
        truncated_tail = not re.search(r"[.!?]\s*$", _clean_item(items[-1]))
    else:
        joined = _clean_item(" ".join(lines))
        items = _SENTENCE_END.split(joined)
        truncated_tail = not re.search(r"[.!?]$", joined)
    if truncated_tail and len(items) > 1:
        items = items[:-1]

    lead = _clean_item(_MARKER.sub("", answer_prefix))
    others = {normalize_label(c) for c in categories or []} - {normalize_label(category)}
    descriptions: list[str] = []
    for item in items:
        item = _clean_item(item)
        label = _PREFIX_LABEL.match(item)
        if label:
            if normalize_label(label.group(1)) in others:
                continue
            if normalize_label(label.group(1)) == normalize_label(category):
                item = label.group(2)
        if item.endswith(":"):  # a heading such as "Signs on a chest X-ray:"
            continue
        sentence = _SENTENCE_END.split(item)[0].strip()
        if not _is_usable(sentence.removeprefix(lead), category):
            continue
        sentence = sentence[0].upper() + sentence[1:]
        if not sentence.endswith((".", "!", "?")):
            sentence += "."
        if any(difflib.SequenceMatcher(None, sentence.lower(), d.lower()).ratio() > NEAR_DUPLICATE_RATIO for d in descriptions):
            continue
        descriptions.append(sentence)
    return descriptions[:limit] if limit else descriptions


def _model_identity(model, model_id: str | None) -> str | None:
    if model_id:
        return model_id
    config = getattr(model, "config", None)
    return getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None) or None


def _curated_entry(fallback: dict | None, category: str) -> dict | None:
    match = lookup(fallback, category) if fallback else None
    return fallback[match] if match else None


def cache_key(**fields) -> str:
    """A stable SHA-256 of the JSON-serialised fields."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _generate_text(model, tokenizer, text: str, max_new_tokens: int, generation_kwargs: dict) -> str:
    encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    device = getattr(model, "device", None)
    if device is not None:
        encoded = {k: v.to(device) for k, v in encoded.items()}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        output = model.generate(
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            **generation_kwargs,
        )
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


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
        prompt = build_prompt(category, categories, num_descriptions, prompt_template, synonyms[category])
        prefix = response_prefix.format(category=category)
        text = prefix + _generate_text(
            model, tokenizer, format_for_model(tokenizer, prompt, system_prompt, prefix), max_new_tokens, generation_kwargs
        )
        answers[category] = text
        descriptions = parse_descriptions(text, category, categories, num_descriptions, answer_prefix=prefix)
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
