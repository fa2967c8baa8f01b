"""Compare LLaVA-RadZ with the three baselines on SYNTHETIC phantom chest radiographs.

    radz-compare --model outputs/demo/model --data_dir outputs/demo/data --limit 200
    python examples/compare_methods.py ...      # the same, from a checkout

Runs `radz-evaluate` four times on the same phantom test split with the same metrics and threshold protocol
(validation thresholds), once per method: `radz` (zero-shot), `vqa` (prompt-only yes/no), `vision_probe` (vision tower
+ logistic regression on the training split) and `sft` (LoRA with trl, then yes/no). It writes one comparison table
(`comparison.md`, `comparison.json`) under --output_dir. The data are procedurally generated phantoms, not patients:
the table says so, and its numbers are no clinical evidence. A missing --data_dir is generated first (small).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import radz.baselines  # noqa: F401  (registers the baseline methods)
from radz.evaluation.harness import read_metrics, summary_auc
from radz.evaluation.methods import METHODS
from radz.hub import SUMMARY_KEYS
from radz.phantom import write_phantom_dataset
from radz.presets import DEMO_TRAINING

BANNER = "SYNTHETIC phantom data (procedurally generated radiographs, not patients): no clinical evidence."


def ensure_phantoms(data_dir: Path, n_train: int, n_validation: int, n_test: int, size: int, seed: int) -> None:
    if (data_dir / "test.jsonl").is_file():
        return
    print(f"writing a SYNTHETIC phantom set to {data_dir} ({n_train}/{n_validation}/{n_test} images, {size}px)")
    write_phantom_dataset(data_dir, n_train=n_train, n_validation=n_validation, n_test=n_test, size=size, seed=seed)


def method_arguments(args, method: str) -> list[str]:
    argv = ["--model", str(args.model), "--dataset", "generic", "--data_dir", str(args.data_dir), "--split", "test",
            "--method", method, "--output_dir", str(args.output_dir / method), "--batch_size", str(args.batch_size),
            "--seed", str(args.seed)]
    if args.limit:
        argv += ["--limit", str(args.limit)]
    if args.labels:
        argv += ["--labels", args.labels]
    if method in ("vision_probe", "sft") and args.shots:
        argv += ["--shots", str(args.shots)]
    if method in ("vision_probe", "sft") and args.balance_classes:
        argv += ["--balance_classes"]
    if method == "sft":
        argv += ["--sft_steps", str(args.sft_steps), "--sft_batch_size", str(args.sft_batch_size)]
        if args.sft_max_samples:
            argv += ["--sft_max_samples", str(args.sft_max_samples)]
    return argv


def row_of(method: str, record: dict, metrics: dict) -> dict:
    _, f1, acc = SUMMARY_KEYS[metrics["task"]]
    answers = record.get("generated_answers") or {}
    return {
        "method": method,
        "auc": summary_auc(metrics),
        "f1": metrics[f1],
        "acc": metrics[acc],
        "threshold_protocol": record["threshold_protocol"],
        "oracle": record["oracle"],
        "answers_parsed_rate": answers.get("parsed_rate_macro"),
        "images_per_second": record["compute"]["images_per_second"],
        "n_images": record["n_images"],
    }


def _pct(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def markdown_table(rows: list[dict], data_dir: Path, model: Path) -> str:
    lines = [
        "# Method comparison on SYNTHETIC phantom data",
        "",
        f"**{BANNER}**",
        "",
        f"Model `{model}`, data `{data_dir}` (test split, {rows[0]['n_images']} images). Thresholds for F1/ACC: "
        f"{rows[0]['threshold_protocol']}. AUC / F1 / ACC x100 (macro).",
        "",
        "| method | AUC | F1 | ACC | yes/no answers parsed | images/s |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        speed = row["images_per_second"]
        name = row["method"] + (" (ORACLE thresholds)" if row["oracle"] else "")
        lines.append(
            f"| {name} | {_pct(row['auc'])} | {_pct(row['f1'])} | {_pct(row['acc'])} | "
            f"{_pct(row['answers_parsed_rate'])} | {'–' if speed is None else f'{speed:.2f}'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    from radz.cli import HelpFormatter

    parser = argparse.ArgumentParser(prog="radz-compare", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the demo checkpoint (any LLaVA-RadZ checkpoint)")
    parser.add_argument("--data_dir", type=Path, default=Path("outputs/phantom_compare"),
                        help="phantom data folder; generated when it holds no test.jsonl")
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/compare_methods"), help="where the table goes")
    parser.add_argument("--limit", type=int, help="evaluate the first N test (and validation) images")
    parser.add_argument("--labels", help="comma-separated subset of the phantom labels")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods to run")
    parser.add_argument("--batch_size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--shots", type=int, help="vision_probe/sft label budget per class")
    parser.add_argument("--balance_classes", action="store_true",
                        help="vision_probe/sft: cut every class to the smallest")
    # The same budget as the demo's DFAT stage: as many steps of as many samples.
    parser.add_argument("--sft_steps", type=int, default=DEMO_TRAINING["max_steps"], help="sft optimizer steps")
    parser.add_argument("--sft_batch_size", type=int, default=DEMO_TRAINING["per_device_train_batch_size"],
                        help="sft batch size")
    parser.add_argument("--sft_max_samples", type=int, help="sft: at most this many training questions")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    generation = parser.add_argument_group("phantom generation (when --data_dir is empty)")
    generation.add_argument("--n_train", type=int, default=200, help="training images")
    generation.add_argument("--n_validation", type=int, default=100, help="validation images")
    generation.add_argument("--n_test", type=int, default=200, help="test images")
    generation.add_argument("--size", type=int, default=128, help="image size in pixels")
    args = parser.parse_args(argv)

    from radz.cli import evaluate_main

    ensure_phantoms(args.data_dir, args.n_train, args.n_validation, args.n_test, args.size, args.seed)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        print(f"== {method} ==")
        evaluate_main(method_arguments(args, method))
        record, metrics = read_metrics(args.output_dir / method / "metrics.json")
        rows.append(row_of(method, record, metrics))

    table = markdown_table(rows, args.data_dir, args.model)
    (args.output_dir / "comparison.md").write_text(table)
    summary = {"synthetic": True, "note": BANNER, "model": str(args.model), "data_dir": str(args.data_dir),
               "rows": rows}
    (args.output_dir / "comparison.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(table)
    return rows
