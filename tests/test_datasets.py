"""Tests of radz.datasets on small fixtures written in each dataset's real on-disk format.

Where torchxrayvision's real label files are installed, they are parsed in full (no rows of them
are stored in this repository).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import radz.datasets as rd
from radz.datasets import DATASETS, dataset_metadata, load_split

NAN = float("nan")


# --------------------------------------------------------------------------- helpers


def write_image(path: Path) -> Path:
    """A tiny 8x8 grey image; the format follows the suffix (PNG / JPEG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(path)
    return path


def write_dicom(path: Path) -> Path:
    """A tiny valid 8x8 MONOCHROME2 DICOM file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality, ds.Rows, ds.Columns = "CR", 8, 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(64)
    ds.save_as(path, enforce_file_format=True)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def assert_labels(actual, expected):
    """Value-by-value comparison where NaN equals NaN."""
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert (math.isnan(a) and math.isnan(e)) or a == e, (actual, expected)


def assert_schema(ds: datasets.Dataset, name: str):
    meta = dataset_metadata(ds)
    assert meta["dataset"] == name
    assert ds.features["image"] == datasets.Value("string")
    assert ds.features["report"] == datasets.Value("string")
    assert ds.features["labels"] == datasets.List(datasets.Value("float32"))
    for row in ds:
        assert os.path.isabs(row["image"])
        assert len(row["labels"]) == len(meta["label_names"])


def xray_tools_data(name: str) -> Path:
    """Path of a label file shipped with torchxrayvision (found without importing it), or skip."""
    spec = importlib.util.find_spec("torchxrayvision")
    path = Path(spec.submodule_search_locations[0]) / "data" / name if spec else Path(name)
    if not path.is_file():
        pytest.skip(f"torchxrayvision data file {name} is not installed")
    return path


# --------------------------------------------------------------------------- MIMIC-CXR

CHEXPERT_MIMIC_HEADER = (
    "subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,"
    "Fracture,Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,"
    "Pneumothorax,Support Devices"
)

MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows.

 IMPRESSION:

 No acute cardiopulmonary process.
"""


@pytest.fixture
def mimic_dir(tmp_path: Path) -> Path:
    study_a = tmp_path / "files/p10/p10000032/s50414267"
    study_b = tmp_path / "files/p10/p10000032/s53189527"
    study_c = tmp_path / "files/p11/p11000011/s51029426"
    for image in (
        study_a / "02aa804e.jpg",
        study_a / "174413ec.jpg",
        study_b / "2a2277a9.jpg",
        study_c / "9f3c1a2b.jpg",
    ):
        write_image(image)
    write(tmp_path / "files/p10/p10000032/s50414267.txt", MIMIC_REPORT)
    write(tmp_path / "files/p10/p10000032/s53189527.txt", " FINAL REPORT\n IMPRESSION: Mild cardiomegaly.\n")
    write(tmp_path / "files/p11/p11000011/s51029426.txt", " FINAL REPORT\n FINDINGS: Right pleural effusion.\n")
    # Study a: Atelectasis -1, Cardiomegaly 1, Edema 0, rest blank. Study b: No Finding 1.
    # Study c has no row: its labels are unknown (NaN), not negative.
    write(
        tmp_path / "mimic-cxr-2.0.0-chexpert.csv",
        f"{CHEXPERT_MIMIC_HEADER}\n10000032,50414267,-1.0,1.0,,0.0,,,,,,,,,,\n10000032,53189527,,,,,,,,,1.0,,,,,\n",
    )
    write(
        tmp_path / "mimic-cxr-2.0.0-split.csv",
        "dicom_id,study_id,subject_id,split\n"
        "02aa804e,50414267,10000032,train\n"
        "174413ec,50414267,10000032,train\n"
        "2a2277a9,53189527,10000032,validate\n"
        "9f3c1a2b,51029426,11000011,train\n",
    )
    return tmp_path


def chexpert_vector(**values) -> list[float]:
    """A CheXpert-order label vector: named observations set, every other one 0."""
    return [values.get(name.replace(" ", "_"), 0.0) for name in DATASETS["chexpert"].label_names]


def test_mimic_cxr_train_split_reports_and_labels(mimic_dir):
    ds = rd.mimic_cxr(mimic_dir, split="train")
    assert_schema(ds, "mimic_cxr")
    assert ds["dicom_id"] == ["02aa804e", "174413ec", "9f3c1a2b"]
    assert ds[0]["image"] == str(mimic_dir / "files/p10/p10000032/s50414267/02aa804e.jpg")
    assert ds[0]["findings"] == (
        "There is no focal consolidation, pleural effusion or pneumothorax. Bilateral nodular opacities "
        "that most likely represent nipple shadows."
    )
    assert ds[0]["impression"] == "No acute cardiopulmonary process."
    assert ds[0]["report"] == ds[0]["findings"] + " " + ds[0]["impression"]
    assert ds[2]["report"] == "Right pleural effusion."
    # Default uncertain="ignore": -1 -> NaN, blank -> 0.
    assert_labels(ds[0]["labels"], chexpert_vector(Atelectasis=NAN, Cardiomegaly=1.0))
    assert_labels(ds[1]["labels"], ds[0]["labels"])  # two images of one study share its labels
    assert all(math.isnan(v) for v in ds[2]["labels"])  # study without a label row
    ones = rd.mimic_cxr(mimic_dir, split="train", uncertain="ones")
    assert_labels(ones[0]["labels"], chexpert_vector(Atelectasis=1.0, Cardiomegaly=1.0))


def test_mimic_cxr_validate_split_views_and_disk_listing(mimic_dir):
    val = rd.mimic_cxr(mimic_dir, split="val")
    assert val["dicom_id"] == ["2a2277a9"] and val[0]["report"] == "Mild cardiomegaly."
    assert_labels(val[0]["labels"], chexpert_vector(No_Finding=1.0))
    with pytest.raises(FileNotFoundError, match="mimic-cxr-2.0.0-metadata.csv"):
        rd.mimic_cxr(mimic_dir, frontal_only=True)

    write(
        mimic_dir / "mimic-cxr-2.0.0-metadata.csv",
        "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,"
        "StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
        "PatientOrientationCodeSequence_CodeMeaning\n"
        "02aa804e,10000032,50414267,CHEST (PA AND LAT),PA,3056,2544,21800506,213014.531,CHEST (PA AND LAT),postero-anterior,Erect\n"
        "174413ec,10000032,50414267,CHEST (PA AND LAT),LATERAL,3056,2544,21800506,213014.531,CHEST (PA AND LAT),lateral,Erect\n"
        "2a2277a9,10000032,53189527,CHEST (PORTABLE AP),AP,2705,2539,21800626,165500.312,CHEST (PORTABLE AP),antero-posterior,Erect\n"
        "9f3c1a2b,11000011,51029426,CHEST (PA AND LAT),PA,3056,2544,21800506,213014.531,CHEST (PA AND LAT),postero-anterior,Erect\n",
    )
    frontal = rd.mimic_cxr(mimic_dir, split="train", views=("PA", "AP"))
    assert frontal["dicom_id"] == ["02aa804e", "9f3c1a2b"] and frontal["view"] == ["PA", "PA"]
    assert rd.load_split("mimic_cxr", mimic_dir, frontal_only=True)["dicom_id"] == frontal["dicom_id"]
    with pytest.raises(ValueError, match="not both"):
        rd.mimic_cxr(mimic_dir, views=("PA",), frontal_only=True)

    (mimic_dir / "mimic-cxr-2.0.0-split.csv").unlink()
    everything = rd.mimic_cxr(mimic_dir, split=None)  # listed from files/ when there is no split file
    assert sorted(everything["dicom_id"]) == ["02aa804e", "174413ec", "2a2277a9", "9f3c1a2b"]
    with pytest.raises(FileNotFoundError, match="mimic-cxr-2.0.0-split.csv"):
        rd.mimic_cxr(mimic_dir, split="train")


def test_mimic_cxr_missing_report_is_reported(mimic_dir):
    (mimic_dir / "files/p11/p11000011/s51029426.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 3 rows have missing files.*s51029426\.txt"):
        rd.mimic_cxr(mimic_dir)
    assert rd.mimic_cxr(mimic_dir, on_missing="drop")["dicom_id"] == ["02aa804e", "174413ec"]


def test_parse_report_sections_handles_combined_and_absent_sections():
    sections = rd.parse_report_sections(MIMIC_REPORT)
    assert list(sections) == ["EXAMINATION", "INDICATION", "TECHNIQUE", "COMPARISON", "FINDINGS", "IMPRESSION"]
    assert sections["TECHNIQUE"] == "Chest PA and lateral"
    assert rd.parse_report_sections("no headers here") == {}


# --------------------------------------------------------------------------- ChestX-ray14

NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)


@pytest.fixture
def nih_dir(tmp_path: Path) -> Path:
    write(
        tmp_path / "Data_Entry_2017.csv",
        f"{NIH_HEADER}\n"
        "00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143\n"
        "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143\n"
        "00000002_000.png,No Finding,0,2,81,M,PA,2500,2048,0.171,0.171\n"
        "00030805_000.png,Pleural_Thickening|Effusion|Hernia,0,30805,26,F,AP,2048,2500,0.168,0.168\n",
    )
    # The official archives unpack as images/ or images_00N/images/; both are searched.
    write_image(tmp_path / "images_001/images/00000001_000.png")
    write_image(tmp_path / "images_001/images/00000001_001.png")
    write_image(tmp_path / "images_002/images/00000002_000.png")
    write_image(tmp_path / "images/00030805_000.png")
    write(tmp_path / "train_val_list.txt", "00000001_000.png\n00000001_001.png\n00000002_000.png\n")
    write(tmp_path / "test_list.txt", "00030805_000.png\n")
    return tmp_path


def nih_vector(*positives: str) -> list[float]:
    return [1.0 if name in positives else 0.0 for name in DATASETS["chestxray14"].label_names]


def test_chestxray14_labels_splits_and_image_search(nih_dir):
    train = rd.chestxray14(nih_dir, split="train")
    assert_schema(train, "chestxray14")
    assert train["image_id"] == ["00000001_000.png", "00000001_001.png", "00000002_000.png"]
    assert train[1]["image"] == str(nih_dir / "images_001/images/00000001_001.png")
    assert train[1]["labels"] == nih_vector("Cardiomegaly", "Emphysema")
    assert train[2]["labels"] == nih_vector()  # No Finding
    assert (train[0]["patient_id"], train[0]["view"], train[0]["age"], train[0]["sex"]) == (1, "PA", 58, "M")
    test = rd.chestxray14(nih_dir, split="test")
    assert test[0]["image"] == str(nih_dir / "images/00030805_000.png")
    assert test[0]["labels"] == nih_vector("Pleural_Thickening", "Effusion", "Hernia")
    assert len(rd.chestxray14(nih_dir, split=None)) == 4
    with pytest.raises(ValueError, match="chestxray14 split"):
        rd.chestxray14(nih_dir, split="valid")


def test_chestxray14_missing_images_raise_drop_warn(nih_dir, caplog):
    (nih_dir / "images_001/images/00000001_001.png").unlink()
    (nih_dir / "images_002/images/00000002_000.png").unlink()
    with pytest.raises(FileNotFoundError) as error:
        rd.chestxray14(nih_dir, split=None)
    assert "2 of 4 rows have missing files" in str(error.value)
    assert "00000001_001.png" in str(error.value) and "00000002_000.png" in str(error.value)
    with caplog.at_level(logging.WARNING):
        dropped = rd.chestxray14(nih_dir, split=None, on_missing="drop")
    assert dropped["image_id"] == ["00000001_000.png", "00030805_000.png"]
    assert dropped[1]["labels"] == nih_vector("Pleural_Thickening", "Effusion", "Hernia")  # labels stay aligned
    assert "2 of 4 rows have missing files" in caplog.text and "dropped" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        kept = rd.chestxray14(nih_dir, split=None, on_missing="warn")
    assert len(kept) == 4 and "kept" in caplog.text
    assert len(rd.chestxray14(nih_dir, split=None, check_images=False)) == 4


def test_chestxray14_bad_label_files(nih_dir):
    with pytest.raises(FileNotFoundError, match="Data_Entry_2017.csv"):
        rd.chestxray14(nih_dir / "elsewhere")
    write(nih_dir / "wrong.csv", "Image Index,Labels\n00000001_000.png,Cardiomegaly\n")
    with pytest.raises(ValueError, match=r"wrong\.csv: missing column\(s\) \['Finding Labels', 'Patient ID'"):
        rd.chestxray14(nih_dir, labels_csv=nih_dir / "wrong.csv")
    write(nih_dir / "typo.csv", f"{NIH_HEADER}\n00000001_000.png,Cardiomegally,0,1,58,M,PA,1,1,0.1,0.1\n")
    with pytest.raises(ValueError, match=r"unknown finding labels \['Cardiomegally'\]"):
        rd.chestxray14(nih_dir, split=None, labels_csv=nih_dir / "typo.csv")


# --------------------------------------------------------------------------- CheXpert

CHEXPERT_HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
    "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
    "Fracture,Support Devices"
)


@pytest.fixture
def chexpert_root(tmp_path: Path) -> Path:
    """The release folder CheXpert-v1.0-small/ (holding train.csv), inside tmp_path."""
    root = tmp_path / "CheXpert-v1.0-small"
    write(
        root / "train.csv",
        f"{CHEXPERT_HEADER}\n"
        "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0\n"
        "CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg,Female,87,Frontal,AP,,,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,\n"
        "CheXpert-v1.0-small/train/patient00002/study2/view2_lateral.jpg,Female,87,Lateral,,,,,1.0,,,,,,,0.0,,1.0,\n",
    )
    write(
        root / "valid.csv",
        f"{CHEXPERT_HEADER}\n"
        "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg,Male,73,Frontal,AP,0.0,1.0,1.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n",
    )
    for relative in (
        "train/patient00001/study1/view1_frontal.jpg",
        "train/patient00002/study2/view1_frontal.jpg",
        "train/patient00002/study2/view2_lateral.jpg",
        "valid/patient64541/study1/view1_frontal.jpg",
    ):
        write_image(root / relative)
    return root


@pytest.mark.parametrize("uncertain, u", [("ignore", NAN), ("ones", 1.0), ("zeros", 0.0)])
def test_chexpert_uncertain_policies(chexpert_root, uncertain, u):
    ds = rd.chexpert(chexpert_root, uncertain=uncertain)
    assert_schema(ds, "chexpert")
    assert_labels(ds[0]["labels"], chexpert_vector(No_Finding=1.0, Support_Devices=1.0))
    # Row 2: -1 for Cardiomegaly, Edema, Consolidation, Atelectasis, Pleural Effusion; blanks -> 0.
    assert_labels(
        ds[1]["labels"],
        chexpert_vector(
            Cardiomegaly=u, Lung_Opacity=1.0, Edema=u, Consolidation=u, Atelectasis=u, Pleural_Effusion=u, Fracture=1.0
        ),
    )
    assert (ds[1]["patient_id"], ds[1]["view"], ds[1]["ap_pa"], ds[1]["sex"], ds[1]["age"]) == (
        "patient00002",
        "Frontal",
        "AP",
        "Female",
        87,
    )
    assert ds[2]["ap_pa"] is None  # blank AP/PA for the lateral view


def test_chexpert_paths_frontal_only_and_valid_split(chexpert_root):
    # data_dir = the release folder: the leading "CheXpert-v1.0-small/" is stripped ...
    ds = rd.chexpert(chexpert_root, frontal_only=True)
    assert ds["image"] == [
        str(chexpert_root / "train/patient00001/study1/view1_frontal.jpg"),
        str(chexpert_root / "train/patient00002/study2/view1_frontal.jpg"),
    ]
    # ... and data_dir = its parent (labels CSV given explicitly): the path is used as is.
    parent = rd.chexpert(chexpert_root.parent, labels_csv=chexpert_root / "train.csv", frontal_only=True)
    assert parent["image"] == ds["image"]
    valid = rd.chexpert(chexpert_root, split="valid")
    assert valid[0]["labels"] == chexpert_vector(Enlarged_Cardiomediastinum=1.0, Cardiomegaly=1.0, Lung_Opacity=1.0)
    with pytest.raises(ValueError, match="uncertain must be one of"):
        rd.chexpert(chexpert_root, uncertain="maybe")
    (chexpert_root / "train/patient00001/study1/view1_frontal.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"chexpert: 1 of 3 rows.*patient00001/study1/view1_frontal\.jpg"):
        rd.chexpert(chexpert_root)


# --------------------------------------------------------------------------- RSNA, SIIM, COVIDx


def test_rsna_pneumonia_patients_boxes_and_labels(tmp_path):
    write(
        tmp_path / "stage_2_train_labels.csv",
        "patientId,x,y,width,height,Target\n"
        "0004cfab-14fd-4e49-80ba-63a80b6bddd6,,,,,0\n"
        "00436515-870c-4b36-a041-de91049b9ab4,264.0,152.0,213.0,379.0,1\n"
        "00436515-870c-4b36-a041-de91049b9ab4,562.0,152.0,256.0,453.0,1\n"
        "00322d4d-1c29-4943-afc9-b6754be640eb,,,,,0\n",
    )
    for pid in (
        "0004cfab-14fd-4e49-80ba-63a80b6bddd6",
        "00436515-870c-4b36-a041-de91049b9ab4",
        "00322d4d-1c29-4943-afc9-b6754be640eb",
    ):
        write_dicom(tmp_path / "stage_2_train_images" / f"{pid}.dcm")
    ds = rd.rsna_pneumonia(tmp_path)
    assert_schema(ds, "rsna_pneumonia")
    assert dataset_metadata(ds)["task"] == "binary"
    assert [row[0] for row in ds["labels"]] == [0.0, 1.0, 0.0]
    assert ds[1]["boxes"] == [[264.0, 152.0, 213.0, 379.0], [562.0, 152.0, 256.0, 453.0]] and ds[0]["boxes"] == []
    assert pydicom.dcmread(ds[1]["image"]).Rows == 8
    with pytest.raises(ValueError, match="no official 'test' split"):
        rd.rsna_pneumonia(tmp_path, split="test")


def test_siim_pneumothorax_rle_rows_and_recursive_dicoms(tmp_path):
    a, b = (
        "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819",
        "1.2.276.0.7230010.3.1.4.8323329.13666.1517875247.117800",
    )
    # The real header has a space before EncodedPixels; an image may have several mask rows.
    write(tmp_path / "train-rle.csv", f"ImageId, EncodedPixels\n{a}, -1\n{b}, 557374 2 1015 8\n{b}, 1022 4 1019 6\n")
    write_dicom(tmp_path / "dicom-images-train/1.2.276.0.7230010.3.1.2/1.2.276.0.7230010.3.1.3" / f"{a}.dcm")
    write_dicom(tmp_path / "dicom-images-train/1.2.276.0.7230010.3.1.2b/1.2.276.0.7230010.3.1.3b" / f"{b}.dcm")
    ds = rd.siim_pneumothorax(tmp_path)
    assert_schema(ds, "siim_pneumothorax")
    assert ds["image_id"] == [a, b] and [row[0] for row in ds["labels"]] == [0.0, 1.0]
    assert ds[1]["rle"] == ["557374 2 1015 8", "1022 4 1019 6"] and ds[0]["rle"] == []
    assert ds[1]["image"].endswith(f"1.2.276.0.7230010.3.1.3b/{b}.dcm")
    with pytest.raises(FileNotFoundError, match="SIIM label file not found: .*nowhere.csv"):
        rd.siim_pneumothorax(tmp_path, labels_csv=tmp_path / "nowhere.csv")


def test_covidx_lines_and_bad_class(tmp_path):
    write(
        tmp_path / "test.txt",
        "419639-003251 MIDRC-RICORD-1C-419639-003251-46647-0.png positive ricord\n8ce8 8ce8-a1b2.png negative rsna\n",
    )
    for name in ("MIDRC-RICORD-1C-419639-003251-46647-0.png", "8ce8-a1b2.png"):
        write_image(tmp_path / "test" / name)
    ds = rd.covidx(tmp_path, split="test")
    assert_schema(ds, "covidx")
    assert [row[0] for row in ds["labels"]] == [1.0, 0.0]
    assert ds["source"] == ["ricord", "rsna"] and ds["patient_id"] == ["419639-003251", "8ce8"]
    assert ds[1]["image"] == str(tmp_path / "test/8ce8-a1b2.png")
    write(tmp_path / "train.txt", "p1 a.png positive sirm\np2 b.png COVID-19 cohen\n")
    with pytest.raises(ValueError, match=r"train\.txt:2: expected"):
        rd.covidx(tmp_path, split="train")


# --------------------------------------------------------------------------- IU X-ray

IU_XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr"/>
   <uId id="CXR{n}"/>
   <MedlineCitation Owner="Indiana University" Status="supplied by publisher">
      <Article PubModel="Electronic">
         <Abstract>
            <AbstractText Label="COMPARISON">None.</AbstractText>
            <AbstractText Label="INDICATION">Positive TB test</AbstractText>
            <AbstractText Label="FINDINGS">{findings}</AbstractText>
            <AbstractText Label="IMPRESSION">{impression}</AbstractText>
         </Abstract>
      </Article>
   </MedlineCitation>
   <MeSH>
      {mesh}
   </MeSH>
   {images}
</eCitation>
"""


def iu_report(n: int, findings: str, impression: str, mesh: str, image_ids: list[str]) -> str:
    images = "\n".join(f'<parentImage id="{i}"><figureId>F1</figureId></parentImage>' for i in image_ids)
    return IU_XML.format(n=n, findings=findings, impression=impression, mesh=mesh, images=images)


def test_iu_xray_reports_mesh_and_images(tmp_path):
    reports = tmp_path / "ecgen-radiology"
    write(
        reports / "1.xml",
        iu_report(
            1,
            "The heart is normal.",
            "Normal chest x-XXXX.",
            "<major>normal</major>",
            ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"],
        ),
    )
    write(
        reports / "10.xml",
        iu_report(
            10,
            "",
            "Calcified granuloma.",
            "<major>Calcified Granuloma/lung/upper lobe/right</major>\n<minor>Opacity/lung/base/left/mild</minor>",
            ["CXR10_IM-0002-1001"],
        ),
    )
    write(reports / "2.xml", iu_report(2, "Clear lungs.", "No acute disease.", "<major>normal</major>", []))
    for image in ("CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001", "CXR10_IM-0002-1001"):
        write_image(tmp_path / "images" / f"{image}.png")
    ds = rd.iu_xray(tmp_path)
    assert_schema(ds, "iu_xray")
    assert dataset_metadata(ds)["label_names"] == [] and ds[0]["labels"] == []
    assert ds["report_id"] == ["CXR1", "CXR1", "CXR10"]  # 2.xml has no image: no row
    assert ds[0]["report"] == "The heart is normal. Normal chest x-XXXX." and ds[0]["mesh"] == ["normal"]
    assert ds[2]["report"] == "Calcified granuloma." and ds[2]["findings"] == ""
    assert ds[2]["mesh"] == ["Calcified Granuloma/lung/upper lobe/right", "Opacity/lung/base/left/mild"]
    assert ds[2]["image"] == str(tmp_path / "images/CXR10_IM-0002-1001.png")
    with pytest.raises(FileNotFoundError, match="IU X-ray report folder not found"):
        rd.iu_xray(tmp_path / "images")


# --------------------------------------------------------------------------- knee and generic


def test_knee_kl_folders(tmp_path):
    for split, grade, name in [
        ("train", "0", "9000099R.png"),
        ("train", "2", "9000296L.png"),
        ("train", "4", "9001104R.png"),
        ("val", "1", "9002430L.png"),
    ]:
        write_image(tmp_path / split / grade / name)
    ds = rd.knee_kl(tmp_path)
    assert_schema(ds, "knee_kl")
    assert dataset_metadata(ds) == {
        "dataset": "knee_kl",
        "label_names": ["KL 0", "KL 1", "KL 2", "KL 3", "KL 4"],
        "task": "multiclass",
    }
    assert ds["label"] == [0, 2, 4]
    assert ds[1]["labels"] == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert ds[2]["image"] == str(tmp_path / "train/4/9001104R.png")
    assert rd.knee_kl(tmp_path, split="val")["label"] == [1]
    write_image(tmp_path / "train" / "5" / "x.png")
    with pytest.raises(ValueError, match=r"unexpected subfolder\(s\) \['5'\]"):
        rd.knee_kl(tmp_path)
    with pytest.raises(FileNotFoundError, match="test"):
        rd.knee_kl(tmp_path, split="test")


def test_generic_csv_jsonl_parquet(tmp_path):
    write_image(tmp_path / "imgs/a.png")
    write_image(tmp_path / "imgs/b.png")
    absolute = write_image(tmp_path / "elsewhere/c.jpg")
    write(
        tmp_path / "data.csv",
        f"path,text,effusion,nodule,split\nimgs/a.png,Small effusion.,1,,train\nimgs/b.png,,0,1,test\n{absolute},Clear.,,0,train\n",
    )
    ds = rd.generic(
        tmp_path / "data.csv",
        image_column="path",
        report_column="text",
        label_columns=["effusion", "nodule"],
        dataset_name="mine",
    )
    assert_schema(ds, "mine")
    assert dataset_metadata(ds) == {"dataset": "mine", "label_names": ["effusion", "nodule"], "task": "multilabel"}
    assert ds["image"] == [str(tmp_path / "imgs/a.png"), str(tmp_path / "imgs/b.png"), str(absolute)]
    assert ds["report"] == ["Small effusion.", "", "Clear."]
    assert_labels(ds[0]["labels"], [1.0, NAN])
    assert_labels(ds[2]["labels"], [NAN, 0.0])
    train = load_split("generic", tmp_path / "data.csv", image_column="path", label_columns=["nodule"])
    assert len(train) == 2 and dataset_metadata(train)["task"] == "binary"

    import pandas as pd

    frame = pd.DataFrame({"image": ["a.png", "b.png"], "findings": ["x", "y"], "mass": [True, False]})
    frame.to_json(tmp_path / "imgs/data.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "table.parquet")
    from_jsonl = rd.generic(tmp_path / "imgs/data.jsonl", report_column="findings", label_columns=["mass"])
    from_parquet = rd.generic(
        tmp_path / "table.parquet", report_column="findings", label_columns=["mass"], image_root=tmp_path / "imgs"
    )
    for ds in (from_jsonl, from_parquet):
        assert ds["image"] == [str(tmp_path / "imgs/a.png"), str(tmp_path / "imgs/b.png")]
        assert ds["labels"] == [[1.0], [0.0]] and ds["report"] == ["x", "y"]


def test_generic_errors_and_image_folder(tmp_path):
    write_image(tmp_path / "imgs/a.png")
    write(tmp_path / "bad.csv", "image,effusion\nimgs/a.png,2\n")
    with pytest.raises(ValueError, match=r"label column 'effusion': labels must be 1, 0, -1 .* found \['2'\]"):
        rd.generic(tmp_path / "bad.csv", label_columns=["effusion"])
    with pytest.raises(ValueError, match=r"bad\.csv: missing column\(s\) \['report'\]"):
        rd.generic(tmp_path / "bad.csv", report_column="report")
    write(tmp_path / "gone.csv", "image\nimgs/a.png\nimgs/gone.png\n")
    with pytest.raises(FileNotFoundError, match=r"generic: 1 of 2 rows have missing files.*gone\.png"):
        rd.generic(tmp_path / "gone.csv")

    for cls, name in [("normal", "n1.png"), ("normal", "n2.png"), ("pneumonia", "p1.jpg")]:
        write_image(tmp_path / "folder/train" / cls / name)
    ds = rd.generic(tmp_path / "folder", split="train")
    assert dataset_metadata(ds) == {"dataset": "generic", "label_names": ["normal", "pneumonia"], "task": "multiclass"}
    assert ds["label"] == [0, 0, 1] and ds[2]["labels"] == [0.0, 1.0]


# --------------------------------------------------------------------------- metadata, registry


def test_metadata_survives_select_filter_and_disk(nih_dir, tmp_path):
    ds = rd.chestxray14(nih_dir, split=None)
    expected = {"dataset": "chestxray14", "label_names": DATASETS["chestxray14"].label_names, "task": "multilabel"}
    assert dataset_metadata(ds) == expected
    assert dataset_metadata(ds.select([1, 3])) == expected
    filtered = ds.filter(lambda row: row["labels"][1] == 1.0)
    assert len(filtered) == 2 and dataset_metadata(filtered) == expected
    ds.save_to_disk(str(tmp_path / "saved"))
    loaded = datasets.load_from_disk(str(tmp_path / "saved"))
    assert dataset_metadata(loaded) == expected and loaded[3]["labels"] == ds[3]["labels"]
    with pytest.raises(ValueError, match="not built by a radz.datasets reader"):
        dataset_metadata(datasets.Dataset.from_dict({"image": ["x"]}))


def test_registry_and_load_by_name(nih_dir, tmp_path):
    assert list(DATASETS) == [
        "mimic_cxr",
        "chestxray14",
        "chexpert",
        "rsna_pneumonia",
        "siim_pneumothorax",
        "covidx",
        "iu_xray",
        "knee_kl",
        "generic",
    ]
    assert [name for name, spec in DATASETS.items() if spec.label_names is None] == ["generic"]
    assert len(DATASETS["chexpert"].label_names) == len(DATASETS["chestxray14"].label_names) == 14
    ds = load_split("chestxray14", nih_dir, split="test")
    assert ds["image_id"] == ["00030805_000.png"]
    with pytest.raises(KeyError, match="unknown dataset 'padchest'"):
        load_split("padchest", nih_dir)


# --------------------------------------------------------------------------- real label files (torchxrayvision)


def test_real_chestxray14_labels():
    ds = rd.chestxray14(
        "/no/images", split=None, labels_csv=xray_tools_data("Data_Entry_2017_v2020.csv.gz"), check_images=False
    )
    assert len(ds) == 112_120
    positives = dict(zip(DATASETS["chestxray14"].label_names, np.asarray(ds["labels"]).sum(axis=0).tolist()))
    # The published per-finding counts of ChestX-ray14.
    assert positives["Infiltration"] == 19_894 and positives["Effusion"] == 13_317 and positives["Hernia"] == 227
    assert len(set(ds["patient_id"])) == 30_805


def test_real_chexpert_labels():
    csv = xray_tools_data("chexpert_train.csv.gz")
    ds = rd.chexpert("/no/images", labels_csv=csv, check_images=False)
    assert len(ds) == 223_414
    assert ds[0]["image"] == "/no/images/train/patient00001/study1/view1_frontal.jpg"
    labels = np.asarray(ds["labels"])
    effusion = DATASETS["chexpert"].label_names.index("Pleural Effusion")
    assert int((labels[:, effusion] == 1).sum()) == 86_187
    assert int(np.isnan(labels[:, effusion]).sum()) == 11_628  # the uncertain ones, ignored
    assert len(rd.chexpert("/no/images", labels_csv=csv, frontal_only=True, check_images=False)) == 191_027


def test_real_rsna_and_siim_labels():
    rsna = rd.rsna_pneumonia(
        "/no/images", labels_csv=xray_tools_data("kaggle_stage_2_train_labels.csv.zip"), check_images=False
    )
    assert len(rsna) == 26_684 and sum(row[0] for row in rsna["labels"]) == 6_012
    siim = rd.siim_pneumothorax(
        "/no/images", labels_csv=xray_tools_data("siim-pneumothorax-train-rle.csv.gz"), check_images=False
    )
    assert len(siim) == 12_047 and sum(row[0] for row in siim["labels"]) == 2_669


def test_real_iu_xray_reports(tmp_path):
    with tarfile.open(xray_tools_data("NLMCXR_reports.tgz")) as archive:
        archive.extractall(tmp_path, filter="data")
    ds = rd.iu_xray(tmp_path, check_images=False)
    assert len(ds) == 7_470  # Open-I: 7,470 images ...
    assert len(set(ds["report_id"])) == 3_851  # ... from the 3,851 of its 3,955 reports that have images
