"""Readers for the public chest radiograph datasets, each in its real on-disk format.

Every reader takes ``data_dir`` (the folder as the dataset unpacks), a ``split`` where the format has
one, ``on_missing`` ("raise" | "drop" | "warn") for image/report files that are not on disk, and
``check_images=False`` to parse the label files alone (no file checks; image paths are where the
layout says they should be). Formats with a single labelled file and no official split accept
``split=None``, ``"all"`` or ``"train"`` (the whole labelled set) and reject anything else.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .base import (
    absolute_path,
    build_dataset,
    check_split,
    find_file,
    handle_missing,
    index_files,
    read_split_list,
    read_table,
    require_dir,
    require_file,
    uncertain_to,
)

# The 14 CheXpert observations, in the order of CheXpert's train.csv. MIMIC-CXR's
# mimic-cxr-2.0.0-chexpert.csv holds the same 14 (alphabetically); both are read by name.
CHEXPERT_LABELS = [
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
]

# The 14 ChestX-ray14 findings, spelt as in Data_Entry_2017.csv ("No Finding" is all zeros).
NIH_LABELS = [
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
]

# The frontal values of MIMIC-CXR's ViewPosition (DICOM's for a postero-anterior and an antero-posterior chest).
FRONTAL_VIEWS = ("PA", "AP")

RSNA_LABELS = ["Pneumonia"]
SIIM_LABELS = ["Pneumothorax"]
COVIDX_LABELS = ["COVID-19"]
IU_LABELS: list[str] = []  # IU X-ray gives report/image pairs and MeSH terms, no label list

# A report section header: an upper-case name at the start of a line, then a colon ("FINDINGS:").
_SECTION = re.compile(r"^[ \t]*([A-Z][A-Z &/]*[A-Z]):", re.MULTILINE)


def parse_report_sections(text: str) -> dict[str, str]:
    """Split a free-text radiology report into ``{"FINDINGS": ..., "IMPRESSION": ...}`` etc.

    Each section runs from its header to the next header; whitespace is collapsed.
    """
    matches = list(_SECTION.finditer(text))
    ends = [m.start() for m in matches[1:]] + [len(text)]
    return {m.group(1): " ".join(text[m.end() : end].split()) for m, end in zip(matches, ends)}


def join_report(findings: str, impression: str) -> str:
    """The report used for training pairs: findings then impression, each only if present."""
    return " ".join(part for part in (findings, impression) if part)


def mimic_cxr(
    data_dir: str | os.PathLike,
    split: str | None = "train",
    uncertain: str = "ignore",
    views: tuple[str, ...] | None = None,
    frontal_only: bool = False,
    labels_csv: str | os.PathLike | None = None,
    split_csv: str | os.PathLike | None = None,
    metadata_csv: str | os.PathLike | None = None,
    reports_dir: str | os.PathLike | None = None,
    on_missing: str = "raise",
    check_images: bool = True,
) -> datasets.Dataset:
    """MIMIC-CXR(-JPG): one row per image, with its study's report and CheXpert labels.

    Layout: ``files/pXX/pYYYYYYY/sZZZZ/<dicom_id>.jpg``; reports ``files/pXX/pYYYYYYY/sZZZZ.txt``
    under ``reports_dir`` (default ``data_dir``); labels ``mimic-cxr-2.0.0-chexpert.csv``
    (``subject_id, study_id`` + 14 observations as 1.0 / 0.0 / -1.0 / blank).
    ``report`` = FINDINGS + IMPRESSION sections ("" when the report has neither).

    Labels: :data:`CHEXPERT_LABELS`; blank -> 0, -1 -> ``uncertain`` ("ones" | "zeros" | "ignore"
    -> NaN); a study absent from the label file gets all NaN.
    Split: ``mimic-cxr-2.0.0-split.csv`` rows with ``split`` "train" | "validate" (also "val") |
    "test"; ``split=None`` takes every image on disk (or in the split file, where there is one).
    ``views=("PA", "AP")`` keeps those ``ViewPosition`` values of ``mimic-cxr-2.0.0-metadata.csv``,
    which also fills the ``view`` column when present; ``frontal_only`` is ``views=FRONTAL_VIEWS`` (as
    :func:`chexpert`'s). Either needs the metadata file.
    """
    if frontal_only:
        if views is not None:
            raise ValueError(f"mimic_cxr: give views={views!r} or frontal_only=True, not both")
        views = FRONTAL_VIEWS
    data_dir = absolute_path(data_dir)
    reports_dir = absolute_path(reports_dir) if reports_dir else data_dir
    split_csv = split_csv or find_file(data_dir, "mimic-cxr-2.0.0-split.csv")
    if split not in (None, "all"):
        wanted = {"val": "validate", "validation": "validate"}.get(split, split)
        if wanted not in ("train", "validate", "test"):
            raise ValueError(
                f"mimic_cxr split must be 'train', 'validate' ('val'), 'test', None or 'all'; got {split!r}"
            )
        images = read_table(split_csv, ["dicom_id", "study_id", "subject_id", "split"], "MIMIC-CXR split file")
        images = images[images["split"] == wanted]
    elif Path(split_csv).is_file():
        images = read_table(split_csv, ["dicom_id", "study_id", "subject_id"], "MIMIC-CXR split file")
    else:
        images = _mimic_images_on_disk(require_dir(data_dir / "files", "MIMIC-CXR image folder"))
    images = images[["dicom_id", "subject_id", "study_id"]].astype({"subject_id": int, "study_id": int})

    metadata_csv = metadata_csv or find_file(data_dir, "mimic-cxr-2.0.0-metadata.csv")
    if views is not None or Path(metadata_csv).is_file():
        meta = read_table(metadata_csv, ["dicom_id", "ViewPosition"], "MIMIC-CXR metadata file")
        images = images.merge(
            meta[["dicom_id", "ViewPosition"]].rename(columns={"ViewPosition": "view"}), on="dicom_id", how="left"
        )
        if views is not None:
            images = images[images["view"].isin(views)]

    labels_csv = labels_csv or find_file(data_dir, "mimic-cxr-2.0.0-chexpert.csv")
    labels = read_table(labels_csv, ["subject_id", "study_id", *CHEXPERT_LABELS], "MIMIC-CXR label file")
    images = images.merge(
        labels[["subject_id", "study_id", *CHEXPERT_LABELS]], on=["subject_id", "study_id"], how="left", indicator=True
    )
    study_dirs = [f"files/p{str(p)[:2]}/p{p}/s{s}" for p, s in zip(images["subject_id"], images["study_id"])]
    images["image"] = [str(data_dir / d / f"{dicom}.jpg") for d, dicom in zip(study_dirs, images["dicom_id"])]
    images["report_path"] = [str(reports_dir / f"{d}.txt") for d in study_dirs]
    if check_images:
        images = handle_missing(images, ["image", "report_path"], on_missing, "mimic_cxr")

    label_matrix = uncertain_to(images[CHEXPERT_LABELS].to_numpy(np.float32), uncertain)
    label_matrix[(images["_merge"] != "both").to_numpy()] = np.nan  # no label row: unknown, not negative
    columns = ["image", "report_path", "subject_id", "study_id", "dicom_id"] + (["view"] if "view" in images else [])
    frame = images[columns].reset_index(drop=True)
    reports = tqdm(frame["report_path"], desc="reading the reports", unit="report", leave=False)
    sections = [parse_report_sections(Path(p).read_text()) if os.path.isfile(p) else {} for p in reports]
    frame["findings"] = [s.get("FINDINGS") or s.get("FINDINGS AND IMPRESSION", "") for s in sections]
    frame["impression"] = [s.get("IMPRESSION", "") for s in sections]
    frame["report"] = [join_report(f, i) for f, i in zip(frame["findings"], frame["impression"])]
    return build_dataset(frame, label_matrix, "mimic_cxr", CHEXPERT_LABELS, "multilabel")


def _mimic_images_on_disk(files_dir: Path) -> pd.DataFrame:
    """(dicom_id, subject_id, study_id) of every ``pXX/pYYYYYYY/sZZZZ/*.jpg`` under ``files/``."""
    rows = [
        (jpg.stem, int(jpg.parent.parent.name[1:]), int(jpg.parent.name[1:]))
        for jpg in sorted(files_dir.glob("p*/p*/s*/*.jpg"))
    ]
    return pd.DataFrame(rows, columns=["dicom_id", "subject_id", "study_id"])


def chestxray14(
    data_dir: str | os.PathLike,
    split: str | None = "train",
    labels_csv: str | os.PathLike | None = None,
    on_missing: str = "raise",
    check_images: bool = True,
) -> datasets.Dataset:
    """NIH ChestX-ray14: ``Data_Entry_2017.csv`` (or ``Data_Entry_2017_v2020.csv``, gzipped or not).

    ``Finding Labels`` is ``|``-joined (``No Finding`` for none); images are looked up by name in
    ``images*/`` and ``images_*/images/`` (the official tarballs unpack either way).
    Labels: :data:`NIH_LABELS`, 1/0 (the labels are mined from reports; none is marked uncertain).
    Split: "train" -> names in ``train_val_list.txt``, "test" -> ``test_list.txt``, None / "all" -> every row.
    The official lists have no validation part: "val" is :data:`NIH_VALIDATION`, a deterministic subset of
    ``train_val_list.txt`` that takes whole patients (:func:`validation_patients`).
    """
    data_dir = absolute_path(data_dir)
    labels_csv = labels_csv or find_file(data_dir, "Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
    columns = ["Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position"]
    table = read_table(labels_csv, columns, "ChestX-ray14 label file")
    if split not in (None, "all"):
        lists = {"train": "train_val_list.txt", "val": "train_val_list.txt", "test": "test_list.txt"}
        if split not in lists:
            raise ValueError(f"chestxray14 split must be one of {list(lists)}, None or 'all'; got {split!r}")
        table = table[table["Image Index"].isin(read_split_list(data_dir / lists[split], "chestxray14"))]
        if split == "val":
            table = table[table["Patient ID"].isin(validation_patients(table["Patient ID"]))]

    index: dict[str, Path] = {}
    for folder in sorted(data_dir.glob("images*")):
        index.update(index_files(folder) if folder.is_dir() else {})
    table = table.assign(image=[str(index.get(name, data_dir / "images" / name)) for name in table["Image Index"]])
    if check_images:
        table = handle_missing(table, ["image"], on_missing, "chestxray14")

    dummies = table["Finding Labels"].str.get_dummies(sep="|")
    unknown = sorted(set(dummies.columns) - set(NIH_LABELS) - {"No Finding"})
    if unknown:
        raise ValueError(f"{labels_csv}: unknown finding labels {unknown}")
    label_matrix = dummies.reindex(columns=NIH_LABELS, fill_value=0).to_numpy(np.float32)
    frame = pd.DataFrame(
        {
            "image": table["image"].to_numpy(),
            "report": "",
            "image_id": table["Image Index"].to_numpy(),
            "patient_id": table["Patient ID"].to_numpy(),
            "view": table["View Position"].to_numpy(),
            "age": table["Patient Age"].to_numpy(),
            "sex": table["Patient Gender"].to_numpy(),
        }
    )
    return build_dataset(frame, label_matrix, "chestxray14", NIH_LABELS, "multilabel")


# How the "val" split of ChestX-ray14 is made; evaluation reports name it.
NIH_VALIDATION_FRACTION = 0.1
NIH_VALIDATION = (
    f"a deterministic {NIH_VALIDATION_FRACTION:.0%} of the patients of train_val_list.txt, all their images "
    "(the official lists have no validation part)"
)


def validation_patients(patient_ids, fraction: float = NIH_VALIDATION_FRACTION, seed: int = 0) -> set:
    """A deterministic `fraction` (at least one) of the distinct `patient_ids`: a seeded permutation of their sorted
    list, so that the same training list always gives the same patients, and a patient is in or out as a whole."""
    patients = np.array(sorted(set(patient_ids)))
    count = max(1, round(fraction * len(patients))) if len(patients) else 0
    return set(np.random.default_rng(seed).permutation(patients)[:count].tolist())


def chexpert(
    data_dir: str | os.PathLike,
    split: str | None = "train",
    uncertain: str = "ignore",
    frontal_only: bool = False,
    labels_csv: str | os.PathLike | None = None,
    on_missing: str = "raise",
    check_images: bool = True,
) -> datasets.Dataset:
    """CheXpert: ``train.csv`` / ``valid.csv`` with ``Path, Sex, Age, Frontal/Lateral, AP/PA`` + 14 observations.

    Values are 1 / 0 / -1 (uncertain) / blank. Labels: :data:`CHEXPERT_LABELS`; blank -> 0
    (not mentioned), -1 -> ``uncertain``: "ones" (U-Ones), "zeros" (U-Zeros) or "ignore" (NaN).
    ``Path`` starts with the release folder (``CheXpert-v1.0-small/train/...``); it is resolved
    against ``data_dir`` as is when ``data_dir`` holds that folder, else with the folder stripped
    (``data_dir`` is the release folder itself). ``frontal_only`` keeps ``Frontal/Lateral == Frontal``.
    Split: "train" -> ``train.csv``, "valid" / "val" / "validation" -> ``valid.csv``.
    """
    data_dir = absolute_path(data_dir)
    files = {"train": "train.csv", "valid": "valid.csv", "val": "valid.csv", "validation": "valid.csv"}
    if labels_csv is None and split not in files:
        raise ValueError(f"chexpert split must be one of {list(files)}; got {split!r}")
    labels_csv = labels_csv or find_file(data_dir, files[split])
    columns = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]
    table = read_table(labels_csv, columns, "CheXpert label file")
    if frontal_only:
        table = table[table["Frontal/Lateral"] == "Frontal"]

    parts = table["Path"].str.partition("/")
    # One stat per distinct leading folder, not per row: 223k rows share one prefix.
    keep_head = {head: (data_dir / head).is_dir() for head in parts[0].unique()}
    relative = np.where(parts[0].map(keep_head).astype(bool), table["Path"], parts[2])
    table = table.assign(image=[str(data_dir / p) for p in relative])
    if check_images:
        table = handle_missing(table, ["image"], on_missing, "chexpert")

    label_matrix = uncertain_to(table[CHEXPERT_LABELS].to_numpy(np.float32), uncertain)
    frame = pd.DataFrame(
        {
            "image": table["image"].to_numpy(),
            "report": "",
            "patient_id": table["Path"].str.extract(r"(patient\d+)", expand=False).to_numpy(),
            "view": table["Frontal/Lateral"].to_numpy(),
            "ap_pa": table["AP/PA"].to_numpy(),
            "sex": table["Sex"].to_numpy(),
            "age": table["Age"].to_numpy(),
        }
    )
    return build_dataset(frame, label_matrix, "chexpert", CHEXPERT_LABELS, "multilabel")


def rsna_pneumonia(
    data_dir: str | os.PathLike,
    split: str | None = "train",
    labels_csv: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    on_missing: str = "raise",
    check_images: bool = True,
) -> datasets.Dataset:
    """RSNA Pneumonia Detection: ``stage_2_train_labels.csv`` (``patientId,x,y,width,height,Target``).

    A patient has one row per box (or one row with blank box and Target 0); the patient is
    positive if any row has Target 1. Images: ``stage_2_train_images/<patientId>.dcm`` (or
    ``image_dir``). Labels: ``["Pneumonia"]``; extra column ``boxes`` = ``[[x, y, w, h], ...]``.
    Split: none official (the test labels are not public) -> the whole labelled set.
    """
    check_split(split, "rsna_pneumonia")
    data_dir = absolute_path(data_dir)
    image_dir = absolute_path(image_dir) if image_dir else data_dir / "stage_2_train_images"
    table = read_table(
        labels_csv or find_file(data_dir, "stage_2_train_labels.csv"),
        ["patientId", "x", "y", "width", "height", "Target"],
        "RSNA label file",
    )
    boxes: dict[str, list[list[float]]] = {pid: [] for pid in table["patientId"]}  # keeps file order
    positive_rows = table[table["Target"] == 1]
    for pid, *box in positive_rows[["patientId", "x", "y", "width", "height"]].itertuples(index=False):
        boxes[pid].append([float(v) for v in box])
    frame = pd.DataFrame(
        {
            "image": [str(image_dir / f"{pid}.dcm") for pid in boxes],
            "report": "",
            "patient_id": list(boxes),
            "boxes": list(boxes.values()),
        }
    )
    if check_images:
        frame = handle_missing(frame, ["image"], on_missing, "rsna_pneumonia")
    # Positive if any row has Target 1 (every such row has a box in the real file).
    label_matrix = frame["patient_id"].isin(set(positive_rows["patientId"])).to_numpy(np.float32)[:, None]
    return build_dataset(frame, label_matrix, "rsna_pneumonia", RSNA_LABELS, "binary")


def siim_pneumothorax(
    data_dir: str | os.PathLike,
    split: str | None = "train",
    labels_csv: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    on_missing: str = "raise",
    check_images: bool = True,
) -> datasets.Dataset:
    """SIIM-ACR Pneumothorax: ``train-rle.csv`` (header ``ImageId, EncodedPixels``, with the space).

    ``EncodedPixels`` is ``-1`` for no pneumothorax, else one run-length mask per row (an image may
    have several rows). DICOMs ``<ImageId>.dcm`` are found recursively under ``image_dir``
    (default ``data_dir``; the Kaggle release nests them as ``<study>/<series>/<ImageId>.dcm``).
    Labels: ``["Pneumothorax"]``; extra column ``rle`` = the image's masks (empty when negative).
    Split: none official -> the whole labelled set.
    """
    check_split(split, "siim_pneumothorax")
    data_dir = absolute_path(data_dir)
    image_dir = absolute_path(image_dir) if image_dir else data_dir
    table = read_table(
        labels_csv or find_file(data_dir, "train-rle.csv"), ["ImageId", "EncodedPixels"], "SIIM label file"
    )
    masks: dict[str, list[str]] = {image_id: [] for image_id in table["ImageId"]}
    for image_id, rle in zip(table["ImageId"], table["EncodedPixels"].astype(str).str.strip()):
        if rle != "-1":
            masks[image_id].append(rle)
    index = index_files(image_dir, (".dcm",)) if image_dir.is_dir() else {}
    frame = pd.DataFrame(
        {
            "image": [str(index.get(f"{i}.dcm", image_dir / f"{i}.dcm")) for i in masks],
            "report": "",
            "image_id": list(masks),
            "rle": list(masks.values()),
        }
    )
    if check_images:
        frame = handle_missing(frame, ["image"], on_missing, "siim_pneumothorax")
    label_matrix = np.array([[1.0 if m else 0.0] for m in frame["rle"]], dtype=np.float32)
    return build_dataset(frame, label_matrix, "siim_pneumothorax", SIIM_LABELS, "binary")


def covidx(
    data_dir: str | os.PathLike,
    split: str = "train",
    labels_txt: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    on_missing: str = "raise",
    check_images: bool = True,
) -> datasets.Dataset:
    """COVIDx CXR: ``<split>.txt`` lines ``patient_id filename class source`` (space-separated).

    ``class`` is ``positive`` / ``negative``; images are ``<split>/<filename>`` (or ``image_dir``).
    Labels: ``["COVID-19"]``. Split: any name with a ``<split>.txt`` ("train", "val", "test").
    """
    data_dir = absolute_path(data_dir)
    labels_txt = require_file(labels_txt or data_dir / f"{split}.txt", "COVIDx label file")
    image_dir = absolute_path(image_dir) if image_dir else data_dir / str(split)
    rows, codes = [], {"positive": 1.0, "negative": 0.0}
    for number, line in enumerate(labels_txt.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        # A file name may itself hold spaces: the id is the first token, class and source the last two.
        if len(parts) < 4 or parts[-2] not in codes:
            raise ValueError(
                f"{labels_txt}:{number}: expected 'patient_id filename positive|negative source', got {line!r}"
            )
        rows.append((str(image_dir / " ".join(parts[1:-2])), parts[0], parts[-1], codes[parts[-2]]))
    frame = pd.DataFrame(rows, columns=["image", "patient_id", "source", "target"]).assign(report="")
    if check_images:
        frame = handle_missing(frame, ["image"], on_missing, "covidx")
    label_matrix = frame.pop("target").to_numpy(np.float32)[:, None]
    return build_dataset(frame, label_matrix, "covidx", COVIDX_LABELS, "binary")


def iu_xray(
    data_dir: str | os.PathLike,
    split: str | None = None,
    reports_dir: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    on_missing: str = "raise",
    check_images: bool = True,
) -> datasets.Dataset:
    """IU X-ray (Open-I): ``ecgen-radiology/<n>.xml`` reports, ``images/<parentImage id>.png`` images.

    One row per ``<parentImage id=...>`` of each report; ``report`` = ``<AbstractText
    Label="FINDINGS">`` + ``Label="IMPRESSION"``; ``mesh`` = the ``<MeSH>`` ``<major>`` and
    ``<minor>`` terms. Reports without images give no rows. No label list (``labels`` is empty).
    Split: none official -> the whole set.
    """
    check_split(split, "iu_xray")
    data_dir = absolute_path(data_dir)
    reports_dir = require_dir(
        absolute_path(reports_dir) if reports_dir else data_dir / "ecgen-radiology", "IU X-ray report folder"
    )
    image_dir = absolute_path(image_dir) if image_dir else data_dir / "images"
    rows = []
    # Natural order (2.xml before 10.xml), so rows follow the report numbering.
    for xml in sorted(reports_dir.glob("*.xml"), key=lambda p: (len(p.stem), p.stem)):
        root = ET.parse(xml).getroot()
        sections = {a.get("Label"): " ".join((a.text or "").split()) for a in root.iter("AbstractText")}
        findings, impression = sections.get("FINDINGS", ""), sections.get("IMPRESSION", "")
        mesh = [(e.text or "").strip() for e in root.findall("MeSH/*") if e.tag in ("major", "minor")]
        uid = root.find("uId")
        for image in root.iter("parentImage"):
            rows.append(
                {
                    "image": str(image_dir / f"{image.get('id')}.png"),
                    "report": join_report(findings, impression),
                    "report_id": uid.get("id") if uid is not None else xml.stem,
                    "findings": findings,
                    "impression": impression,
                    "mesh": mesh,
                }
            )
    if not rows:
        raise FileNotFoundError(f"iu_xray: no report with images in {reports_dir}")
    frame = pd.DataFrame(rows)
    if check_images:
        frame = handle_missing(frame, ["image"], on_missing, "iu_xray")
    return build_dataset(frame, np.zeros((len(frame), 0), np.float32), "iu_xray", IU_LABELS, "multilabel")
