"""`radz-app --model DIR`: a local Gradio web app around the zero-shot pipeline. NOT A CLINICAL TOOL.

Upload a PNG, a JPEG, a DICOM, or a study (a .zip of DICOM files, or several DICOM files at once); edit the candidate
labels; see per-label scores (Platt-calibrated where the checkpoint holds a calibration for the settings, see
`evaluate_radz.py --calibrate`), the heatmap overlays of where the model finds each label, and DICOM header warnings
(a lateral view, a body part other than chest, a modality other than a radiograph's).

The app runs offline: Gradio's analytics and update checks are off, it listens on 127.0.0.1 by default and shares
nothing. `build_app` returns the `gr.Blocks`; `classify` is the function behind the button (testable without a
browser). The scores table carries each score in full precision (`data-score`), so a browser test can read them.
"""

from __future__ import annotations

import argparse
import html
import os
import tempfile
import zipfile
from pathlib import Path

# Before gradio is imported: no analytics, no version check, no hub.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from pipeline_llava_radz import chest_view_problems  # noqa: E402
from knowledge_llava_radz import normalize_label  # noqa: E402
from radiograph_llava_radz import load_radiograph  # noqa: E402
from radz.explain import overlay  # noqa: E402

DISCLAIMER = (
    "**Not a clinical tool.** A research demonstration of zero-shot classification; scores are not diagnoses. "
    "Models trained on SYNTHETIC phantoms (`make demo`) know nothing clinical."
)
DEFAULT_LABELS = ["Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Pneumonia", "Nodule", "Edema", "Atelectasis"]
SCORES_ID = "radz-scores"
DICOM_SUFFIXES = (".dcm", ".dicom")
OVERLAY_SIZE = 384  # longest side of the overlays shown


def parse_labels(text: str) -> list[str]:
    """Labels from the text box: one per line or comma-separated; blanks dropped."""
    labels = [label.strip() for line in (text or "").splitlines() for label in line.split(",")]
    labels = [label for label in labels if label]
    if not labels:
        raise ValueError("give at least one candidate label (one per line or comma-separated)")
    return labels


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with open(path, "rb") as handle:
        return handle.read(132)[128:132] == b"DICM"


def collect_inputs(paths, workdir: Path) -> list:
    """The pipeline inputs of the uploaded files: a .zip becomes a study folder; several DICOM files one study; any
    other file an image of its own."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("upload a PNG, a JPEG, a DICOM file, or a study (.zip or several DICOM files)")
    inputs, dicoms = [], []
    for path in paths:
        if path.suffix.lower() == ".zip":
            folder = workdir / path.stem
            with zipfile.ZipFile(path) as archive:
                for member in archive.infolist():  # no absolute paths or ".." out of the folder
                    if member.is_dir() or Path(member.filename).is_absolute() or ".." in Path(member.filename).parts:
                        continue
                    archive.extract(member, folder)
            inputs.append(str(folder))
        elif len(paths) > 1 and _is_dicom(path):
            dicoms.append(path)
        else:
            inputs.append(str(path))
    if dicoms:
        study = workdir / "study"
        study.mkdir(exist_ok=True)
        for path in dicoms:
            (study / path.name).write_bytes(path.read_bytes())
        inputs.append(str(study))
    return inputs


class RadZApp:
    """The pipeline of one checkpoint and the app's scoring function."""

    def __init__(self, model_dir: str, device: str = "cpu"):
        from transformers import pipeline

        self.model_dir = model_dir
        self.pipe = pipeline("zero-shot-image-classification", model=model_dir, trust_remote_code=True, device=device)

    def score(self, inputs, labels):
        """Pipeline results with heatmaps (multi-label), calibrated where the checkpoint's calibration applies;
        returns `(results, calibration note)`."""
        options = dict(candidate_labels=labels, multi_label=True, return_heatmap=True)
        try:
            results = self.pipe(inputs, calibrated=True, **options)
            fitted = {normalize_label(name) for name in self.pipe.model.config.calibration["labels"]}
            missing = [label for label in labels if normalize_label(label) not in fitted]
            note = "Scores: Platt-calibrated probabilities (config.calibration)."
            if missing:
                note += f" Not calibrated (no fit for them): {', '.join(missing)}."
        except ValueError as error:  # the checkpoint's CalibrationError: no calibration for these settings
            if type(error).__name__ != "CalibrationError":
                raise
            results = self.pipe(inputs, **options)
            note = f"Scores: uncalibrated ({error})."
        return results, note

    def classify(self, files, labels_text: str):
        """The button: `(scores HTML, overlays [(image, caption)], notes markdown)`."""
        labels = parse_labels(labels_text)
        with tempfile.TemporaryDirectory(prefix="radz_app_") as workdir:
            inputs = collect_inputs([getattr(f, "name", f) for f in files or []], Path(workdir))
            results, note = self.score(inputs, labels)
            rows, gallery, notes = [], [], [note]
            for item, result in zip(inputs, results):
                entries = result if Path(item).is_dir() else [{"file": item, "view": None, "results": result}]
                for entry in entries:
                    name = Path(entry["file"]).name
                    image = load_radiograph(entry["file"])
                    facts = image.info.get("dicom", {})
                    image.thumbnail((OVERLAY_SIZE, OVERLAY_SIZE))  # display size; the aspect, so the crop, is kept
                    if facts:
                        shown = ", ".join(f"{key} {value}" for key, value in facts.items() if value)
                        notes.append(f"**{name}** (DICOM: {shown or 'no view facts'})")
                        notes += [f"⚠️ **{name}**: {problem}" for problem in chest_view_problems(facts)]
                    for scored in entry["results"]:
                        rows.append((name, scored["label"], scored["score"]))
                        gallery.append((overlay(image, scored["heatmap"]), f"{name} · {scored['label']} "
                                                                           f"{scored['score']:.3f}"))
        return scores_html(rows), gallery, "\n\n".join(notes)


def scores_html(rows) -> str:
    """The scores as an HTML table (id `radz-scores`); each row holds its score in full precision in `data-score`."""
    cells = "".join(
        f'<tr data-file="{html.escape(name)}" data-label="{html.escape(label)}" data-score="{score!r}">'
        f"<td>{html.escape(name)}</td><td>{html.escape(label)}</td><td>{score:.3f}</td></tr>"
        for name, label, score in rows
    )
    return (f'<table id="{SCORES_ID}"><thead><tr><th>image</th><th>label</th><th>score</th></tr></thead>'
            f"<tbody>{cells}</tbody></table>")


def build_app(app: RadZApp, labels=DEFAULT_LABELS):
    import gradio as gr

    with gr.Blocks(title="LLaVA-RadZ zero-shot (not a clinical tool)", analytics_enabled=False) as blocks:
        gr.Markdown(f"# LLaVA-RadZ zero-shot radiograph classification\n\n{DISCLAIMER}\n\nModel: `{app.model_dir}`")
        with gr.Row():
            with gr.Column():
                files = gr.File(label="Radiograph: PNG, JPEG, DICOM, or a study (.zip, or several DICOM files)",
                                file_count="multiple", elem_id="radz-files")
                labels_box = gr.Textbox(value="\n".join(labels), lines=len(labels), label="Candidate labels",
                                        elem_id="radz-labels")
                button = gr.Button("Classify", variant="primary", elem_id="radz-classify")
            with gr.Column():
                notes = gr.Markdown(elem_id="radz-notes")
                scores = gr.HTML(elem_id="radz-scores-box")
        overlays = gr.Gallery(label="Where the model finds each label (heatmap overlays)", columns=4,
                              elem_id="radz-overlays")
        button.click(app.classify, inputs=[files, labels_box], outputs=[scores, overlays, notes])
    return blocks


def main(argv=None):
    parser = argparse.ArgumentParser(prog="radz-app", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="LLaVA-RadZ checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--labels", help="comma-separated default candidate labels")
    args = parser.parse_args(argv)
    labels = parse_labels(args.labels) if args.labels else DEFAULT_LABELS
    blocks = build_app(RadZApp(args.model, args.device), labels)
    print(DISCLAIMER.replace("**", ""), flush=True)
    blocks.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False, show_error=True)


if __name__ == "__main__":
    main()
