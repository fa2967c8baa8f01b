"""Pointing game of the explanation heatmaps on the SYNTHETIC phantom test split.

For every finding present in a test image (its region mask written by `radz.phantom`), each heatmap method of
`explain_llava_radz.py` scores a hit when the maximum of the finding's heatmap falls inside the region. Reference
points: a uniformly random pixel (its expected hit rate, the mean region area) and the image centre. Heatmaps come
from the pipeline, `clf(images, candidate_labels=findings, multi_label=True, return_heatmap=method)`, built from the
repository's code (not the checkpoint's copy).

    python benchmarks/bench_pointing_game.py --model outputs/demo/model --data_dir outputs/demo/data --limit 300

Prints a markdown table (and writes it with the figures as JSON to --output, if given). The data are SYNTHETIC:
the table says how well a method localises drawn phantoms, nothing clinical.
"""

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from explain_llava_radz import HEATMAP_METHODS  # noqa: E402
from modeling_llava_radz import LlavaRadZForZeroShotClassification  # noqa: E402
from pipeline_llava_radz import LlavaRadZZeroShotImageClassificationPipeline  # noqa: E402
from processing_llava_radz import LlavaRadZProcessor  # noqa: E402
from radz.explain import pointing_game  # noqa: E402
from radz.phantom import FINDINGS  # noqa: E402


def read_split(data_dir: Path, split: str, limit):
    rows = [json.loads(line) for line in (data_dir / f"{split}.jsonl").read_text().splitlines() if line.strip()]
    if rows and "regions" not in rows[0]:
        raise SystemExit(f"{data_dir / split}.jsonl has no region masks: regenerate it with radz.phantom")
    return rows[:limit]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "outputs" / "demo" / "model")
    parser.add_argument("--data_dir", type=Path, default=REPO / "outputs" / "demo" / "data")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, help="first N images of the split")
    parser.add_argument("--methods", default=",".join(HEATMAP_METHODS))
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--tolerance", type=float, default=8.0,
                        help="pixels of tolerance of the second table (Zhang et al.'s 15 px at 224 px is 8.6 at 128)")
    parser.add_argument("--no_knowledge", action="store_true", help="prompts instead of DKAM anchors")
    parser.add_argument("--output", type=Path, help="write the figures and the table as JSON")
    args = parser.parse_args(argv)

    rows = read_split(args.data_dir, args.split, args.limit)
    model = LlavaRadZForZeroShotClassification.from_pretrained(args.model).eval()
    processor = LlavaRadZProcessor.from_pretrained(args.model, trust_remote_code=True)
    clf = LlavaRadZZeroShotImageClassificationPipeline(model=model, processor=processor, device="cpu")
    images = [str(args.data_dir / row["image"]) for row in rows]
    instances = [(i, name) for i, row in enumerate(rows) for name in FINDINGS if name in row["regions"]]
    masks = [np.asarray(Image.open(args.data_dir / rows[i]["regions"][name])) > 0 for i, name in instances]

    figures, seconds = {}, {}
    for method in args.methods.split(","):
        started = time.perf_counter()
        heatmaps = {}
        for start in range(0, len(images), args.batch_size):
            batch = images[start : start + args.batch_size]
            results = clf(batch, candidate_labels=FINDINGS, multi_label=True, return_heatmap=method,
                          use_knowledge=not args.no_knowledge, batch_size=args.batch_size)
            for offset, ranked in enumerate(results):
                for result in ranked:
                    heatmaps[start + offset, result["label"]] = result["heatmap"]
        seconds[method] = time.perf_counter() - started
        figures[method] = {}
        for tolerance in (0.0, args.tolerance):
            games = {name: pointing_game([heatmaps[key] for key in instances if key[1] == name],
                                         [mask for key, mask in zip(instances, masks) if key[1] == name], tolerance)
                     for name in FINDINGS}
            games["all findings"] = pointing_game([heatmaps[key] for key in instances], masks, tolerance)
            figures[method][f"tolerance {tolerance:g} px"] = games

    methods = list(figures)
    size = masks[0].shape[0] if masks else 0
    lines = []
    for tolerance in figures[methods[0]]:
        first = figures[methods[0]][tolerance]
        lines += [
            f"Pointing game, SYNTHETIC phantoms ({args.data_dir.name}/{args.split}, {len(rows)} images of {size} px, "
            f"model {args.model}): hit rate of each heatmap's maximum in the finding's region, {tolerance}.",
            "",
            "| finding | n | " + " | ".join(methods) + " | random point | centre point |",
            "|---|---|" + "---|" * len(methods) + "---|---|",
        ]
        for name in FINDINGS + ["all findings"]:
            cells = " | ".join(f"{figures[m][tolerance][name]['hit_rate']:.3f}" for m in methods)
            bold = "**" if name == "all findings" else ""
            lines.append(f"| {bold}{name}{bold} | {first[name]['n']} | {cells} | {first[name]['random']:.3f} | "
                         f"{first[name]['centre']:.3f} |")
        lines.append("")
    empty = figures[methods[0]]["tolerance 0 px"]["all findings"]["empty"]
    lines += [f"{empty} finding instances with an empty region (hidden behind the heart) skipped. "
              + "Seconds per method: " + ", ".join(f"{m} {seconds[m]:.0f}" for m in methods)
              + f" (torch threads: {torch.get_num_threads()})."]
    table = "\n".join(lines)
    print(table)
    if args.output:
        args.output.write_text(json.dumps({"figures": figures, "seconds": seconds, "table": table}, indent=2))


if __name__ == "__main__":
    main()
