"""DKAM knowledge of LLaVA-RadZ: the knowledge schema, label matching, and category descriptions written by an LLM.

A knowledge base is `{category: {"synonyms": [...], "descriptions": [...]}}`; a checkpoint carries it as
`knowledge.json` beside the processor. A label matches a category when it equals the category name or one of its
synonyms, case, space, `_` and `-` insensitive.

Descriptions written by an LLM: `describe_category` prompts once per category. The prompt lists every category, so
the model is asked about this one among the others, but it writes a short list about one category at a time: small
LLMs (SmolLM2-135M) lose track of one long answer covering all categories. Decoding is greedy, so the same model and
prompt give the same text. `parse_descriptions` keeps the usable sentences of an answer.

This file is remote code: the processor and the zero-shot pipeline import it, and `save_pretrained` copies it into
every checkpoint. It depends only on torch (docs/design.md, "Remote code").
"""

import difflib
import json
import re
from pathlib import Path

import torch

KNOWLEDGE_FILE = "knowledge.json"

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
MIN_WORDS = 3
MIN_LETTER_FRACTION = 0.75
MIN_WORDLIKE_FRACTION = 0.85
NEAR_DUPLICATE_RATIO = 0.85

_MARKER = re.compile(r"^\s*(?:\(?\d{1,2}[.):]|[-*•+–])\s+")
_MARKDOWN = re.compile(r"\*\*|__|`+|^#+\s*|^>\s*", re.MULTILINE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\"'])")
_WORD = re.compile(
    r"[(\"']?(?:[A-Za-z][a-z'’]{0,24}(?:-[A-Za-z][a-z]{0,24})*|[A-Z0-9]{1,6}(?:-[A-Z0-9]{1,6})*|\d+(?:\.\d+)?%?)"
    r"[)\"',.;:!?]*"
)
_PREFIX_LABEL = re.compile(r"^([A-Za-z0-9 _\-/()]{2,60}):\s+(.*)$")
_FILLER_WORDS = {"is", "a", "an", "the", "of", "on", "x", "ray", "chest"}


# ----------------------------------------------------------------------------------------------------------------
# The schema and label matching
# ----------------------------------------------------------------------------------------------------------------


def normalize_label(label: str) -> str:
    """Case, underscore and hyphen insensitive key: `Pleural_Thickening` == `pleural thickening`."""
    return re.sub(r"[\s_\-]+", " ", label).strip().lower()


def match_category(knowledge: dict | None, label: str) -> str | None:
    """The category of `knowledge` whose name or one of whose synonyms matches `label`, or None."""
    key = normalize_label(label)
    for category, entry in (knowledge or {}).items():
        if key in (normalize_label(name) for name in [category, *entry.get("synonyms", [])]):
            return category
    return None


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
# Descriptions written by an LLM
# ----------------------------------------------------------------------------------------------------------------


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


def generate_text(model, tokenizer, text: str, max_new_tokens: int, generation_kwargs: dict) -> str:
    """The model's continuation of `text`, decoded without special tokens."""
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


def describe_category(
    model,
    tokenizer,
    category: str,
    categories: list[str] | None = None,
    num_descriptions: int = 3,
    prompt_template: str = DEFAULT_PROMPT,
    synonyms: list[str] = (),
    system_prompt: str = SYSTEM_PROMPT,
    response_prefix: str = RESPONSE_PREFIX,
    max_new_tokens: int = 96,
    generation_kwargs: dict | None = None,
) -> tuple[str, list[str]]:
    """Ask the LLM of `model` to describe `category` among `categories` (default: itself alone).

    Returns `(answer, descriptions)`: the answer as the model wrote it, after `response_prefix` (which may use
    {category}), and at most `num_descriptions` usable descriptions parsed from it (`parse_descriptions`).
    """
    categories = list(categories or [category])
    generation_kwargs = dict(GENERATION_KWARGS if generation_kwargs is None else generation_kwargs)
    prompt = build_prompt(category, categories, num_descriptions, prompt_template, synonyms)
    prefix = response_prefix.format(category=category)
    text = format_for_model(tokenizer, prompt, system_prompt, prefix)
    answer = prefix + generate_text(model, tokenizer, text, max_new_tokens, generation_kwargs)
    return answer, parse_descriptions(answer, category, categories, num_descriptions, answer_prefix=prefix)


def _clean_item(line: str) -> str:
    line = _MARKDOWN.sub("", line)
    line = re.sub(r"(?<=[.!?])\s*(?:\.{2,}|…)\s*$", "", line)  # "A sign. ..." trails off after a full sentence
    return re.sub(r"\s+", " ", line).strip(" \t\"'")


def _is_usable(sentence: str, category: str | None) -> bool:
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
    if category is None:
        return True
    # A sentence that only restates the category ("Cardiomegaly is cardiomegaly.") says nothing.
    stripped = normalize_label(re.sub(r"[^\w\s-]", " ", sentence))
    residue = stripped.replace(normalize_label(category), " ")
    return len([w for w in residue.split() if w not in _FILLER_WORDS]) >= 2


def parse_descriptions(
    text: str,
    category: str | None = None,
    categories: list[str] | None = None,
    limit: int | None = None,
    answer_prefix: str = "",
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
    own = normalize_label(category) if category else None
    others = {normalize_label(c) for c in categories or []} - {own}
    descriptions: list[str] = []
    for item in items:
        item = _clean_item(item)
        label = _PREFIX_LABEL.match(item)
        if label:
            if normalize_label(label.group(1)) in others:
                continue
            if normalize_label(label.group(1)) == own:
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


__all__ = [
    "KNOWLEDGE_FILE",
    "describe_category",
    "match_category",
    "normalize_label",
    "parse_descriptions",
    "read_knowledge_file",
    "validate_knowledge",
    "write_knowledge_file",
]
