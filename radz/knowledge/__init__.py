"""DKAM knowledge bases: per-category synonyms and radiographic descriptions.

A knowledge base is `{category: {"synonyms": [...], "descriptions": [...]}}`, the schema that
`knowledge_llava_radz.validate_knowledge` checks and that a checkpoint carries as `knowledge.json`.
One curated JSON file per label set ships in this package; `generate_knowledge` (in `.generate`) writes a new
one with a model's own LLM.
"""

from __future__ import annotations

import difflib
import os
from importlib import resources
from pathlib import Path

from knowledge_llava_radz import match_category, normalize_label, read_knowledge_file, validate_knowledge
from knowledge_llava_radz import write_knowledge_file


def available_knowledge() -> list[str]:
    """Names of the bundled knowledge bases (`load_knowledge` accepts each)."""
    return sorted(p.name[: -len(".json")] for p in resources.files(__name__).iterdir() if p.name.endswith(".json"))


def load_knowledge(name_or_path: str | os.PathLike) -> dict:
    """A bundled knowledge base by name ("chestxray14", ...) or a knowledge JSON file by path; validated."""
    name = str(name_or_path)
    if name in available_knowledge():
        with resources.as_file(resources.files(__name__) / f"{name}.json") as path:
            return read_knowledge_file(path)
    if not Path(name).is_file():
        raise FileNotFoundError(
            f"{name!r}: neither a bundled knowledge base {available_knowledge()} nor a knowledge JSON file"
        )
    return read_knowledge_file(name)


def save_knowledge(knowledge: dict, path: str | os.PathLike) -> None:
    """Validate and write `knowledge` as JSON, creating the parent folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_knowledge_file(knowledge, path)


def merge_knowledge(*knowledge_bases: dict) -> dict:
    """Merge knowledge bases left to right.

    A category of a later base that matches an earlier one (by name or synonym, see `match_category`) extends it: new
    synonyms and descriptions are appended, duplicates dropped, and the earlier category name is kept. Other
    categories are added. The result is validated, so a synonym claimed by two different categories raises.
    """
    merged: dict = {}
    for knowledge in knowledge_bases:
        for category, entry in validate_knowledge(knowledge, "merge_knowledge input").items():
            target = match_category(merged, category) or category
            slot = merged.setdefault(target, {"synonyms": [], "descriptions": []})
            for key in ("synonyms", "descriptions"):
                for value in entry.get(key, []):
                    if value not in slot[key] and not (key == "synonyms" and match_category({target: slot}, value)):
                        slot[key].append(value)
    return validate_knowledge(merged, "merged knowledge")


def check_labels(knowledge: dict, labels) -> list[str]:
    """Map each label to its category; raise a `ValueError` naming the unknown labels and close matches."""
    categories, unknown = [], []
    for label in labels:
        category = match_category(knowledge, label)
        if category is None:
            unknown.append(label)
        categories.append(category)
    if unknown:
        names = {normalize_label(n): n for c, e in knowledge.items() for n in [c, *e.get("synonyms", [])]}
        hints = []
        for label in unknown:
            close = difflib.get_close_matches(normalize_label(label), list(names), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(repr(names[c]) for c in close)}?)" if close else ""
            hints.append(f"{label!r}{hint}")
        raise ValueError(
            f"labels not in the knowledge base: {'; '.join(hints)}. Known categories: {list(knowledge)}"
        )
    return categories


__all__ = [
    "available_knowledge",
    "check_labels",
    "load_knowledge",
    "match_category",
    "merge_knowledge",
    "save_knowledge",
]
