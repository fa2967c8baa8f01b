"""LLaVA-RadZ radiograph reading: PIL images, numpy arrays, image files, DICOM files and datasets, studies.

DICOM renders as a viewer shows it (`dicom_to_pil`); compressed transfer syntaxes decode through pydicom's decoder
plugins (the package depends on pylibjpeg with its libjpeg, openjpeg and rle plugins). A study is a folder of DICOM
files or a DICOMDIR (`study_files`).

This file is remote code: `LlavaRadZProcessor.save_pretrained` copies it into every checkpoint beside
processing_llava_radz.py, which imports it. It depends only on numpy, PIL, transformers and (lazily) pydicom.
"""

import copy
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from transformers.utils import logging


logger = logging.get_logger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom")
DICOMDIR = "DICOMDIR"
# 16-bit and float images without a DICOM window are mapped to 8 bits by this percentile range.
PERCENTILE_WINDOW = (0.5, 99.5)
# JPEG Baseline and JPEG Extended: sequential DCT, whose scan headers `_repair_scan_header` may fix.
SEQUENTIAL_JPEG = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51")


class RadiographError(ValueError):
    """An image input that cannot be read; the message names the item and the problem."""


# ----------------------------------------------------------------------------------------------------------------
# Arrays and PIL images
# ----------------------------------------------------------------------------------------------------------------


def to_uint8(pixels: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """Map any numeric array to uint8.

    The rule: uint8 passes through. Otherwise the values in `window` (low, high), or, without a window,
    between the 0.5th and 99.5th percentile, are mapped linearly to 0–255 and clipped. Float images whose
    values already lie in [0, 1] are scaled by 255.
    """
    if pixels.dtype == np.uint8:
        return pixels
    pixels = pixels.astype(np.float32)
    if window is None:
        if np.issubdtype(pixels.dtype, np.floating) and pixels.min() >= 0.0 and pixels.max() <= 1.0:
            window = (0.0, 1.0)
        else:
            window = tuple(np.percentile(pixels, PERCENTILE_WINDOW))
    low, high = window
    scaled = (pixels - low) / ((high - low) or 1e-6) * 255.0
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


def _array_to_pil(pixels: np.ndarray, name: str) -> Image.Image:
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] not in (3, 4)):
        raise RadiographError(f"{name}: expected an HxW, HxWx1, HxWx3 or HxWx4 array, got shape {pixels.shape}")
    if pixels.size == 0:
        raise RadiographError(f"{name}: the array is empty (shape {pixels.shape})")
    if not (np.issubdtype(pixels.dtype, np.integer) or np.issubdtype(pixels.dtype, np.floating)):
        raise RadiographError(f"{name}: unsupported array dtype {pixels.dtype}")
    if not np.isfinite(pixels).all():
        raise RadiographError(f"{name}: the array holds NaN or infinite values")
    return Image.fromarray(to_uint8(pixels)).convert("RGB")


def pil_to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """Any PIL mode to RGB; 16-bit and float modes go through the `to_uint8` rule instead of being clipped,
    transparency is composited on black."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _array_to_pil(np.asarray(image), name)
    try:
        if image.mode in ("RGBA", "LA", "P", "PA"):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (0, 0, 0, 255))
            return Image.alpha_composite(background, image).convert("RGB")
        return image.convert("RGB")
    except ValueError as error:
        raise RadiographError(f"{name}: PIL mode {image.mode} cannot be converted to RGB ({error})") from error


# ----------------------------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------------------------


def dicom_facts(dataset) -> dict:
    """What a chest classifier checks: `view` (ViewPosition: PA, AP, LL, LATERAL...), `modality` (Modality) and
    `body_part` (BodyPartExamined); upper-case, None when absent or empty."""
    facts = {}
    for key, keyword in (("view", "ViewPosition"), ("modality", "Modality"), ("body_part", "BodyPartExamined")):
        facts[key] = str(dataset.get(keyword, "") or "").strip().upper() or None
    return facts


def voi_windows(dataset) -> tuple[str | None, int]:
    """The VOI transform `pydicom.pixels.apply_voi_lut` applies: `("VOI LUT", n)` for a VOI LUT Sequence of n items
    (preferred, as pydicom does), `("window", n)` for n WindowCenter/WindowWidth pairs, `(None, 0)` for neither."""
    sequence = dataset.get("VOILUTSequence")
    if sequence and all(key in sequence[0] for key in ("LUTDescriptor", "LUTData")):
        return "VOI LUT", len(sequence)
    if dataset.get("WindowCenter") not in (None, "") and dataset.get("WindowWidth") not in (None, ""):
        return "window", min(dataset["WindowCenter"].VM, dataset["WindowWidth"].VM)
    return None, 0


def voi_output_range(dataset, index: int = 0) -> tuple[float, float]:
    """The range that `pydicom.pixels.apply_voi_lut` maps the VOI LUT or window `index` onto (its output range).

    A VOI LUT: `0 … 2**LUTDescriptor[2] − 1`. A window: `0 … 2**BitsStored − 1` for unsigned data, the signed range
    for signed data, or `0 … 2**LUTDescriptor[2] − 1` after a Modality LUT Sequence; each passed through
    RescaleSlope/Intercept when both are present.
    """
    if voi_windows(dataset)[0] == "VOI LUT":
        return 0.0, float(2 ** int(dataset.VOILUTSequence[index].LUTDescriptor[2]) - 1)
    bits = int(dataset.BitsStored)
    if dataset.get("ModalityLUTSequence"):
        low, high = 0, 2 ** int(dataset.ModalityLUTSequence[0].LUTDescriptor[2]) - 1
    elif int(dataset.get("PixelRepresentation", 0)) == 0:
        low, high = 0, 2**bits - 1
    else:
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    slope, intercept = dataset.get("RescaleSlope"), dataset.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        low, high = low * float(slope) + float(intercept), high * float(slope) + float(intercept)
    return float(low), float(high)


def dicom_to_pil(dataset, name: str = "DICOM dataset", window_index: int = 0) -> Image.Image:
    """Render a pydicom dataset as an 8-bit RGB image, the way a viewer shows it.

    Grayscale data: (1) the modality LUT (RescaleSlope/Intercept or a Modality LUT Sequence); (2) the VOI LUT, or
    else the window (WindowCenter/Width, VOILUTFunction LINEAR, LINEAR_EXACT or SIGMOID), number `window_index`
    where there are several; (3) the VOI output range (`voi_output_range`) mapped linearly onto 0–255; without a VOI
    LUT or window, 8-bit data passes through and deeper data takes the percentile rule of `to_uint8` over the
    pixels that are not padding (PixelPaddingValue, up to PixelPaddingRangeLimit); (4) inverted once when
    MONOCHROME1 or PresentationLUTShape INVERSE, so that air is dark. Colour data passes through. Multi-frame data
    uses its middle frame. The image's `info["dicom"]` holds `dicom_facts(dataset)`.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if "PixelData" not in dataset:
        raise RadiographError(f"{name}: the DICOM has no pixel data (no PixelData element)")
    limit = Image.MAX_IMAGE_PIXELS
    rows, columns = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
    if limit and rows * columns > 2 * limit:
        raise RadiographError(
            f"{name}: {columns}x{rows} pixels is over PIL's decompression-bomb limit (2 x PIL.Image.MAX_IMAGE_PIXELS "
            f"= {2 * limit}); raise PIL.Image.MAX_IMAGE_PIXELS to read a file you trust"
        )
    stored = _decode_pixels(dataset, name)
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if not photometric.startswith("MONOCHROME"):
        image = _array_to_pil(stored, name)
        image.info["dicom"] = dicom_facts(dataset)
        return image

    pixels = apply_modality_lut(stored, dataset)
    kind, count = voi_windows(dataset)
    if kind is not None and window_index >= count:
        raise RadiographError(f"{name}: window_index={window_index}, but the DICOM has {count} {kind}(s)")
    window = None
    if kind is not None:
        try:
            pixels, window = apply_voi_lut(pixels, dataset, index=window_index), voi_output_range(dataset, window_index)
        except (ValueError, NotImplementedError) as error:
            logger.warning(f"{name}: the DICOM {kind} cannot be applied ({error}); using the percentile rule")
    if window is None and pixels.dtype != np.uint8:
        kept = pixels[~_padding_mask(stored, dataset)]
        window = tuple(np.percentile(kept if kept.size else pixels, PERCENTILE_WINDOW))
    gray = to_uint8(pixels, window)
    if photometric == "MONOCHROME1" or str(dataset.get("PresentationLUTShape", "")).upper() == "INVERSE":
        gray = 255 - gray
    image = Image.fromarray(gray).convert("RGB")
    image.info["dicom"] = dicom_facts(dataset)
    return image


def _padding_mask(stored: np.ndarray, dataset) -> np.ndarray:
    """The stored pixels equal to PixelPaddingValue, or between it and PixelPaddingRangeLimit."""
    value = dataset.get("PixelPaddingValue")
    if value is None:
        return np.zeros(stored.shape, dtype=bool)
    low, high = sorted((int(value), int(dataset.get("PixelPaddingRangeLimit", value))))
    return (stored >= low) & (stored <= high)


def _decode_pixels(dataset, name: str) -> np.ndarray:
    """The stored pixel values (the middle frame of multi-frame data), decoded by pydicom's plugins."""
    from pydicom.pixels import pixel_array

    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    try:
        return pixel_array(_with_repaired_jpeg_scans(dataset), index=frames // 2 if frames > 1 else None)
    except Exception as error:  # pydicom and its plugins raise many types for bad or unsupported encodings
        raise RadiographError(_decode_failure(dataset, name, error)) from error


def _decode_failure(dataset, name: str, error: Exception) -> str:
    """Why the pixel data cannot be decoded, with the decoders for its transfer syntax that are not installed."""
    from pydicom.pixels import get_decoder

    syntax = getattr(dataset, "file_meta", {}).get("TransferSyntaxUID")
    if syntax is None:
        return f"{name}: the DICOM pixel data cannot be decoded: its file meta information has no TransferSyntaxUID"
    message = f"{name}: the DICOM pixel data in {syntax.name} ({syntax}) cannot be decoded"
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return (
            f"{message}: pydicom has no decoder for this transfer syntax; convert the file to an uncompressed one "
            "with a DICOM toolkit (dcmtk, GDCM)"
        )
    missing = "; ".join(decoder.missing_dependencies)
    if not decoder.is_available:
        return f"{message}: no decoder for it is installed; install one of: {missing}"
    return f"{message} ({error})" + (f"; decoders for it that are not installed: {missing}" if missing else "")


def _with_repaired_jpeg_scans(dataset):
    """`dataset`, or, when its sequential-JPEG frames need `_repair_scan_header`, a copy with repaired frames."""
    from pydicom.encaps import encapsulate, generate_frames

    if getattr(dataset, "file_meta", {}).get("TransferSyntaxUID") not in SEQUENTIAL_JPEG:
        return dataset
    frames = list(generate_frames(dataset.PixelData, number_of_frames=int(dataset.get("NumberOfFrames", 1) or 1)))
    repaired = [_repair_scan_header(frame) for frame in frames]
    if all(new is old for new, old in zip(repaired, frames)):
        return dataset
    dataset = copy.deepcopy(dataset)  # the pixel bytes are shared, not copied
    dataset.PixelData = encapsulate(repaired)
    return dataset


def _repair_scan_header(frame: bytes) -> bytes:
    """`frame` with Se = 63 in its scan header when a sequential frame header (SOF0, SOF1) precedes a scan header
    with Ss = 0 and Se ≠ 63; `frame` itself otherwise.

    Some encoders write Se = 0 there, where 63 is the only valid value, and decoders refuse the frame ("scan start
    must be zero and scan stop must be 63 for the sequential operating modes").
    """
    if frame[:2] != b"\xff\xd8":
        return frame
    position, sequential = 2, False
    while position + 4 <= len(frame) and frame[position] == 0xFF:
        marker = frame[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0xC0, 0xC1):
            sequential = True
        elif marker == 0xDA:  # SOS: length, Ns, Ns x (Cs, Td/Ta), Ss, Se, Ah/Al
            end = position + 4 + 1 + 2 * frame[position + 4] + 1
            if sequential and end < len(frame) and frame[end - 1] == 0 and frame[end] != 63:
                return frame[:end] + b"\x3f" + frame[end + 1 :]
            return frame
        position += 2 + int.from_bytes(frame[position + 2 : position + 4], "big")
    return frame


# ----------------------------------------------------------------------------------------------------------------
# Files, inputs, studies
# ----------------------------------------------------------------------------------------------------------------


def _has_dicom_preamble(path: Path) -> bool:
    with open(path, "rb") as handle:
        header = handle.read(132)
    return len(header) == 132 and header[128:132] == b"DICM"


def _is_dicom_file(path: Path) -> bool:
    return path.suffix.lower() in DICOM_SUFFIXES or _has_dicom_preamble(path)


def _read_dicom(path: Path, window_index: int) -> Image.Image:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, OSError, ValueError, AttributeError) as error:
        raise RadiographError(f"{path}: corrupt or unreadable DICOM ({error})") from error
    if "TransferSyntaxUID" not in dataset.file_meta:
        raise RadiographError(f"{path}: corrupt or unreadable DICOM (no valid file meta information)")
    return dicom_to_pil(dataset, name=str(path), window_index=window_index)


def _open_path(path: Path, window_index: int = 0) -> Image.Image:
    """A file by its content: DICOM when it has the `DICM` preamble; else any format PIL identifies (whatever the
    suffix); else DICOM by suffix (.dcm, .dicom)."""
    if not path.exists():
        raise RadiographError(f"{path}: file not found")
    if path.is_dir():
        raise RadiographError(f"{path}: is a directory, not an image file (the pipeline reads a folder as a study)")
    if path.stat().st_size == 0:
        raise RadiographError(f"{path}: the file is empty (0 bytes)")
    if _has_dicom_preamble(path):
        return _read_dicom(path, window_index)
    try:
        with Image.open(path) as image:
            frames = getattr(image, "n_frames", 1)  # counted first: counting seeks, then the first frame loads
            image.load()
    except UnidentifiedImageError as error:
        if path.suffix.lower() in DICOM_SUFFIXES:
            return _read_dicom(path, window_index)
        raise RadiographError(f"{path}: not a readable image file ({error})") from error
    except Image.DecompressionBombError as error:
        raise RadiographError(
            f"{path}: over PIL's decompression-bomb limit ({error}); raise PIL.Image.MAX_IMAGE_PIXELS to read a file "
            "you trust"
        ) from error
    except (OSError, SyntaxError, ValueError) as error:
        raise RadiographError(f"{path}: not a readable image file ({error})") from error
    if frames > 1:
        logger.warning(f"{path}: the file holds {frames} frames; the first is read")
    return pil_to_rgb(image, str(path))


def load_radiograph(image, name: str | None = None, window_index: int = 0) -> Image.Image:
    """Load one radiograph as an 8-bit RGB PIL image.

    Accepts a PIL image (any mode), a numpy array (uint8, uint16 or float; HxW or HxWxC), a path (str or
    `Path`) to a PNG/JPEG/any PIL-readable file (the first frame of an animated or multi-page one) or a DICOM
    (by the `DICM` preamble, or by suffix when PIL does not know the file), or a pydicom `Dataset` (rendered by
    `dicom_to_pil`, with `window_index`). Grayscale becomes 3-channel. Raises `RadiographError` (a `ValueError`)
    naming the file and the problem for missing, empty, unreadable, corrupt or undecodable input, and `TypeError`
    for an unsupported input type.
    """
    name = name or "image"
    if isinstance(image, Image.Image):
        return pil_to_rgb(image, name)
    if isinstance(image, (str, os.PathLike)):
        return _open_path(Path(image), window_index)
    if isinstance(image, np.ndarray):
        return _array_to_pil(image, name)
    if type(image).__module__.startswith("pydicom"):
        return dicom_to_pil(image, name, window_index)
    raise TypeError(
        f"{name}: unsupported image type {type(image).__name__}; expected a PIL image, a numpy array, "
        "a path to an image or DICOM file, or a pydicom Dataset"
    )


def load_radiographs(images) -> list[Image.Image]:
    """`load_radiograph` over a list; errors name the index of the bad item."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    loaded = []
    for index, image in enumerate(images):
        try:
            loaded.append(load_radiograph(image, name=f"image {index}"))
        except (RadiographError, TypeError) as error:
            raise type(error)(f"item {index} of the batch: {error}") from error
    return loaded


def is_study(item) -> bool:
    """Whether `item` is a study for `study_files`: a path to a folder or to a file named DICOMDIR."""
    if not isinstance(item, (str, os.PathLike)):
        return False
    path = Path(item)
    return path.is_dir() or (path.name.upper() == DICOMDIR and path.is_file())


def study_files(path) -> list[Path]:
    """The image files of a study, in order.

    A DICOMDIR (the file, or one at the top of the folder): the files of its IMAGE records. A folder without one:
    every DICOM file (by suffix or the `DICM` preamble) in it and its subfolders, in path order, skipping hidden
    files and DICOM files without an image (no Rows: reports, presentation states, directories). Raises
    `RadiographError` naming the folder when it holds no image.
    """
    import pydicom

    path = Path(path)
    if not is_study(path):
        raise RadiographError(f"{path}: not a folder or a DICOMDIR")
    dicomdir = path if path.is_file() else next((p for p in sorted(path.iterdir()) if is_study(p) and p.is_file()), None)
    if dicomdir is not None:
        try:
            records = pydicom.dcmread(dicomdir).get("DirectoryRecordSequence", [])
        except Exception as error:  # pydicom raises many types for damaged files
            raise RadiographError(f"{dicomdir}: corrupt or unreadable DICOMDIR ({error})") from error
        files = []
        for record in records:
            if record.get("DirectoryRecordType") == "IMAGE" and record.get("ReferencedFileID"):
                parts = record.ReferencedFileID
                files.append(dicomdir.parent.joinpath(*([parts] if isinstance(parts, str) else parts)))
    else:
        files = [
            file
            for file in sorted(path.rglob("*"))
            if file.is_file()
            and not any(part.startswith(".") for part in file.relative_to(path).parts)
            and _is_dicom_file(file)
            and _holds_image(file)
        ]
    if not files:
        raise RadiographError(f"{path}: the study holds no DICOM image")
    return files


def _holds_image(path: Path) -> bool:
    """False for a well-formed DICOM file without Rows (no image); True otherwise, so that loading a damaged file
    names it."""
    import pydicom

    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # damaged
        return True
    return "Rows" in dataset or "TransferSyntaxUID" not in dataset.file_meta


__all__ = [
    "RadiographError",
    "dicom_facts",
    "dicom_to_pil",
    "is_study",
    "load_radiograph",
    "load_radiographs",
    "study_files",
    "to_uint8",
    "voi_output_range",
    "voi_windows",
]
