"""Radiographs as hospitals store them (radiograph_llava_radz.py): viewer-correct DICOM windowing, compressed
transfer syntaxes, DICOM facts and view warnings, studies, and hostile input."""

import logging
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import MPEG2MPML, ExplicitVRLittleEndian, generate_uid

from conftest import REPORTS, random_images
from pipeline_llava_radz import LlavaRadZZeroShotImageClassificationPipeline
from radiograph_llava_radz import RadiographError, load_radiograph, study_files, to_uint8, voi_windows

LABELS = ["Cardiomegaly", "effusion", "pneumonia"]


def pydicom_file(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name}: not among pydicom's test files (is pydicom-data installed?)"
    return Path(path)


def gray(image) -> np.ndarray:
    return np.asarray(load_radiograph(image).convert("L"))


def saturated(pixels: np.ndarray) -> float:
    return float(((pixels == 0) | (pixels == 255)).mean())


def reference(dataset, index: int = 0) -> np.ndarray:
    """pydicom's `apply_voi_lut` output scaled by its output range to 0–255, inverted for MONOCHROME1. The range of
    a window is probed from pydicom itself: the outputs for values far below and far above the window."""
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    pixels = dataset.pixel_array[frames // 2] if frames > 1 else dataset.pixel_array
    values = apply_voi_lut(apply_modality_lut(pixels, dataset), dataset, index=index).astype(np.float64)
    if voi_windows(dataset)[0] == "VOI LUT":
        low, high = 0.0, 2.0 ** dataset.VOILUTSequence[index].LUTDescriptor[2] - 1
    else:
        with np.errstate(over="ignore"):  # SIGMOID's exp at the probes
            low, high = apply_voi_lut(np.array([-1e12, 1e12]), dataset, index=index)
    mapped = np.clip((values - low) / (high - low) * 255 + 0.5, 0, 255).astype(np.uint8)
    return 255 - mapped if dataset.PhotometricInterpretation == "MONOCHROME1" else mapped


@lru_cache(maxsize=1)
def windowed_test_files() -> tuple[str, ...]:
    """Every single-channel pydicom test file with pixel data and a window or VOI LUT (pydicom's and pydicom-data's)."""
    roots = {pydicom_file("CT_small.dcm").parent, pydicom_file("RG1_UNCR.dcm").parent}
    found = {}
    for path in sorted(p for root in roots for p in root.rglob("*") if p.is_file()):
        try:
            dataset = pydicom.dcmread(path, defer_size="1 KB")
        except Exception:  # not DICOM
            continue
        if (
            "PixelData" in dataset
            and dataset.get("SamplesPerPixel", 1) == 1
            and str(dataset.get("PhotometricInterpretation", "")).startswith("MONOCHROME")
            and voi_windows(dataset)[0] is not None
        ):
            found.setdefault(path.name, str(path))
    return tuple(found.values())


def test_the_windowed_test_files_are_found():
    names = {Path(p).name for p in windowed_test_files()}
    assert {"MR_small.dcm", "RG1_UNCR.dcm", "RG3_J2KR.dcm", "693_J2KR.dcm", "vlut_04.dcm"} <= names
    assert len(names) >= 40


@pytest.mark.parametrize("path", windowed_test_files(), ids=lambda p: Path(p).name)
def test_windowed_files_render_as_pydicom_maps_the_window(path):
    """Within 3 grey levels (mean absolute difference) of the reference, and no more saturated."""
    dataset = pydicom.dcmread(path)
    try:
        expected = reference(dataset)
    except Exception:  # pydicom itself cannot decode it (MR_truncated.dcm): an error naming the file
        with pytest.raises(RadiographError, match=rf"{Path(path).name}: the DICOM pixel data .* cannot be decoded"):
            load_radiograph(path)
        return
    ours = gray(path)
    assert ours.shape == expected.shape
    assert np.abs(ours.astype(int) - expected).mean() <= 3
    assert saturated(ours) <= saturated(expected) + 1e-3


def test_the_measured_cases_are_no_longer_windowed_twice():
    """MR_small was 73% black and 26% white, RG3_UNCR 46% white, 693_J2KR all saturated, RG1 6 levels off."""
    mr = gray(pydicom_file("MR_small.dcm"))
    assert (mr == 0).mean() < 0.01 and (mr == 255).mean() < 0.06
    assert (gray(pydicom_file("RG3_UNCR.dcm")) == 255).mean() < 0.45
    assert saturated(gray(pydicom_file("693_J2KR.dcm"))) < 0.8
    rg1 = pydicom.dcmread(pydicom_file("RG1_UNCR.dcm"))
    assert np.abs(gray(rg1).astype(int) - reference(rg1)).mean() < 0.5


@pytest.mark.parametrize(
    ("compressed", "uncompressed"),
    [
        ("RG1_J2KR.dcm", "RG1_UNCR.dcm"),
        ("RG3_J2KR.dcm", "RG3_UNCR.dcm"),
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
        ("MR_small_RLE.dcm", "MR_small.dcm"),
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
        ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm"),  # multi-frame, no window: the middle frame
        ("emri_small_RLE.dcm", "emri_small.dcm"),
    ],
)
def test_compressed_twins_render_identically(compressed, uncompressed):
    assert np.array_equal(gray(pydicom_file(compressed)), gray(pydicom_file(uncompressed)))


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("JPEG-LL.dcm", (1024, 256)),  # JPEG Lossless, process 14
        ("JPEG-lossy.dcm", (1024, 256)),  # JPEG Extended, 12-bit, with a malformed scan header
        ("JPGExtended.dcm", (1024, 256)),
        ("MR_small_jpeg_ls_lossless.dcm", (64, 64)),
        ("JPEGLSNearLossless_16.dcm", (50, 10)),
        ("emri_small_jpeg_ls_lossless.dcm", (64, 64)),
    ],
)
def test_jpeg_lossless_extended_and_jpeg_ls_decode(name, shape):
    pixels = gray(pydicom_file(name))
    assert pixels.shape == shape and pixels.std() > 10


def test_a_malformed_jpeg_scan_header_is_repaired_exactly():
    """JPEG-lossy.dcm says Se = 0 in its scan header; JPGExtended.dcm is the same file with Se = 63."""
    assert np.array_equal(gray(pydicom_file("JPEG-lossy.dcm")), gray(pydicom_file("JPGExtended.dcm")))
    dataset = pydicom.dcmread(pydicom_file("JPEG-lossy.dcm"))
    before = bytes(dataset.PixelData)
    load_radiograph(dataset)
    assert dataset.PixelData == before  # the caller's dataset is left as it was


# ---------------------------------------------------------------------------------------------------------------
# The viewer rule on synthetic datasets
# ---------------------------------------------------------------------------------------------------------------


def make_dataset(pixels: np.ndarray, bits_stored: int = 12, **elements) -> FileDataset:
    """An in-memory uncompressed MONOCHROME2 DICOM of `pixels` (uint16 or int16), with `elements` set."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset = FileDataset("synthetic.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, bits_stored, bits_stored - 1
    dataset.SamplesPerPixel, dataset.PixelRepresentation = 1, int(pixels.dtype == np.int16)
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.PixelData = pixels.tobytes()
    for keyword, value in elements.items():
        setattr(dataset, keyword, value)
    return dataset


RAMP = np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (8, 1))


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_every_voi_lut_function_maps_its_output_range(function):
    dataset = make_dataset(RAMP, WindowCenter=2000, WindowWidth=1000, VOILUTFunction=function)
    ours = gray(dataset)
    assert np.abs(ours.astype(int) - reference(dataset)).mean() <= 1
    assert ours[0, 0] < 10 and ours[0, -1] > 245


def test_rescale_enters_the_output_range():
    signed = (RAMP.astype(np.int32) - 2048).astype(np.int16)
    dataset = make_dataset(signed, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=0, WindowWidth=4000)
    assert np.abs(gray(dataset).astype(int) - reference(dataset)).mean() <= 1


def test_window_index_picks_one_of_several_windows(tiny_model, caplog):
    path = pydicom_file("MR-SIEMENS-DICOM-WithOverlays.dcm")  # windows 450/790 and 200/443
    dataset = pydicom.dcmread(path)
    first, second = load_radiograph(path), load_radiograph(path, window_index=1)
    assert np.array_equal(np.asarray(first.convert("L")), reference(dataset, 0))
    assert np.array_equal(np.asarray(second.convert("L")), reference(dataset, 1))
    with pytest.raises(RadiographError, match=r"WithOverlays\.dcm: window_index=2, but the DICOM has 2 window\(s\)"):
        load_radiograph(path, window_index=2)
    clf = pipeline(tiny_model)
    assert len(clf(str(path), candidate_labels=LABELS, window_index=1)) == len(LABELS)
    with pytest.raises(ValueError, match="window_index must be a non-negative integer, got -1"):
        clf(str(path), candidate_labels=LABELS, window_index=-1)


@pytest.mark.parametrize(
    ("photometric", "shape", "inverted"),
    [
        ("MONOCHROME2", None, False),
        ("MONOCHROME1", None, True),
        ("MONOCHROME2", "INVERSE", True),
        ("MONOCHROME1", "INVERSE", True),  # DX files carry both for one inversion
        ("MONOCHROME2", "IDENTITY", False),
    ],
)
def test_monochrome1_and_inverse_invert_once(photometric, shape, inverted):
    elements = {"PhotometricInterpretation": photometric, "WindowCenter": 2048, "WindowWidth": 4096}
    if shape:
        elements["PresentationLUTShape"] = shape
    ours = gray(make_dataset(RAMP, **elements))
    assert (ours[0, 0] > ours[0, -1]) == inverted


def test_without_a_window_padding_is_left_out_of_the_percentiles():
    pixels = RAMP.copy()
    pixels[:, :16] = 0  # a quarter of the image is padding
    padded = gray(make_dataset(pixels, PixelPaddingValue=0))
    body = RAMP[:, 16:].astype(np.float32)
    low, high = np.percentile(body, (0.5, 99.5))
    expected = np.clip((body - low) / (high - low) * 255 + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(padded[:, 16:], expected)
    assert (padded[:, :16] == 0).all()
    # The same without the padding value: the padding pulls the low percentile down to 0.
    assert not np.array_equal(gray(make_dataset(pixels))[:, 16:], expected)
    ranged = gray(make_dataset(pixels, PixelPaddingValue=0, PixelPaddingRangeLimit=10))
    assert np.array_equal(ranged, padded)


# ---------------------------------------------------------------------------------------------------------------
# Transfer syntaxes that cannot be decoded
# ---------------------------------------------------------------------------------------------------------------


def test_a_transfer_syntax_without_a_decoder_names_the_file_and_the_syntax(tmp_path):
    from pydicom.encaps import encapsulate

    dataset = make_dataset(RAMP)
    dataset.file_meta.TransferSyntaxUID = MPEG2MPML
    dataset.PixelData = encapsulate([b"\0\0\1\xb3" + b"\0" * 28])
    dataset["PixelData"].VR = "OB"
    dataset.save_as(tmp_path / "video.dcm")
    with pytest.raises(
        RadiographError,
        match=r"video\.dcm: the DICOM pixel data in MPEG2 Main Profile / Main Level \(1\.2\.840\.10008\.1\.2\.4\.100\) "
        r"cannot be decoded: pydicom has no decoder for this transfer syntax",
    ):
        load_radiograph(tmp_path / "video.dcm")


def test_a_missing_decoder_package_is_named(monkeypatch):
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    decoder = get_decoder(JPEGLSLossless)
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1")})
    with pytest.raises(
        RadiographError,
        match=r"MR_small_jpeg_ls_lossless\.dcm: the DICOM pixel data in JPEG-LS Lossless Image Compression "
        r"\(1\.2\.840\.10008\.1\.2\.4\.80\) cannot be decoded: no decoder for it is installed; install one of: "
        r"pylibjpeg - requires pylibjpeg>=2\.0 and pylibjpeg-libjpeg>=2\.1$",
    ):
        load_radiograph(pydicom_file("MR_small_jpeg_ls_lossless.dcm"))


# ---------------------------------------------------------------------------------------------------------------
# DICOM facts, view warnings and studies
# ---------------------------------------------------------------------------------------------------------------


def pipeline(tiny_model):
    model, processor = tiny_model
    return LlavaRadZZeroShotImageClassificationPipeline(model=model.eval(), processor=processor, device="cpu")


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_dicom_facts_travel_with_the_image():
    dicomdir = pydicom_file("DICOMDIR").parent
    image = load_radiograph(dicomdir / "77654033/CR1/6154")
    assert image.info["dicom"] == {"view": "LL", "modality": "CR", "body_part": "CSPINE"}
    assert load_radiograph(pydicom_file("MR_small.dcm")).info["dicom"]["modality"] == "MR"


def test_the_pipeline_warns_on_a_lateral_view_another_body_part_or_modality(tiny_model, caplog, tmp_path):
    clf = pipeline(tiny_model)
    lateral = pydicom_file("DICOMDIR").parent / "77654033/CR1/6154"
    clf(str(lateral), candidate_labels=LABELS)
    assert warnings_of(caplog) == [
        f"{lateral}: ViewPosition LL is a lateral view; the classifier expects frontal (PA or AP) views",
        f"{lateral}: BodyPartExamined is CSPINE, not chest",
    ]
    caplog.clear()
    clf(pydicom.dcmread(pydicom_file("MR_small.dcm")), candidate_labels=LABELS)
    assert [m.split(": ", 1)[1] for m in warnings_of(caplog)] == ["Modality is MR, not a radiograph (CR or DX)"]
    caplog.clear()
    chest = make_dataset(RAMP, ViewPosition="PA", Modality="DX", BodyPartExamined="CHEST")
    chest.save_as(tmp_path / "pa.dcm", enforce_file_format=True)
    clf(str(tmp_path / "pa.dcm"), candidate_labels=LABELS)
    assert warnings_of(caplog) == []


def test_a_dicomdir_or_its_folder_is_one_study(tiny_model):
    clf = pipeline(tiny_model)
    dicomdir = pydicom_file("DICOMDIR")
    files = study_files(dicomdir)
    assert len(files) == 31 and all(f.is_file() for f in files)
    results = clf(str(dicomdir), candidate_labels=LABELS)
    assert [r["file"] for r in results] == [str(f) for f in files]
    assert results[0]["view"] == "LL" and [len(r["results"]) for r in results] == [len(LABELS)] * 31
    # The same images in the same order from the folder; the study beside a single image in a batch.
    folder, image = clf([str(dicomdir.parent), np.zeros((8, 8), np.uint8)], candidate_labels=LABELS, batch_size=4)
    assert [r["file"] for r in folder] == [r["file"] for r in results]
    scores = [label["score"] for r in results for label in r["results"]]
    assert [label["score"] for r in folder for label in r["results"]] == pytest.approx(scores, abs=1e-6)
    assert [r["label"] for r in image] and set(image[0]) == {"score", "label"}


def test_a_folder_study_walks_subfolders_and_skips_what_is_not_an_image(tiny_model, tmp_path):
    shutil.copy(pydicom_file("MR_small.dcm"), tmp_path / "IM0001")  # a DICOM without a suffix
    (tmp_path / "series2").mkdir()
    shutil.copy(pydicom_file("CT_small.dcm"), tmp_path / "series2" / "ct.dcm")
    shutil.copy(pydicom_file("CT_small.dcm"), tmp_path / ".hidden.dcm")
    make_dataset(RAMP).save_as(tmp_path / "report.dcm")
    report = pydicom.dcmread(tmp_path / "report.dcm")
    for keyword in ("Rows", "Columns", "PixelData"):
        delattr(report, keyword)
    report.save_as(tmp_path / "report.dcm")  # a DICOM without an image, as a structured report is
    (tmp_path / "README.txt").write_text("exported from the PACS")
    assert study_files(tmp_path) == [tmp_path / "IM0001", tmp_path / "series2" / "ct.dcm"]
    results = pipeline(tiny_model)(str(tmp_path), candidate_labels=LABELS)
    assert [r["file"] for r in results] == [str(tmp_path / "IM0001"), str(tmp_path / "series2" / "ct.dcm")]


def test_bad_studies_are_named(tiny_model, tmp_path):
    clf = pipeline(tiny_model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RadiographError, match=r"item 1 of the batch: .*empty: the study holds no DICOM image"):
        clf([np.zeros((8, 8), np.uint8), str(tmp_path / "empty")], candidate_labels=LABELS)
    (tmp_path / "study").mkdir()
    shutil.copy(pydicom_file("MR_small.dcm"), tmp_path / "study" / "a.dcm")
    (tmp_path / "study" / "b.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x07" * 50)
    with pytest.raises(RadiographError, match=r"^.*study/b\.dcm: corrupt or unreadable DICOM"):
        clf(str(tmp_path / "study"), candidate_labels=LABELS)
    with pytest.raises(RadiographError, match=r"a\.dcm: not a folder or a DICOMDIR"):
        study_files(tmp_path / "study" / "a.dcm")


# ---------------------------------------------------------------------------------------------------------------
# Hostile input
# ---------------------------------------------------------------------------------------------------------------


def test_special_token_strings_in_reports_and_descriptions_are_plain_text(tiny_model):
    model, processor = tiny_model
    tokenizer = processor.tokenizer
    special = {*tokenizer.all_special_ids, processor.image_token_id}
    hostile = "<image> effusion <ImgCls_0> and <TxtCls_3> </s>"
    assert tokenizer.decode(processor.plain_text_ids(hostile)) == hostile
    assert not special & set(processor.plain_text_ids(hostile))
    plain, tricked = processor.text_ids("effusion"), processor.text_ids(hostile)
    assert [i for i in tricked if i in special] == [i for i in plain if i in special]
    # The processor's own special tokens are still there: the model reads both rows.
    with torch.no_grad():
        features = model.get_text_features(**processor(text=["effusion", hostile]))
    assert torch.isfinite(features.embeds).all()
    image_ids = processor(images=[np.zeros((8, 8), np.uint8)])["image_input_ids"][0].tolist()
    assert image_ids.count(processor.image_token_id) == processor.num_image_tokens
    # A knowledge description holding them is plain text too.
    processor.set_knowledge({"Edema": {"synonyms": [], "descriptions": ["<TxtCls_0> kerley lines <image>"]}})
    anchors = processor.encode_anchors(["Edema"])
    row = anchors["anchor_input_ids"][0][anchors["anchor_attention_mask"][0].bool()].tolist()
    assert [i for i in row if i in special] == [i for i in plain if i in special]
    with torch.no_grad():
        anchor = model.get_anchor_features(**anchors, num_categories=1)
    assert torch.isfinite(anchor).all()


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


GRADIENT = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (32, 1))


@pytest.mark.parametrize("name", ["empty.png", "empty.dcm", "empty"])
def test_an_empty_file_is_named(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(RadiographError, match=rf"{name}: the file is empty \(0 bytes\)"):
        load_radiograph(tmp_path / name)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_a_truncated_png_or_jpeg_is_named(tmp_path, suffix):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    data = save(Image.fromarray(noise), tmp_path / f"full{suffix}").read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
    with pytest.raises(RadiographError, match=rf"cut\{suffix}: not a readable image file"):
        load_radiograph(tmp_path / f"cut{suffix}")


def test_files_are_read_by_their_content_not_their_name(tmp_path):
    png = save(Image.fromarray(GRADIENT), tmp_path / "image.png")
    shutil.copy(png, tmp_path / "mislabelled.dcm")
    assert np.array_equal(gray(tmp_path / "mislabelled.dcm"), gray(png))
    shutil.copy(pydicom_file("MR_small.dcm"), tmp_path / "IM0001")
    assert np.array_equal(gray(tmp_path / "IM0001"), gray(pydicom_file("MR_small.dcm")))


def test_a_one_pixel_image_is_scored(tiny_model):
    clf = pipeline(tiny_model)
    for image in (np.full((1, 1), 200, np.uint8), Image.new("L", (1, 1), 30), np.ones((1, 1), np.float32)):
        assert load_radiograph(image).size == (1, 1)
        assert len(clf(image, candidate_labels=LABELS)) == len(LABELS)


def test_an_image_over_the_decompression_bomb_limit_is_named(tmp_path, monkeypatch):
    png = save(Image.fromarray(GRADIENT), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 64 x 32 = 2048 pixels > 2 x 500
    with pytest.raises(RadiographError, match=r"big\.png: over PIL's decompression-bomb limit"):
        load_radiograph(png)
    with pytest.raises(RadiographError, match=r"MR_small\.dcm: 64x64 pixels is over PIL's decompression-bomb limit"):
        load_radiograph(pydicom_file("MR_small.dcm"))


def test_unusual_formats_become_8bit_rgb(tmp_path, caplog):
    frames = [Image.fromarray(GRADIENT), Image.fromarray(255 - GRADIENT)]
    files = {
        "16-bit PNG": save(Image.fromarray(GRADIENT.astype(np.uint16) * 257), tmp_path / "x16.png"),
        "CMYK JPEG": save(Image.fromarray(GRADIENT).convert("CMYK"), tmp_path / "cmyk.jpg", quality=95),
        "animated GIF": save(frames[0], tmp_path / "anim.gif", save_all=True, append_images=frames[1:]),
        "multi-page TIFF": save(frames[0], tmp_path / "pages.tif", save_all=True, append_images=frames[1:]),
    }
    for kind, path in files.items():
        image = load_radiograph(path)
        array = np.asarray(image).astype(int)
        assert image.mode == "RGB" and array.shape == (32, 64, 3), kind
        # The (first) frame's gradient: dark on the left, bright on the right.
        assert array[:, :4].mean() < 40 and array[:, -4:].mean() > 215, kind
    assert warnings_of(caplog) == [
        f"{files['animated GIF']}: the file holds 2 frames; the first is read",
        f"{files['multi-page TIFF']}: the file holds 2 frames; the first is read",
    ]


def test_a_very_long_label_is_truncated_with_a_warning(tiny_model, caplog):
    clf = pipeline(tiny_model)
    label = "opacity " * 1250  # 10,000 characters
    result = clf(np.zeros((8, 8), np.uint8), candidate_labels=["Cardiomegaly", label])
    assert {r["label"] for r in result} == {"Cardiomegaly", label}
    (message,) = warnings_of(caplog)
    assert "(10000 characters): its prompt is" in message and "max_text_tokens=128" in message


@pytest.mark.parametrize(
    "labels",
    [["Edema", "Edema"], ["Edema", "EDEMA"], ["Pleural Effusion", "pleural  effusion"], ["Edema", " edema "],
     ["Pleural_Effusion", "pleural-effusion"]],
)
def test_duplicate_labels_up_to_case_and_spacing_are_an_error(tiny_model, labels):
    with pytest.raises(ValueError, match=rf"duplicate: {labels[1]!r} \(item 1\) repeats {labels[0]!r} \(item 0\)"):
        pipeline(tiny_model)(np.zeros((8, 8), np.uint8), candidate_labels=labels)


# ---------------------------------------------------------------------------------------------------------------
# Images and DICOM
# ---------------------------------------------------------------------------------------------------------------


def test_every_image_kind_becomes_8bit_rgb(tmp_path):
    gradient = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (32, 1))
    inputs = {
        "PIL L": Image.fromarray((gradient * 255).astype(np.uint8)),
        "PIL RGBA": Image.fromarray((gradient * 255).astype(np.uint8)).convert("RGBA"),
        "PIL I;16": Image.fromarray((gradient * 40000).astype(np.uint16)),
        "uint8": (gradient * 255).astype(np.uint8),
        "uint16": (gradient * 4095).astype(np.uint16),
        "float": gradient,
        "float HU": gradient * 2000 - 1000,
        "HxWx1": (gradient * 255).astype(np.uint8)[..., None],
    }
    Image.fromarray((gradient * 255).astype(np.uint8)).save(tmp_path / "x.png")
    Image.fromarray((gradient * 255).astype(np.uint8)).save(tmp_path / "x.jpg")
    Image.fromarray((gradient * 60000).astype(np.uint16)).save(tmp_path / "x16.png")
    inputs.update({"png": tmp_path / "x.png", "jpeg": str(tmp_path / "x.jpg"), "png16": tmp_path / "x16.png"})
    for name, image in inputs.items():
        loaded = load_radiograph(image)
        array = np.asarray(loaded)
        assert loaded.mode == "RGB" and array.shape == (32, 64, 3), name
        # The gradient survives: dark on the left, bright on the right, grayscale channels equal.
        assert array[:, :4].mean() < 40 and array[:, -4:].mean() > 215, name
        assert (array[..., 0] == array[..., 2]).all(), name


def test_16bit_rule_uses_the_percentile_window():
    values = np.arange(1000, dtype=np.uint16).reshape(10, 100)
    values[0, 0] = 65535  # one hot pixel must not squash the rest
    mapped = to_uint8(values)
    low, high = np.percentile(values, (0.5, 99.5))
    assert mapped.dtype == np.uint8 and mapped[5, 50] == int((550 - low) / (high - low) * 255 + 0.5)
    assert mapped[0, 0] == 255 and mapped[0, 1] == 0


def test_real_chest_cr_monochrome1_is_right_side_up():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCR.dcm", download=False)
    image = np.asarray(load_radiograph(path).convert("L"), dtype=float)
    height, width = image.shape
    assert (height, width) == (1955, 1841)
    rows = slice(int(0.35 * height), int(0.55 * height))
    right_lung = image[rows, int(0.2 * width) : int(0.35 * width)].mean()
    left_lung = image[rows, int(0.65 * width) : int(0.8 * width)].mean()
    mediastinum = image[int(0.3 * height) : int(0.6 * height), int(0.45 * width) : int(0.55 * width)].mean()
    assert right_lung < mediastinum - 40 and left_lung < mediastinum - 40
    # The same file as a pydicom dataset gives the same pixels.
    import pydicom

    assert np.array_equal(np.asarray(load_radiograph(pydicom.dcmread(path)).convert("L")), image.astype(np.uint8))


@pytest.mark.parametrize("name, size", [("CT_small.dcm", (128, 128)), ("MR_small.dcm", (64, 64))])
def test_ct_and_mr_slices_load(name, size):
    from pydicom.data import get_testdata_file

    image = load_radiograph(get_testdata_file(name))
    array = np.asarray(image)
    assert image.size == size and image.mode == "RGB"
    assert array.std() > 10, "a windowed slice has contrast"


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def write_dicom(path, with_pixels=True):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.PatientName = "Phantom^Test"
    if with_pixels:
        dataset.Rows, dataset.Columns = 4, 4
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
        dataset.SamplesPerPixel, dataset.PixelRepresentation = 1, 0
        dataset.PhotometricInterpretation = "MONOCHROME2"
        dataset.PixelData = np.arange(16, dtype=np.uint16).tobytes()
    dataset.save_as(path, enforce_file_format=True)
    return path


def test_bad_inputs_get_errors_that_name_the_problem(tmp_path, tiny_model):
    model, processor = tiny_model
    with pytest.raises(TypeError, match="unsupported image type dict"):
        load_radiograph({"not": "an image"})
    with pytest.raises(RadiographError, match="missing.png: file not found"):
        load_radiograph(tmp_path / "missing.png")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(RadiographError, match="notes.txt: not a readable image file"):
        load_radiograph(tmp_path / "notes.txt")
    (tmp_path / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(RadiographError, match="truncated.png"):
        load_radiograph(tmp_path / "truncated.png")
    (tmp_path / "corrupt.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x07" * 50)
    with pytest.raises(RadiographError, match="corrupt.dcm: corrupt or unreadable DICOM"):
        load_radiograph(tmp_path / "corrupt.dcm")
    truncated = write_dicom(tmp_path / "truncated.dcm").read_bytes()[:-10]
    (tmp_path / "truncated.dcm").write_bytes(truncated)
    with pytest.raises(RadiographError, match="truncated.dcm: .*DICOM"):
        load_radiograph(tmp_path / "truncated.dcm")
    write_dicom(tmp_path / "no_pixels.dcm", with_pixels=False)
    with pytest.raises(RadiographError, match="no_pixels.dcm: the DICOM has no pixel data"):
        load_radiograph(tmp_path / "no_pixels.dcm")
    assert np.asarray(load_radiograph(write_dicom(tmp_path / "ok.dcm"))).shape == (4, 4, 3)
    with pytest.raises(RadiographError, match="shape"):
        load_radiograph(np.zeros((2, 3, 4, 5), dtype=np.uint8))
    with pytest.raises(RadiographError, match="item 1 of the batch.*missing.png"):
        processor(images=[np.zeros((8, 8), np.uint8), tmp_path / "missing.png"])
    with pytest.raises(TypeError, match="text item 1"):
        processor(text=["fine", 3])

    inputs = processor(images=random_images(3), text=REPORTS[:2])
    with pytest.raises(ValueError, match="got 3 images and 2 texts"):
        model(**inputs, return_loss=True)
    broken = dict(processor(text=REPORTS[:2]))
    broken["input_ids"] = broken["input_ids"][:, :-1]
    broken["attention_mask"] = broken["attention_mask"][:, :-1]
    with pytest.raises(ValueError, match="text pass: row 1 holds 3 special tokens, expected 4"):
        model.get_text_features(**broken)
