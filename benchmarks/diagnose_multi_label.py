"""Multi-label scoring rules on a trained checkpoint: which negative does each label need? (SYNTHETIC phantoms)

A multi-label classifier scores label k on its own, softmax([s(k), s(negative)])[0], so the per-label AUC is the
AUC of the margin s(k) − s(negative). This script computes the image embeddings of a split once and prints the
per-label AUC of several margins side by side:

- the shipped rules: the label (anchor or prompt) against its `negation` ("no {label}"; "Finding" for "No Finding");
- the label alone, without a negative;
- the label against one shared "normal" reference, the prompt "No Finding";
- the single-label softmax over the label set (which depends on the other labels), for reference.

The macro is over the labels a rule scores ("No Finding" against its own prompt is no rule).

    python benchmarks/diagnose_multi_label.py --model outputs/demo/model --data_dir outputs/demo/data

The data are SYNTHETIC (radz.phantom): the table compares scoring rules on one model, nothing clinical.
"""

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from modeling_llava_radz import LlavaRadZForZeroShotClassification, alignment_logits  # noqa: E402
from processing_llava_radz import LlavaRadZProcessor  # noqa: E402
from radz.phantom import PHANTOM_LABELS  # noqa: E402
from zero_shot_llava_radz import _encode_prompts, negation  # noqa: E402


@torch.no_grad()
def margins(model, processor, images: list, labels: list, batch_size: int = 32) -> dict:
    """Name → `[N, K]` margins of each scoring rule."""
    embeds, local_embeds = [], []
    for start in range(0, len(images), batch_size):
        features = model.get_image_features(**processor(images=images[start : start + batch_size]))
        embeds.append(features.embeds)
        local_embeds.append(features.local_embeds)
    image, image_local = torch.cat(embeds), torch.cat(local_embeds)
    scale, alignment, templates = model.scale(), model.config.alignment, (model.config.label_template,)

    def prompts(texts):
        text, text_local = _encode_prompts(model, processor, texts, templates, batch_size)
        return alignment_logits(image, text, image_local, text_local, scale, alignment)

    anchors = model.get_anchor_features(**processor.encode_anchors(labels), num_categories=len(labels))
    anchor = scale * image @ anchors.t()
    prompt = prompts(labels)
    negated = prompts([negation(label) for label in labels])
    old_negated = prompts(["no " + label for label in labels])
    normal = prompts(["No Finding"])
    prompt_vs_normal = prompt - normal
    prompt_vs_normal[:, labels.index("No Finding")] = float("nan")  # the label against itself: no rule
    return {
        "single-label softmax, anchors (reference)": anchor.log_softmax(-1),
        "anchor − negation (shipped)": anchor - negated,
        "anchor alone": anchor,
        "anchor − 'No Finding' prompt": anchor - normal,
        "prompt − negation (shipped)": prompt - negated,
        "prompt − 'no {label}' for every label (before)": prompt - old_negated,
        "prompt alone": prompt,
        "prompt − 'No Finding' prompt": prompt_vs_normal,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "outputs" / "demo" / "model")
    parser.add_argument("--data_dir", type=Path, default=REPO / "outputs" / "demo" / "data")
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)

    rows = [json.loads(line) for line in (args.data_dir / f"{args.split}.jsonl").read_text().splitlines() if line]
    model = LlavaRadZForZeroShotClassification.from_pretrained(args.model).eval()
    processor = LlavaRadZProcessor.from_pretrained(args.model)
    labels = list(PHANTOM_LABELS)
    targets = np.array([[row[label] for label in labels] for row in rows])
    table = margins(model, processor, [str(args.data_dir / row["image"]) for row in rows], labels)

    print(f"SYNTHETIC phantoms, {args.split} split, {len(rows)} images: per-label AUC of each multi-label margin\n")
    print("| rule | " + " | ".join(labels) + " | macro |")
    print("|---" * (len(labels) + 2) + "|")
    for name, margin in table.items():
        aucs = [
            roc_auc_score(targets[:, k], margin[:, k].float().numpy()) if margin[:, k].isfinite().all() else np.nan
            for k in range(len(labels))
        ]
        cells = " | ".join("—" if np.isnan(auc) else f"{auc:.2f}" for auc in aucs)
        print(f"| {name} | {cells} | **{np.nanmean(aucs):.3f}** |")


if __name__ == "__main__":
    main()
