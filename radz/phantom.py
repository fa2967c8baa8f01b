"""Procedural PA chest-radiograph phantoms with radiology-style reports.

**These images are SYNTHETIC phantoms, not clinical data.** They are drawn from simple geometric
models (ellipses, arcs, smooth noise) and carry no diagnostic meaning. They exist so that the
offline demo and the test-suite can train and check LLaVA-RadZ without any real patient data.
Never present results obtained on them as clinical evidence.

Each case is a grayscale PA ("postero-anterior") radiograph-like image with thorax, lungs, heart,
mediastinum, trachea, spine, ribs, clavicles, hemidiaphragms and a gastric bubble, randomly varied
in size, position, rotation, exposure and noise. Seven findings can be drawn on top (multi-label,
see ``PHANTOM_LABELS``); a free-text FINDINGS / IMPRESSION report describes them, mostly with
descriptive wording ("the cardiac silhouette is enlarged") rather than the category name, plus
randomly chosen pertinent negatives for absent findings.

Conventions: the image is viewed as a radiologist reads it, so the patient's right is on the image
left. Geometry lives on a normalised grid with x, y in [-1, 1] (y grows downwards); one unit is
20 cm (a 40 cm film), which is how sizes quoted in the reports in cm match the pixels.

    >>> rng = np.random.default_rng(0)
    >>> case = generate_phantom(rng, size=192)
    >>> case.image.shape, case.image.dtype
    ((192, 192), dtype('uint8'))

Each case also records where each finding was drawn (``PhantomCase.regions``, one mask per finding:
the ground truth of the pointing game in ``benchmarks/bench_pointing_game.py``).

``write_phantom_dataset`` writes train / validation / test splits as PNGs (images and region masks)
plus JSONL manifests; ``python -m radz.phantom --out DIR`` does the same from the command line.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import io
import json
import math
import multiprocessing
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

PHANTOM_LABELS = [
    "Cardiomegaly",
    "Pleural Effusion",
    "Pneumothorax",
    "Pneumonia",
    "Nodule",
    "Edema",
    "Atelectasis",
    "No Finding",
]
FINDINGS = PHANTOM_LABELS[:-1]

# Probability of each finding in an *abnormal* case (before the "at least one finding" rejection
# and the co-occurrence boosts below). With NORMAL_FRACTION = 0.3 this gives marginal prevalences
# of roughly 15-25 % per finding.
DEFAULT_PREVALENCE = {
    "Cardiomegaly": 0.20,
    "Pleural Effusion": 0.18,
    "Pneumothorax": 0.20,
    "Pneumonia": 0.22,
    "Nodule": 0.22,
    "Edema": 0.13,
    "Atelectasis": 0.20,
}
NORMAL_FRACTION = 0.3
# Heart failure travels together: cardiomegaly raises the odds of edema and effusion.
_COOCCURRENCE = {("Cardiomegaly", "Edema"): 2.2, ("Cardiomegaly", "Pleural Effusion"): 1.6}

SPLITS = ("train", "validation", "test")
CM = 0.05  # normalised units per centimetre
_SIGN = {"right": -1.0, "left": 1.0}  # patient side -> image x direction

# --------------------------------------------------------------------------------------------
# Phrase tables. The report generator only ever writes these phrases for a finding, so a
# consumer (and tests/test_phantom.py) can check label/report agreement with them.
# --------------------------------------------------------------------------------------------

#: Lower-case substrings that assert a finding. Every description of a present finding contains
#: at least one; an absent finding's substrings appear only inside one of its negation phrases.
FINDING_PHRASES = {
    "Cardiomegaly": (
        "cardiomegaly", "cardiac silhouette is enlarged", "enlarged cardiac silhouette",
        "enlargement of the cardiac silhouette", "heart is enlarged", "enlarged heart",
        "cardiothoracic ratio",
    ),
    "Pleural Effusion": ("effusion", "blunting", "meniscus", "pleural fluid"),
    "Pneumothorax": (
        "pneumothorax", "visceral pleural line", "absent lung markings", "devoid of lung markings",
        "without lung markings",
    ),
    "Pneumonia": (
        "pneumonia", "consolidation", "airspace opacity", "airspace opacities", "airspace disease",
        "air bronchogram",
    ),
    "Nodule": ("nodule", "mass", "rounded opacity", "round opacity", "circumscribed opacity"),
    "Edema": (
        "edema", "perihilar haz", "bat-wing", "kerley", "septal lines", "vascular congestion",
        "peribronchial cuffing",
    ),
    "Atelectasis": (
        "atelectasis", "volume loss", "collapse", "plate-like", "discoid", "linear opacity",
        "linear opacities", "band-like opacity",
    ),
    "No Finding": (
        "no acute cardiopulmonary", "normal chest radiograph", "no acute intrathoracic",
        "no radiographic evidence of acute", "normal radiograph of the chest",
    ),
}

# (labels it negates, phrase). A phrase is only used when *all* its labels are absent.
_NEGATIONS = [
    (("Cardiomegaly",), "Heart size is normal."),
    (("Cardiomegaly",), "The heart is normal in size."),
    (("Cardiomegaly",), "The cardiac silhouette is normal in size."),
    (("Cardiomegaly",), "The cardiomediastinal silhouette is within normal limits."),
    (("Cardiomegaly",), "Normal cardiomediastinal silhouette."),
    (("Cardiomegaly",), "Cardiomediastinal contours are normal."),
    (("Cardiomegaly",), "No cardiomegaly."),
    (("Pleural Effusion",), "No pleural effusion."),
    (("Pleural Effusion",), "No pleural effusions."),
    (("Pleural Effusion",), "The costophrenic angles are sharp."),
    (("Pleural Effusion",), "Both costophrenic angles are clear."),
    (("Pneumothorax",), "No pneumothorax."),
    (("Pneumothorax",), "There is no pneumothorax."),
    (("Pneumothorax",), "No evidence of pneumothorax."),
    (("Pleural Effusion", "Pneumothorax"), "No pleural effusion or pneumothorax."),
    (("Pleural Effusion", "Pneumothorax"), "No effusion or pneumothorax."),
    (("Pleural Effusion", "Pneumothorax"), "There is no pneumothorax or pleural effusion."),
    (("Pleural Effusion", "Pneumothorax"), "No pleural abnormality."),
    (("Pneumonia",), "No focal consolidation."),
    (("Pneumonia",), "No focal airspace opacity."),
    (("Pneumonia",), "No airspace disease."),
    (("Pneumonia",), "No evidence of pneumonia."),
    (("Nodule",), "No suspicious pulmonary nodule or mass."),
    (("Nodule",), "No focal mass or nodule."),
    (("Nodule",), "No pulmonary nodules are seen."),
    (("Edema",), "No pulmonary edema."),
    (("Edema",), "No pulmonary vascular congestion."),
    (("Edema",), "The pulmonary vasculature is normal."),
    (("Edema",), "No interstitial edema."),
    (("Atelectasis",), "No atelectasis."),
    (("Atelectasis",), "No focal atelectasis or volume loss."),
    (("Pneumonia", "Edema"), "No consolidation or edema."),
    (("Pneumonia", "Nodule", "Atelectasis"), "No focal lung opacity."),
    (("Pneumonia", "Nodule", "Edema", "Atelectasis"), "The lungs are clear."),
    (("Pneumonia", "Nodule", "Edema", "Atelectasis"), "Lungs are clear bilaterally."),
    (("Pneumonia", "Nodule", "Edema", "Atelectasis", "Pneumothorax"),
     "The lungs are well expanded and clear."),
]

#: label -> lower-case negation phrases that may mention it while it is absent.
NEGATION_PHRASES = {
    name: tuple(p.lower().rstrip(".") for labels, p in _NEGATIONS if name in labels)
    for name in FINDINGS
}
NEGATION_PHRASES["No Finding"] = ()


@dataclass
class PhantomCase:
    """One synthetic case: ``image`` (uint8 H x W), ``labels`` (name -> 0/1 for every
    ``PHANTOM_LABELS`` entry), ``report`` (free text), ``attributes`` (what was drawn: heart
    width ratio, sides, sizes, pixel positions) and ``regions`` (present finding -> bool H x W
    mask of where it was drawn: the ground truth of localisation)."""

    image: np.ndarray
    labels: dict
    report: str
    attributes: dict = field(default_factory=dict)
    regions: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Finding sampling
# --------------------------------------------------------------------------------------------


def sample_findings(rng, prevalence=None, normal_fraction=NORMAL_FRACTION):
    """Draw a finding set: normal with probability ``normal_fraction``, else at least one finding,
    each with probability ``prevalence[name]`` (``DEFAULT_PREVALENCE`` for missing names), with
    cardiomegaly raising the odds of edema and effusion. Returns ``{finding: 0/1}``."""
    prev = {**DEFAULT_PREVALENCE, **(prevalence or {})}
    if rng.random() < normal_fraction:
        return {name: 0 for name in FINDINGS}
    while True:
        present = {}
        for name in FINDINGS:  # fixed order: Cardiomegaly is drawn before what it boosts
            p = prev[name]
            for (cause, effect), boost in _COOCCURRENCE.items():
                if effect == name and present.get(cause):
                    p = min(1.0, p * boost)
            present[name] = int(rng.random() < p)
        if any(present.values()):
            return present


def _check_findings(findings):
    unknown = set(findings) - set(PHANTOM_LABELS)
    if unknown:
        raise ValueError(f"unknown finding names {sorted(unknown)}; expected {PHANTOM_LABELS}")
    present = {name: int(bool(findings.get(name, 0))) for name in FINDINGS}
    if "No Finding" in findings and bool(findings["No Finding"]) == any(present.values()):
        raise ValueError("'No Finding' must be 1 exactly when no other finding is present")
    return present


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _axis(size):
    """Pixel-centre coordinates in [-1, 1] for one axis (cached: every image of a size shares it)."""
    return (np.arange(size, dtype=np.float32) + 0.5) * np.float32(2.0 / size) - np.float32(1.0)


@functools.lru_cache(maxsize=8)
def _interp_index(n, cells):
    pos = np.linspace(0.0, cells - 1.0, n, dtype=np.float32)
    lo = np.minimum(pos.astype(np.intp), cells - 2)
    return lo, pos - lo


@functools.lru_cache(maxsize=16)
def _smooth_basis(n, cells):
    """Linear interpolation matrix (n x cells): ``B @ G @ B.T`` turns a coarse random grid G into
    smooth noise with two small matrix products, much cheaper than resampling images."""
    lo, frac = _interp_index(n, cells)
    basis = np.zeros((n, cells), np.float32)
    basis[np.arange(n), lo] = 1.0 - frac
    basis[np.arange(n), lo + 1] = frac
    return basis


def _smooth_noise(rng, size, cells):
    basis = _smooth_basis(size, cells)
    grid = rng.standard_normal((cells, cells), dtype=np.float32)
    return basis @ grid @ basis.T


# Polar raster for vessel markings: radius bins up to 1.2 units from the hilum, angle bins over
# the full circle, both lung sides side by side.
_POLAR_R, _POLAR_T, _POLAR_RMAX = 40, 320, 1.2
# Variance left after linear interpolation of unit noise along both axes is (2/3)^2 per octave.
_POLAR_OCTAVES = ((8, 40, 1.0), (14, 80, 0.6))
_POLAR_NORM = 1.0 / math.sqrt(sum(w * w for _, _, w in _POLAR_OCTAVES) * (2 / 3) ** 2)


def _polar_noise(rng):
    """Smooth noise on a (radius, 2 x angle) raster, strongly elongated along the radius, of unit
    variance. Its zero-crossings radiate from the hilum and branch like vessels. Angles are
    interpolated by gathering (few rows), radii by a small matrix product."""
    raster = np.zeros((_POLAR_R, 2 * _POLAR_T), np.float32)
    for cells_r, cells_t, weight in _POLAR_OCTAVES:
        grid = rng.standard_normal((cells_r, 2 * cells_t), dtype=np.float32)
        lo, frac = _interp_index(2 * _POLAR_T, 2 * cells_t)
        cols = grid[:, lo] * (1 - frac) + grid[:, lo + 1] * frac
        raster += np.float32(weight) * (_smooth_basis(_POLAR_R, cells_r) @ cols)
    return (raster * np.float32(_POLAR_NORM)).ravel()


_ZERO, _ONE = np.float32(0), np.float32(1)


def _unit(v):
    """Clamp to [0, 1]; float32 bounds keep np.clip on its fast path."""
    return np.clip(v, _ZERO, _ONE)


@functools.lru_cache(maxsize=8)
def _noise_tile(size):
    """A fixed Gaussian noise texture twice the image size; each image takes a random window of it,
    which is much cheaper than drawing fresh normal variates for every pixel."""
    return np.random.default_rng(20250307).standard_normal((2 * size, 2 * size), dtype=np.float32)


@dataclass
class _Anatomy:
    """Random patient geometry, in thorax coordinates (before rotation / scaling)."""

    half_width: float  # inner rib-cage half-width = lateral lung edge
    apex: float  # y of the lung apices
    dome: dict  # side -> y of the top of the hemidiaphragm
    medial: float  # half-width of the mediastinum at lung level
    heart_cx: float
    heart_cy: float
    heart_right: float  # extent of the heart to the patient's right of heart_cx
    heart_left: float
    heart_rv: float  # vertical half-height
    shift: float = 0.0  # mediastinal shift (image x), from volume loss
    lung_scale: dict = field(default_factory=lambda: {"right": 1.0, "left": 1.0})

    def lung(self, side):
        """(centre x, half-width) of a lung's egg-shaped outline, after any mediastinal shift."""
        s = _SIGN[side]
        medial_edge = s * self.medial + self.shift
        lateral_edge = s * self.half_width
        return (medial_edge + lateral_edge) / 2, abs(lateral_edge - medial_edge) / 2

    def hilum(self, side):
        return _SIGN[side] * 0.2 + self.shift, -0.02

    def dome_y(self, side, x):
        """Hemidiaphragm height: a parabola peaking a little medial of the lung centre, falling
        to the costophrenic angle laterally."""
        xc, a = self.lung(side)
        peak = xc - _SIGN[side] * 0.15 * a
        return self.dome[side] + 0.2 * ((x - peak) / a) ** 2

    def heart_width_ratio(self):
        return (self.heart_right + self.heart_left) / (2 * self.half_width)


def _sample_anatomy(rng):
    half_width = rng.uniform(0.70, 0.80)
    right_dome = rng.uniform(0.30, 0.40)
    ratio = rng.uniform(0.38, 0.47)
    width = ratio * 2 * half_width
    right_share = rng.uniform(0.30, 0.38)
    return _Anatomy(
        half_width=half_width,
        apex=rng.uniform(-0.82, -0.74),
        dome={"right": right_dome, "left": right_dome + rng.uniform(0.02, 0.07)},
        medial=rng.uniform(0.11, 0.14),
        heart_cx=rng.uniform(0.03, 0.08),
        heart_cy=rng.uniform(0.26, 0.32),
        heart_right=right_share * width,
        heart_left=(1 - right_share) * width,
        heart_rv=rng.uniform(0.21, 0.25),
    )


# --------------------------------------------------------------------------------------------
# Finding details (side, size, position) sampled before rendering so image and report agree
# --------------------------------------------------------------------------------------------

_LOBES = {
    "right": ("right upper lobe", "right middle lobe", "right lower lobe"),
    "left": ("left upper lobe", "lingula", "left lower lobe"),
}


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _side(rng):
    return "right" if rng.random() < 0.5 else "left"


def _sample_details(rng, present, anatomy):
    """Per-finding parameters; also applies the anatomical consequences (heart size, volume
    loss) to ``anatomy``."""
    d = {}
    if present["Cardiomegaly"]:
        ratio = rng.uniform(0.55, 0.68)
        scale = ratio / anatomy.heart_width_ratio()
        anatomy.heart_right *= scale
        anatomy.heart_left *= scale
        anatomy.heart_rv *= 1 + 0.4 * (scale - 1)
        d["Cardiomegaly"] = {"severity": "mild" if ratio < 0.58 else "moderate" if ratio < 0.63
                             else "marked"}
    if present["Pleural Effusion"]:
        r = rng.random()
        if present["Edema"] or present["Cardiomegaly"]:
            sides = ["right", "left"] if r < 0.6 else [_side(rng)]
        else:
            sides = ["right", "left"] if r < 0.25 else [_side(rng)]
        d["Pleural Effusion"] = {
            "sides": sides,
            "sizes": {s: _pick(rng, ("small", "small", "moderate", "moderate", "large"))
                      for s in sides},
        }
    if present["Pneumothorax"]:
        size = _pick(rng, ("small", "moderate", "moderate", "large"))
        lo, hi = {"small": (0.84, 0.89), "moderate": (0.74, 0.82), "large": (0.60, 0.70)}[size]
        d["Pneumothorax"] = {"side": _side(rng), "size": size, "lung_fraction": rng.uniform(lo, hi)}
    if present["Pneumonia"]:
        foci = [_pneumonia_focus(rng, _side(rng))]
        if rng.random() < 0.15:
            other = "left" if foci[0]["side"] == "right" else "right"
            foci.append(_pneumonia_focus(rng, other))
        d["Pneumonia"] = {"foci": foci}
    if present["Nodule"]:
        lesions = [_nodule(rng)]
        if rng.random() < 0.15:
            lesions.append(_nodule(rng, max_cm=2.5))
        d["Nodule"] = {"lesions": lesions}
    if present["Edema"]:
        d["Edema"] = {"severity": _pick(rng, ("mild", "moderate", "moderate", "severe"))}
    if present["Atelectasis"]:
        side = _side(rng)
        kind = _pick(rng, ("plate", "plate", "plate", "lower lobe", "upper lobe"))
        if kind == "plate":
            elevation, shift = rng.uniform(0.0, 0.05), 0.0
        else:
            elevation, shift = rng.uniform(0.07, 0.12), rng.uniform(0.03, 0.06)
        anatomy.dome[side] -= elevation
        anatomy.shift += _SIGN[side] * shift
        anatomy.heart_cx += _SIGN[side] * shift
        d["Atelectasis"] = {"side": side, "kind": kind, "diaphragm_elevation": elevation,
                            "mediastinal_shift": shift}
    return d


def _pneumonia_focus(rng, side):
    lobe_index = int(rng.choice(3, p=(0.3, 0.2, 0.5)))
    return {
        "side": side,
        "lobe": _LOBES[side][lobe_index],
        "lobe_index": lobe_index,
        "radius": rng.uniform(0.16, 0.25),
        "air_bronchograms": bool(rng.random() < 0.5),
        "density": rng.uniform(0.3, 0.45),
    }


def _nodule(rng, max_cm=None):
    is_mass = max_cm is None and rng.random() < 0.3
    diameter = rng.uniform(3.5, 6.0) if is_mass else rng.uniform(1.2, max_cm or 3.0)
    return {
        "side": _side(rng),
        "zone": _pick(rng, ("upper", "upper", "mid", "lower")),
        "diameter_cm": round(float(diameter), 1),
        "kind": "mass" if is_mass else "nodule",
        "lobulated": bool(is_mass and rng.random() < 0.6),
    }


# --------------------------------------------------------------------------------------------
# Rendering. Everything is an "attenuation" map A (bright = dense) built from whole-image numpy
# expressions on a rotated / scaled grid; exposure, gamma and noise turn it into pixels.
# --------------------------------------------------------------------------------------------


class _Canvas:
    """Thorax-space coordinate grids of one image plus the conversions back to pixels."""

    def __init__(self, rng, size):
        self.size = size
        self.angle = math.radians(rng.normal(0.0, 2.0))
        self.scale = rng.uniform(0.9, 1.02)
        self.offset = (rng.normal(0.0, 0.025), rng.normal(0.03, 0.03))
        axis = _axis(size)
        c, s = math.cos(self.angle), math.sin(self.angle)
        xi = axis[None, :] - np.float32(self.offset[0])
        yi = axis[:, None] - np.float32(self.offset[1])
        inv = np.float32(1.0 / self.scale)
        self.x = (np.float32(c) * xi + np.float32(s) * yi) * inv
        self.y = (np.float32(-s) * xi + np.float32(c) * yi) * inv
        # Ramp slope for soft edges about 1.2 px wide, in thorax units.
        self.sharp = np.float32(size * self.scale / 2.4)

    def edge(self, signed_distance):
        """Soft inside-mask from a signed distance (positive inside), in thorax units."""
        return _unit(signed_distance * self.sharp + np.float32(0.5))

    def rows(self, y0, y1):
        """Slice of image rows that contains every point with thorax y in [y0, y1]."""
        ends = [self.to_pixel(x, y)[1] for x in (-1.3, 1.3) for y in (y0, y1)]
        return slice(max(int(min(ends)) - 1, 0), min(int(max(ends)) + 2, self.size))

    def to_pixel(self, x, y):
        """Thorax coordinates -> (column, row) pixel coordinates."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        xi = self.offset[0] + self.scale * (c * x - s * y)
        yi = self.offset[1] + self.scale * (s * x + c * y)
        return (xi + 1) / 2 * self.size - 0.5, (yi + 1) / 2 * self.size - 0.5

    def px_per_unit(self):
        return self.size / 2 * self.scale


def _lung_rho2(an, side, x, y):
    """Squared normalised radius of a lung outline: < 1 inside. The shape is an egg, narrow at
    the apex and broad and straight-sided at the base (the diaphragm cuts it off below)."""
    xc, a = an.lung(side)
    a = a * an.lung_scale[side]
    yc = an.apex + 0.68
    t = _unit((y - an.apex) * np.float32(1 / 0.9))
    u = (x - np.float32(xc)) / (np.float32(a) * (np.float32(0.8) + np.float32(0.2) * t))
    v = y - np.float32(yc)
    v = v * (np.float32(1 / 1.5) + (v < 0) * np.float32(1 / 0.68 - 1 / 1.5))  # steeper above
    return u * u + v * v, a


@dataclass
class _Scene:
    """What the finding helpers draw on: the attenuation map (bright = dense), the anatomy masks and the
    textures they share. ``lungs`` maps a side to (soft lung mask, squared normalised radius, lung half-width)."""

    canvas: _Canvas
    anatomy: _Anatomy
    attenuation: np.ndarray
    lungs: dict
    heart: np.ndarray
    lung_any: np.ndarray  # either lung, outside the heart
    hilar_dx: np.ndarray  # offset from the nearer hilum, mirrored so that lateral is positive
    hilar_dy: np.ndarray
    vessel_ridge: np.ndarray  # distance-like field whose zero set draws the vessels (bronchi run with them)
    patchiness: np.ndarray  # coarse smooth noise: patchy opacities
    mottle: np.ndarray  # finer smooth noise


# Region masks: where each finding lies, thresholded from its soft mask inside the lung (also where the heart
# shadow makes it fainter).
_REGION_LEVEL = np.float32(0.5)


def _render(rng, size, anatomy, details, attrs):
    """Draw one image: anatomy, then the findings, ribs and clavicles over them, then exposure and noise.
    Returns the uint8 image and ``{finding: bool mask}`` of where each present finding was drawn."""
    f32 = np.float32
    canvas = _Canvas(rng, size)
    attenuation = _soft_tissue_and_spine(canvas, anatomy)
    lungs, heart = _lungs_and_heart(canvas, anatomy)
    lung_any = (lungs["right"][0] + lungs["left"][0]) * (1 - heart)
    # Overlying breast / soft tissue makes the bases a little denser than the upper zones.
    attenuation -= lung_any * (f32(0.5) - f32(0.08) * _unit(canvas.y * f32(2.0)))
    attenuation += heart * f32(0.04)
    _draw_trachea_and_gastric_bubble(canvas, attenuation, anatomy)
    markings, ridge, dx, dy = _vessel_markings(rng, canvas, anatomy, lung_any, engorged="Edema" in details)
    scene = _Scene(canvas, anatomy, attenuation, lungs, heart, lung_any, dx, dy, ridge,
                   patchiness=_smooth_noise(rng, size, 10), mottle=_smooth_noise(rng, size, 26))

    regions = {}
    if "Cardiomegaly" in details:
        regions["Cardiomegaly"] = heart > _REGION_LEVEL
    if "Pneumothorax" in details:  # drawn before the markings are added: the pleural gap has none
        regions["Pneumothorax"] = _draw_pneumothorax(scene, details["Pneumothorax"], markings)
    attenuation += markings
    if "Pleural Effusion" in details:
        regions["Pleural Effusion"] = _draw_effusion(scene, details["Pleural Effusion"])
    if "Pneumonia" in details:
        regions["Pneumonia"] = _draw_pneumonia(rng, scene, details["Pneumonia"])
    if "Nodule" in details:
        regions["Nodule"] = np.zeros((size, size), bool)
        for lesion in details["Nodule"]["lesions"]:
            _draw_nodule(rng, scene, lesion, regions["Nodule"])
    if "Edema" in details:
        regions["Edema"] = _draw_edema(rng, scene, details["Edema"]["severity"])
    if "Atelectasis" in details:
        regions["Atelectasis"] = _draw_atelectasis(rng, scene, details["Atelectasis"])

    _draw_ribs(rng, canvas, attenuation, anatomy)
    _draw_clavicles(canvas, attenuation, anatomy)
    image = _expose(rng, attenuation, scene.patchiness)
    attrs["heart_width_ratio"] = float(anatomy.heart_width_ratio())
    attrs["geometry"] = {"angle_deg": math.degrees(canvas.angle), "scale": canvas.scale,
                         "offset": canvas.offset, "px_per_cm": float(CM * canvas.px_per_unit())}
    attrs["heart_px"] = {
        "right_border": float(canvas.to_pixel(anatomy.heart_cx - anatomy.heart_right, anatomy.heart_cy)[0]),
        "left_border": float(canvas.to_pixel(anatomy.heart_cx + anatomy.heart_left, anatomy.heart_cy)[0]),
        "thorax_right": float(canvas.to_pixel(-anatomy.half_width, anatomy.heart_cy)[0]),
        "thorax_left": float(canvas.to_pixel(anatomy.half_width, anatomy.heart_cy)[0]),
    }
    return image, regions


def _soft_tissue_and_spine(cv, an):
    """The body, a rounded soft-tissue cylinder wider at the shoulders and thicker in the middle, and the spine
    behind the mediastinum with faint disc spaces: the attenuation map the rest is drawn on."""
    f32 = np.float32
    x_abs, y = np.abs(cv.x), cv.y
    body_half_width = f32(an.half_width + 0.17) + f32(0.2) * _unit((-0.5 - y) * f32(1 / 0.4))
    rel = x_abs / body_half_width
    body = cv.edge((1 - rel) * body_half_width)
    attenuation = body * (f32(0.28) + f32(0.52) * np.sqrt(_unit(1 - rel * rel)))
    spine = _unit((f32(0.07) - x_abs) * f32(30))
    attenuation += spine * (f32(0.06) + f32(0.012) * np.cos(y * f32(2 * np.pi / 0.085)))
    return attenuation


def _lungs_and_heart(cv, an):
    """Soft masks of the lungs, bounded by the mediastinum (with the aortic knob on the left) and the diaphragm,
    and of the heart: an asymmetric tilted ellipse, mostly left of the midline (image right), in front of the
    left lung."""
    f32 = np.float32
    x, y = cv.x, cv.y
    mediastinum = f32(an.medial) + (x > an.shift) * f32(0.07) * np.exp(-(((y + 0.33) / 0.09) ** 2))
    outside_mediastinum = cv.edge(np.abs(x - f32(an.shift)) - mediastinum)
    lungs = {}
    for side in ("right", "left"):
        rho2, half_width = _lung_rho2(an, side, x, y)
        lung = cv.edge((1 - rho2) * f32(half_width / 2)) * cv.edge(an.dome_y(side, x) - y) * outside_mediastinum
        lungs[side] = (lung, rho2, half_width)
    u = (x - f32(an.heart_cx)) * (f32(1 / an.heart_right)
                                  + (x > an.heart_cx) * f32(1 / an.heart_left - 1 / an.heart_right))
    v = (y - f32(an.heart_cy)) * f32(1 / an.heart_rv) - f32(0.25) * u
    heart = cv.edge((1 - (u * u + v * v)) * f32(0.5 * (an.heart_left + an.heart_right) / 2))
    return lungs, heart


def _draw_trachea_and_gastric_bubble(cv, attenuation, an):
    """The trachea, a dark air column down to the carina, and the gastric bubble under the left hemidiaphragm."""
    f32 = np.float32
    x, y = cv.x, cv.y
    trachea_x = an.shift * 0.7
    trachea = cv.edge(f32(0.032) - np.abs(x - f32(trachea_x))) * cv.edge(f32(-0.3) - y)
    attenuation -= trachea * f32(0.15)
    bubble_x, bubble_y = 0.32 + an.shift * 0.5, an.dome["left"] + 0.1
    rho2 = ((x - f32(bubble_x)) * f32(1 / 0.1)) ** 2 + ((y - f32(bubble_y)) * f32(1 / 0.055)) ** 2
    attenuation -= cv.edge((1 - rho2) * f32(0.03)) * cv.edge(f32(bubble_y) - y + f32(0.01)) * f32(0.2)


def _vessel_markings(rng, cv, an, lung_any, engorged):
    """Thin branching lines radiating from each hilum (zero-crossings of radially elongated polar noise), tapering
    and fading towards the periphery; stronger when ``engorged`` (edema). Returns the markings (not yet added),
    the ridge field they are drawn from and the mirrored offsets (dx, dy) from the hila."""
    f32 = np.float32
    x, y = cv.x, cv.y
    left = x > f32(an.shift)
    right_hilum_x, left_hilum_x = an.hilum("right")[0], an.hilum("left")[0]
    dx = (x - f32(right_hilum_x) - left * f32(left_hilum_x - right_hilum_x)) * (left * f32(2) - f32(1))
    dy = y - f32(an.hilum("left")[1])
    r = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, dx)
    polar = _polar_noise(rng)
    radius_bin = np.clip(r, _ZERO, f32(_POLAR_RMAX * 0.999)) * f32(_POLAR_R / _POLAR_RMAX)
    angle_bin = (theta + f32(np.pi)) * f32((_POLAR_T - 1) / (2 * np.pi)) + left * f32(_POLAR_T)
    flat = (np.floor(radius_bin) * f32(2 * _POLAR_T) + angle_bin).astype(np.int32)
    ridge = np.abs(polar.take(flat)) * (r + f32(0.12)) * f32(5.0)
    vessels = _unit(1 - ridge) * np.exp(-r * f32(1 / 0.4))
    hilar = np.exp(-r * r * f32(1 / 0.01))
    gain = f32(1.5) if engorged else f32(1.0)
    markings = (vessels * f32(0.12) * gain + hilar * f32(0.1)) * lung_any
    return markings, ridge, dx, dy


def _draw_pneumothorax(scene, p, markings):
    """Air between the chest wall and the collapsed lung: the lung outline shrunk towards its medial base, so the
    pleural gap is widest at the apex and laterally; the visceral pleural line at its edge. Removes the vessel
    markings in the gap. Returns the gap's mask."""
    f32 = np.float32
    cv, an, attenuation = scene.canvas, scene.anatomy, scene.attenuation
    x, y = cv.x, cv.y
    side = p["side"]
    lung, _, half_width = scene.lungs[side]
    lung_x, _ = an.lung(side)
    pivot_x, pivot_y = lung_x - _SIGN[side] * 0.6 * half_width, an.dome[side]
    fraction = p["lung_fraction"]
    rho2_collapsed, _ = _lung_rho2(an, side, f32(pivot_x) + (x - f32(pivot_x)) / f32(fraction),
                                   f32(pivot_y) + (y - f32(pivot_y)) / f32(fraction))
    distance = (rho2_collapsed - 1) * f32(half_width * fraction / 2)
    gap = lung * cv.edge(distance)
    line = np.exp(-((distance * cv.sharp * f32(0.9)) ** 2)) * lung
    markings *= 1 - gap
    attenuation -= gap * f32(0.05)
    attenuation += line * f32(0.11) + (lung - gap) * f32(0.03)
    apex_gap = (pivot_y - an.apex) * (1 - fraction)  # apex-to-pleural-line distance
    p["apical_gap_cm"] = round(float(apex_gap / CM), 1)
    p["apical_gap_px"] = float(apex_gap * cv.px_per_unit())
    # A point in the middle of the apical gap, and its mirror in the other lung.
    other = "left" if side == "right" else "right"
    mid_y = an.apex + apex_gap / 2
    p["gap_point_px"] = tuple(float(c) for c in cv.to_pixel(lung_x, mid_y))
    p["mirror_point_px"] = tuple(float(c) for c in cv.to_pixel(an.lung(other)[0], mid_y))
    return gap > _REGION_LEVEL


def _draw_effusion(scene, p):
    """Fluid filling each affected costophrenic angle up to a meniscus that rises towards the chest wall.
    Returns the fluid's mask."""
    f32 = np.float32
    cv, an, attenuation = scene.canvas, scene.anatomy, scene.attenuation
    x, y = cv.x, cv.y
    region = np.zeros(x.shape, bool)
    p["fluid_top_px"] = {}
    for side in p["sides"]:
        lung, _, half_width = scene.lungs[side]
        lung_x, _ = an.lung(side)
        lateral = _unit((x - f32(lung_x)) * f32(_SIGN[side] / half_width) * f32(0.5) + f32(0.5))
        cp_angle = an.dome[side] + 0.2 * 1.15**2
        level = {"small": cp_angle - 0.17, "moderate": an.dome[side] - 0.12,
                 "large": an.dome[side] - 0.42}[p["sizes"][side]]
        meniscus = f32(level) + f32(0.2) * (1 - lateral) ** 2
        fluid = _unit((y - meniscus) * f32(1 / 0.06)) * lung
        attenuation += fluid * (1 - scene.heart) * f32(0.47)
        region |= fluid > _REGION_LEVEL
        p["fluid_top_px"][side] = float(cv.to_pixel(lung_x, level)[1])
    return region


def _pneumonia_center(rng, an, side, lobe_index, half_width):
    """Thorax coordinates of a pneumonia focus in the upper (0), middle / lingula (1) or lower (2) lobe."""
    s = _SIGN[side]
    lung_x, _ = an.lung(side)
    if lobe_index == 0:  # upper lobe, bounded below by the horizontal fissure on the right
        return lung_x + s * rng.uniform(-0.1, 0.25) * half_width, an.apex + rng.uniform(0.25, 0.4)
    if lobe_index == 1:  # middle lobe / lingula, against the heart border
        return s * (an.heart_right if s < 0 else an.heart_left) + an.heart_cx + s * 0.08, 0.15
    return lung_x + s * rng.uniform(0.0, 0.3) * half_width, an.dome[side] - rng.uniform(0.08, 0.16)


def _draw_pneumonia(rng, scene, p):
    """Fluffy consolidation around each focus, with a sharp edge along the minor fissure on the right and
    optional air bronchograms. Returns the union of the foci's masks."""
    f32 = np.float32
    cv, an, attenuation = scene.canvas, scene.anatomy, scene.attenuation
    x, y = cv.x, cv.y
    region = np.zeros(x.shape, bool)
    for focus in p["foci"]:
        side, lobe_index = focus["side"], focus["lobe_index"]
        lung, _, half_width = scene.lungs[side]
        hilum_y = an.hilum(side)[1]
        cx, cy = _pneumonia_center(rng, an, side, lobe_index, half_width)
        radius = focus["radius"]
        envelope = np.exp(-((x - f32(cx)) ** 2 + (y - f32(cy)) ** 2) * f32(1 / (2 * (0.75 * radius) ** 2)))
        fluffy = f32(1.0) + f32(0.4) * scene.patchiness + f32(0.35) * scene.mottle
        opacity = _unit((envelope * fluffy - f32(0.3)) * f32(1.5)) * lung
        patch = opacity * (f32(1) - f32(0.7) * scene.heart)
        if side == "right" and lobe_index in (0, 1):  # the minor fissure gives a sharp edge
            fissure = cv.edge((f32(hilum_y) - y) if lobe_index == 0 else (y - f32(hilum_y)))
            patch *= fissure
            opacity = opacity * fissure
        attenuation += patch * f32(focus["density"])
        if focus["air_bronchograms"]:
            bronchi = _unit(f32(1) - scene.vessel_ridge * f32(0.7))
            attenuation -= bronchi * _unit(patch * f32(2) - f32(1)) * f32(0.18)
        # The patch's soft edge is its own density ramp: a fifth of the peak already reads as opacity.
        region |= opacity > f32(0.2)
        focus["center_px"] = tuple(float(c) for c in cv.to_pixel(cx, cy))
        focus["radius_px"] = float(radius * cv.px_per_unit())
    return region


def _draw_nodule(rng, scene, lesion, region):
    """A round, well-defined opacity (projected sphere) placed in the chosen lung zone, drawn on a local window
    only; marks its disc in ``region``."""
    cv, an, attenuation = scene.canvas, scene.anatomy, scene.attenuation
    side, s = lesion["side"], _SIGN[lesion["side"]]
    lung_x, half_width = an.lung(side)
    dome = an.dome[side]
    zone_rows = {"upper": (an.apex + 0.25, -0.25), "mid": (-0.2, 0.05), "lower": (0.05, dome - 0.1)}
    cy = rng.uniform(*zone_rows[lesion["zone"]])
    # Lateral part of the lung, so that the heart never hides it.
    cx = lung_x + s * rng.uniform(0.05, 0.5) * half_width * (0.75 if lesion["zone"] == "upper" else 1.0)
    radius = lesion["diameter_cm"] * CM / 2
    ccol, crow = cv.to_pixel(cx, cy)
    px_per_unit = cv.px_per_unit()
    half = int(radius * px_per_unit * 1.3) + 3
    r0, r1 = max(int(crow) - half, 0), min(int(crow) + half + 1, cv.size)
    c0, c1 = max(int(ccol) - half, 0), min(int(ccol) + half + 1, cv.size)
    x, y = cv.x[r0:r1, c0:c1], cv.y[r0:r1, c0:c1]
    dx, dy = x - np.float32(cx), y - np.float32(cy)
    rr = np.sqrt(dx * dx + dy * dy)
    edge_radius = np.float32(radius)
    if lesion["lobulated"]:
        angle = np.arctan2(dy, dx) * np.float32(5) + np.float32(rng.uniform(0, 2 * np.pi))
        edge_radius = edge_radius * (1 + np.float32(0.1) * np.cos(angle))
    sphere = np.sqrt(_unit(1 - (rr / edge_radius) ** 2))
    rim = cv.edge(edge_radius - rr)
    density = 0.3 if lesion["kind"] == "nodule" else 0.36
    # Still visible (fainter) where it projects over the heart or the mediastinum.
    visible = np.maximum(scene.lung_any[r0:r1, c0:c1], np.float32(0.3))
    attenuation[r0:r1, c0:c1] += (np.float32(0.45) * rim + np.float32(0.55) * sphere) * np.float32(density) * visible
    region[r0:r1, c0:c1] |= rim > _REGION_LEVEL
    lesion["center_px"] = (float(ccol), float(crow))
    lesion["radius_px"] = float(radius * px_per_unit)


def _draw_edema(rng, scene, severity):
    """Bat-wing haze, dense around the hila and sparing the periphery, and Kerley B lines: short horizontal lines
    reaching the lateral pleura at the bases. Returns the union of the haze's and the lines' zones."""
    f32 = np.float32
    cv, attenuation = scene.canvas, scene.attenuation
    y = cv.y
    haze_amp, kerley_amp = {"mild": (0.1, 0.1), "moderate": (0.2, 0.09), "severe": (0.3, 0.07)}[severity]
    bat_wing = np.exp(-((scene.hilar_dx - f32(0.05)) * f32(1 / 0.32)) ** 2 - (scene.hilar_dy * f32(1 / 0.36)) ** 2)
    attenuation += bat_wing * (f32(0.75) + f32(0.35) * scene.patchiness) * scene.lung_any * f32(haze_amp)
    region = bat_wing * scene.lung_any > _REGION_LEVEL
    lines = np.cos(y * f32(2 * np.pi / 0.03) + f32(rng.uniform(0, 2 * np.pi)))
    lines = _unit(lines * f32(1.4) - f32(0.4))
    for side in ("right", "left"):
        lung, rho2, _ = scene.lungs[side]
        basal_rim = _unit((rho2 - f32(0.72)) * f32(10)) * _unit(y * f32(4))
        attenuation += lines * basal_rim * lung * f32(kerley_amp)
        region |= basal_rim * lung > _REGION_LEVEL
    return region


def _draw_atelectasis(rng, scene, p):
    """Plate-like atelectasis (a thin oblique band in the lower zone) or lobar collapse (a dense triangle from the
    hilum). Returns its mask."""
    cv, an, attenuation = scene.canvas, scene.anatomy, scene.attenuation
    side = p["side"]
    lung, _, half_width = scene.lungs[side]
    s = _SIGN[side]
    x, y = cv.x, cv.y
    f32 = np.float32
    if p["kind"] == "plate":
        lung_x, _ = an.lung(side)
        x0, y0 = lung_x + s * rng.uniform(0.0, 0.25) * half_width, an.dome[side] - rng.uniform(0.07, 0.16)
        angle = math.radians(rng.uniform(-15, 15))
        half_length, thickness = rng.uniform(0.12, 0.2), rng.uniform(0.014, 0.024)
        along = (x - f32(x0)) * f32(math.cos(angle)) + (y - f32(y0)) * f32(math.sin(angle))
        across = (y - f32(y0)) * f32(math.cos(angle)) - (x - f32(x0)) * f32(math.sin(angle))
        band = _unit(1 - (across * f32(1 / thickness)) ** 2) * cv.edge(f32(half_length) - np.abs(along))
        band = band * lung
        attenuation += band * (f32(1) - scene.heart) * f32(0.32)
        p["center_px"] = tuple(float(c) for c in cv.to_pixel(x0, y0))
        return band > _REGION_LEVEL
    # Lobar collapse: a dense triangle with its apex at the hilum and a sharp border along the displaced fissure
    # (medial base for the lower lobe, medial apex for the upper lobe).
    same_side = (x - f32(an.shift)) * f32(s) > 0
    hilum_x, hilum_y = an.hilum(side)
    # A point well inside the triangle, straight above / below the hilum.
    inside_y = hilum_y + (0.25 if p["kind"] == "lower lobe" else -0.3)
    p["center_px"] = tuple(float(c) for c in cv.to_pixel(hilum_x, inside_y))
    dx, dy = scene.hilar_dx, scene.hilar_dy
    if p["kind"] == "lower lobe":
        tan_a = f32(math.tan(math.radians(rng.uniform(18, 30))))
        wedge = cv.edge((dy * tan_a - dx) * f32(0.9)) * (dy > 0) * same_side * lung
        attenuation += wedge * (f32(1) - f32(0.5) * scene.heart) * f32(0.3)
    else:
        tan_b = f32(math.tan(math.radians(rng.uniform(12, 25))))
        wedge = cv.edge((-dy * tan_b - dx) * f32(0.8)) * (dy < 0) * same_side * lung
        attenuation += wedge * (f32(1) - scene.heart) * f32(0.3)
    return wedge > _REGION_LEVEL


def _draw_ribs(rng, cv, attenuation, an):
    """Posterior ribs arch upwards from the spine and curve down laterally; anterior ribs run the other way,
    fainter. Both are periodic bands along a curved coordinate whose spacing widens caudally; clamping the
    coordinate ends each family (a clamped value draws no rib)."""
    f32 = np.float32
    x_abs, y = np.abs(cv.x), cv.y
    x_abs2 = x_abs * x_abs
    cage = cv.edge(f32(an.half_width + 0.05) - x_abs) * _unit((y - f32(an.apex - 0.2)) * f32(8))
    rib_gap = rng.uniform(0.085, 0.1)
    q = y + f32(0.25) * x_abs - f32(0.85) * x_abs2 - f32(an.apex - 0.12)
    posterior = np.clip(q * (f32(1.15 / rib_gap) - q * f32(0.12 / rib_gap)), _ZERO, f32(10))  # 10 ribs
    w = (posterior - np.floor(posterior) - f32(0.3)) * f32(1 / 0.24)
    w *= w
    posterior_rib = _unit(1 - w * w) * _unit((x_abs - f32(0.06)) * f32(20))  # flat-topped bars
    anterior = np.clip((y + f32(0.5) * x_abs - f32(0.25) * x_abs2 - f32(an.apex)) * f32(1 / (rib_gap * 1.3)),
                       _ZERO, f32(6))
    w = (anterior - np.floor(anterior) - f32(0.5)) * f32(1 / 0.22)
    anterior_rib = _unit(1 - w * w) * _unit((x_abs - f32(0.2)) * f32(8))
    attenuation += (posterior_rib * f32(0.075) + anterior_rib * f32(0.035)) * cage


def _draw_clavicles(cv, attenuation, an):
    """Gently S-shaped bars from the sternal notch up to the acromion; drawn only on the rows they can reach."""
    f32 = np.float32
    rows = cv.rows(an.apex - 0.25, an.apex + 0.25)
    x_abs, y, attenuation_top = np.abs(cv.x[rows]), cv.y[rows], attenuation[rows]
    t = x_abs - f32(0.09)
    w = (y - f32(an.apex + 0.12) + f32(0.3) * t - f32(0.04) * np.sin(t * f32(np.pi / 0.3))) * f32(1 / 0.04)
    clavicle = np.sqrt(_unit(1 - w * w)) * cv.edge(t) * cv.edge(f32(an.half_width + 0.08) - x_abs)
    attenuation_top += clavicle * f32(0.14)


def _expose(rng, attenuation, patchiness):
    """Attenuation -> uint8 pixels: exposure, quantum mottle, noise and a random gamma."""
    f32 = np.float32
    size = attenuation.shape[0]
    lo, gain = rng.uniform(0.0, 0.07), rng.uniform(1.0, 1.2)
    r0, c0 = rng.integers(0, size, 2)
    noise = _noise_tile(size)[r0:r0 + size, c0:c0 + size]
    img = (attenuation - f32(lo)) * f32(gain) + patchiness * f32(0.01) + noise * f32(rng.uniform(0.008, 0.025))
    gamma_lut = ((np.arange(256) / 255.0) ** rng.uniform(0.85, 1.2) * 255 + 0.5).astype(np.uint8)
    return gamma_lut[(_unit(img) * f32(255) + f32(0.5)).astype(np.uint8)]


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------

_ZONE_WORDS = {"upper": ("upper zone", "upper lung zone", "upper lung"),
               "mid": ("mid zone", "mid lung zone", "mid lung"),
               "lower": ("lower zone", "lower lung zone", "lung base")}


def _cap(text):
    return text[0].upper() + text[1:]


def _describe(rng, name, p, attrs):
    """(findings sentence, impression phrase) for one present finding."""
    return _DESCRIBERS[name](functools.partial(_pick, rng), p, attrs)


def _describe_cardiomegaly(pick, p, attrs):
    """The enlarged heart, by severity or cardiothoracic ratio."""
    sev = p["severity"]
    ratio = attrs["heart_width_ratio"]
    sentence = pick((
        f"The cardiac silhouette is {sev}ly enlarged.",
        f"The cardiac silhouette is enlarged, with a cardiothoracic ratio of approximately {ratio:.2f}.",
        f"There is {sev} enlargement of the cardiac silhouette.",
        f"The heart is {sev}ly enlarged.",
        f"Enlarged cardiac silhouette, cardiothoracic ratio about {round(ratio * 100)}%.",
        f"{_cap(sev)} cardiomegaly.",
    ))
    impression = pick((f"{sev} cardiomegaly", "cardiomegaly", "enlarged cardiac silhouette",
                       f"{sev} enlargement of the cardiac silhouette"))
    return sentence, impression


def _describe_pleural_effusion(pick, p, attrs):
    """One or both effusions, with their sizes."""
    sides, sizes = p["sides"], p["sizes"]
    if len(sides) == 2:
        sz = sizes["right"] if sizes["right"] == sizes["left"] else "small to moderate" \
            if {"small", "moderate"} == set(sizes.values()) else "asymmetric"
        sentence = pick((
            f"There are {sz} bilateral pleural effusions, {sizes['right']} on the right and "
            f"{sizes['left']} on the left.",
            "Blunting of both costophrenic angles with meniscus-shaped basal opacities, "
            f"{sizes['right']} on the right and {sizes['left']} on the left.",
            f"Bilateral layering pleural fluid, {sizes['right']} on the right and {sizes['left']} "
            "on the left, obscuring the hemidiaphragms.",
        ))
        impression = pick((f"{sz} bilateral pleural effusions", "bilateral pleural effusions",
                           "bilateral pleural fluid"))
        return sentence, impression
    side = sides[0]
    sz = sizes[side]
    variants = [
        f"There is a {sz} {side} pleural effusion.",
        f"Blunting of the {side} costophrenic angle with a meniscus, consistent with a {sz} effusion.",
        f"A {sz} {side} pleural effusion with a meniscus along the lateral chest wall.",
        f"Homogeneous opacity at the {side} base with a concave upper border (meniscus), "
        f"in keeping with {sz} pleural fluid.",
    ]
    if sz == "small":
        variants.append(f"Blunting of the {side} costophrenic angle, likely a small effusion.")
    else:
        variants.append(f"{_cap(sz)} {side} pleural effusion obscuring the {side} hemidiaphragm.")
    impression = pick((f"{sz} {side} pleural effusion", f"{side} pleural effusion",
                       f"{sz} {side} effusion"))
    return pick(variants), impression


def _describe_pneumothorax(pick, p, attrs):
    """The side, size and apical gap of the pneumothorax."""
    side, sz, gap = p["side"], p["size"], p["apical_gap_cm"]
    sentence = pick((
        f"There is a {sz} {side} pneumothorax.",
        f"A visceral pleural line is seen at the {side} apex with absent lung markings peripherally, "
        f"consistent with a {sz} pneumothorax.",
        f"{_cap(side)} apical and lateral lucency devoid of lung markings, with a visible visceral pleural line.",
        f"{_cap(sz)} {side} pneumothorax, with the visceral pleural line approximately {gap:.1f} cm "
        "from the apex of the chest wall.",
        f"Visceral pleural line in the {side} hemithorax with a lucent rim without lung markings laterally.",
    ))
    impression = pick((f"{sz} {side} pneumothorax", f"{side} pneumothorax",
                       f"{side} apical pneumothorax"))
    return sentence, impression


def _describe_pneumonia(pick, p, attrs):
    """Each focus by lobe, with air bronchograms and a silhouetted heart border."""
    sentences, impressions = [], []
    for f in p["foci"]:
        lobe = f["lobe"]
        bronch = " with air bronchograms" if f["air_bronchograms"] else ""
        border = ""
        if f["lobe_index"] == 1:
            border = f", obscuring the {f['side']} heart border"
        sentences.append(pick((
            f"Patchy airspace opacity in the {lobe}{bronch}{border}.",
            f"There is consolidation in the {lobe}{bronch}{border}.",
            f"Focal airspace consolidation involving the {lobe}{bronch}.",
            f"Ill-defined airspace opacities in the {lobe}{border}{bronch}.",
            f"{_cap(lobe)} consolidation{bronch}.",
        )))
        impressions.append(pick((f"{lobe} pneumonia", f"{lobe} consolidation, likely pneumonia",
                                 f"airspace disease in the {lobe}, compatible with pneumonia",
                                 f"{lobe} consolidation")))
    return " ".join(sentences), "; ".join(impressions)


def _describe_nodule(pick, p, attrs):
    """Each lesion by size, side, zone and margin."""
    sentences, impressions = [], []
    for les in p["lesions"]:
        cm, side, kind = les["diameter_cm"], les["side"], les["kind"]
        zone = pick(_ZONE_WORDS[les["zone"]])
        margin = "lobulated" if les["lobulated"] else pick(("well-defined", "well-circumscribed",
                                                            "smoothly marginated"))
        sentences.append(pick((
            f"A {cm:.1f} cm rounded opacity in the {side} {zone}.",
            f"There is a {margin} {cm:.1f} cm {kind} in the {side} {zone}.",
            f"{_cap(margin)} round opacity measuring {cm:.1f} cm projecting over the {side} {zone}.",
            f"A {cm:.1f} cm {margin} {kind} is seen in the {side} {zone}.",
        )))
        impressions.append(pick((f"{cm:.1f} cm {side} {zone} {kind}",
                                 f"{side} {zone} {kind}, further evaluation with CT is recommended",
                                 f"{kind} in the {side} {zone}")))
    return " ".join(sentences), "; ".join(impressions)


def _describe_edema(pick, p, attrs):
    """Interstitial (mild) or alveolar edema."""
    sev = p["severity"]
    if sev == "mild":
        sentence = pick((
            "Mild interstitial edema with Kerley B lines at the lung bases.",
            "Peribronchial cuffing and septal lines at both bases, consistent with interstitial edema.",
            "Prominent pulmonary vasculature with mild perihilar haziness and Kerley B lines.",
            "Mild pulmonary vascular congestion with basal septal lines.",
        ))
        impression = pick(("mild interstitial edema", "mild pulmonary edema",
                           "pulmonary vascular congestion with interstitial edema"))
    else:
        sentence = pick((
            f"{_cap(sev)} bilateral perihilar haziness in a bat-wing distribution, consistent with pulmonary edema.",
            f"Bilateral perihilar hazy opacities with vascular congestion, in keeping with {sev} pulmonary edema.",
            f"There is {sev} pulmonary edema with bat-wing perihilar opacity and sparing of the periphery.",
            f"Bilateral symmetric perihilar haziness and peribronchial cuffing, consistent with {sev} alveolar edema.",
        ))
        impression = pick((f"{sev} pulmonary edema", "pulmonary edema",
                           f"{sev} pulmonary edema, likely cardiogenic"))
    return sentence, impression


def _describe_atelectasis(pick, p, attrs):
    """Plate-like atelectasis at a base, or lobar collapse with volume loss."""
    side, kind = p["side"], p["kind"]
    if kind == "plate":
        base = pick((f"{side} base", f"{side} lower zone", f"{side} lung base"))
        elevated = ""
        if p["diaphragm_elevation"] > 0.03:
            elevated = " with slight elevation of the ipsilateral hemidiaphragm"
        sentence = pick((
            f"Plate-like atelectasis at the {base}{elevated}.",
            f"A linear opacity at the {base}, consistent with discoid atelectasis.",
            f"Band-like opacity in the {base} in keeping with subsegmental atelectasis{elevated}.",
            f"Linear opacities at the {base}, likely atelectasis.",
        ))
        impression = pick((f"{side} basal atelectasis", f"plate-like atelectasis at the {side} base",
                           f"subsegmental atelectasis, {side} base"))
        return sentence, impression
    lobe = f"{side} {kind}"
    sentence = pick((
        f"Triangular opacity in the {lobe} with elevation of the {side} hemidiaphragm and mediastinal "
        f"shift to the {side}, consistent with {lobe} collapse.",
        f"{_cap(lobe)} collapse with volume loss: elevated {side} hemidiaphragm and shift of the "
        f"mediastinum to the {side}.",
        f"Dense wedge-shaped opacity at the {side} {'base' if kind == 'lower lobe' else 'apex'} with volume loss, "
        f"compatible with {lobe} atelectasis.",
    ))
    impression = pick((f"{lobe} collapse", f"{lobe} atelectasis", f"{lobe} atelectasis with volume loss"))
    return sentence, impression


_DESCRIBERS = {
    "Cardiomegaly": _describe_cardiomegaly,
    "Pleural Effusion": _describe_pleural_effusion,
    "Pneumothorax": _describe_pneumothorax,
    "Pneumonia": _describe_pneumonia,
    "Nodule": _describe_nodule,
    "Edema": _describe_edema,
    "Atelectasis": _describe_atelectasis,
}


_NORMAL_IMPRESSIONS = (
    "No acute cardiopulmonary abnormality.",
    "No acute cardiopulmonary process.",
    "Normal chest radiograph.",
    "No acute intrathoracic abnormality.",
    "No radiographic evidence of acute cardiopulmonary disease.",
    "Normal radiograph of the chest.",
)
_BONES = ("No acute osseous abnormality.", "The visualized osseous structures are intact.",
          "Bony thorax is unremarkable.")
_PREAMBLES = ("EXAMINATION: Chest radiograph, PA view.", "TECHNIQUE: Single frontal view of the chest.",
              "PA view of the chest.", "COMPARISON: None.")


def _negatives(rng, present, count):
    """Up to ``count`` pertinent negatives covering different absent findings."""
    idx = rng.permutation(len(_NEGATIONS))
    chosen, covered = [], set()
    for i in idx:
        labels, phrase = _NEGATIONS[i]
        if any(present[name] for name in labels) or covered.intersection(labels):
            continue
        chosen.append(phrase)
        covered.update(labels)
        if len(chosen) == count:
            break
    return chosen


def _write_report(rng, present, det, attrs):
    upper = rng.random() < 0.7
    head_f, head_i = ("FINDINGS:", "IMPRESSION:") if upper else ("Findings:", "Impression:")
    lines = []
    if rng.random() < 0.4:
        lines.append(_pick(rng, _PREAMBLES))
    order = [n for n in FINDINGS if present[n]]
    if len(order) > 2:  # keep the heart first, vary the order of the rest
        rest = order[1:] if order[0] == "Cardiomegaly" else order
        rest = [rest[i] for i in rng.permutation(len(rest))]
        order = (["Cardiomegaly"] if present["Cardiomegaly"] else []) + rest
    described = [_describe(rng, n, det[n], attrs) for n in order]
    normal = not order
    negatives = _negatives(rng, present, int(rng.integers(3, 6)) if normal else int(rng.integers(0, 4)))
    findings = [s for s, _ in described] + negatives
    if rng.random() < 0.5:
        findings.append(_pick(rng, _BONES))
    if normal:
        impression = _pick(rng, _NORMAL_IMPRESSIONS)
    elif len(described) > 1 and rng.random() < 0.5:
        impression = " ".join(f"{i + 1}. {_cap(imp)}." for i, (_, imp) in enumerate(described))
    else:
        impression = _cap("; ".join(imp for _, imp in described)) + "."
    lines.append(f"{head_f} {' '.join(findings)}")
    lines.append(f"{head_i} {impression}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def generate_phantom(rng, size=192, findings=None, *, prevalence=None, normal_fraction=NORMAL_FRACTION):
    """Render one synthetic PA chest radiograph and its report.

    Args:
        rng: ``np.random.Generator``; the case is a pure function of its state.
        size: image side in pixels (128-256 is the intended range; 64-1024 accepted).
        findings: ``{label: 0/1}`` to force a finding set (missing labels are 0); ``None`` samples
            one with ``sample_findings(rng, prevalence, normal_fraction)``.

    Returns:
        ``PhantomCase`` with a uint8 ``size`` x ``size`` image, labels for all ``PHANTOM_LABELS``,
        the report and the drawn attributes.
    """
    if not 64 <= size <= 1024:
        raise ValueError(f"size must be in [64, 1024], got {size}")
    if findings is None:
        present = sample_findings(rng, prevalence, normal_fraction)
    else:
        present = _check_findings(findings)
    anatomy = _sample_anatomy(rng)
    det = _sample_details(rng, present, anatomy)
    attrs = {}
    image, regions = _render(rng, size, anatomy, det, attrs)
    attrs["findings"] = det
    report = _write_report(rng, present, det, attrs)
    labels = {**present, "No Finding": int(not any(present.values()))}
    return PhantomCase(image=image, labels=labels, report=report, attributes=attrs, regions=regions)


def _case_rng(seed, split, index):
    # One independent stream per (seed, split, image): splits do not depend on each other's sizes
    # and the output does not depend on how the work is divided between processes.
    return np.random.default_rng([seed, SPLITS.index(split), index])


def _write_chunk(out_dir, split, start, stop, size, seed, prevalence, normal_fraction):
    records = []
    for index in range(start, stop):
        case = generate_phantom(_case_rng(seed, split, index), size,
                                prevalence=prevalence, normal_fraction=normal_fraction)
        rel = f"images/{split}/{index:06d}.png"
        _write_png(os.path.join(out_dir, rel), case.image)
        regions = {}
        for name, mask in case.regions.items():
            regions[name] = f"images/{split}/{index:06d}_region_{name.lower().replace(' ', '_')}.png"
            _write_png(os.path.join(out_dir, regions[name]), mask.astype(np.uint8) * 255)
        records.append({"image": rel, "report": case.report, **case.labels, "regions": regions})
    return records


def _write_png(path, pixels):
    buffer = io.BytesIO()  # one write() per file: much cheaper than PIL's chunked file writes
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    with open(path, "wb") as fh:
        fh.write(buffer.getbuffer())


def write_phantom_dataset(out_dir, n_train=3000, n_validation=300, n_test=600, size=192, seed=0,
                          num_workers=1, *, prevalence=None, normal_fraction=NORMAL_FRACTION):
    """Write a synthetic phantom dataset.

    Layout: ``out_dir/images/{split}/NNNNNN.png``, ``out_dir/{split}.jsonl`` (one record per image:
    ``image`` path relative to ``out_dir``, ``report``, 0/1 for every ``PHANTOM_LABELS`` name, and
    ``regions``: present finding -> path of its region mask, ``NNNNNN_region_<finding>.png`` beside
    the image, 255 where the finding was drawn) and ``out_dir/label_names.json``. Every image is a
    pure function of (seed, split, index), so the test split is the same whatever ``n_train`` or
    ``num_workers`` are.

    Returns a summary dict: paths, counts and per-split label prevalence.
    """
    os.makedirs(out_dir, exist_ok=True)
    counts = {"train": n_train, "validation": n_validation, "test": n_test}
    summary = {"out_dir": os.path.abspath(out_dir), "label_names": list(PHANTOM_LABELS),
               "size": size, "seed": seed, "splits": {}}
    with open(os.path.join(out_dir, "label_names.json"), "w") as fh:
        json.dump(PHANTOM_LABELS, fh)
    pool = None
    if num_workers > 1:
        pool = concurrent.futures.ProcessPoolExecutor(
            num_workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        for split, n in counts.items():
            os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
            args = (out_dir, split, size, seed, prevalence, normal_fraction)
            if pool is None:
                records = _write_chunk(out_dir, split, 0, n, size, seed, prevalence, normal_fraction)
            else:
                step = max(1, min(500, -(-n // (4 * num_workers))))
                futures = [pool.submit(_write_chunk, args[0], split, i, min(i + step, n), *args[2:])
                           for i in range(0, n, step)]
                records = [rec for fut in futures for rec in fut.result()]
            path = os.path.join(out_dir, f"{split}.jsonl")
            with open(path, "w") as fh:
                for rec in records:
                    fh.write(json.dumps(rec) + "\n")
            summary["splits"][split] = {
                "n": n, "jsonl": path,
                "prevalence": {name: (sum(r[name] for r in records) / n if n else 0.0)
                               for name in PHANTOM_LABELS},
            }
    finally:
        if pool is not None:
            pool.shutdown()
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m radz.phantom",
        description="Write a SYNTHETIC chest-radiograph phantom dataset (not clinical data).")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n_train", type=int, default=3000)
    parser.add_argument("--n_validation", type=int, default=300)
    parser.add_argument("--n_test", type=int, default=600)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_workers", type=int, default=1)
    parser.add_argument("--normal_fraction", type=float, default=NORMAL_FRACTION)
    args = parser.parse_args(argv)
    summary = write_phantom_dataset(args.out, args.n_train, args.n_validation, args.n_test,
                                    args.size, args.seed, args.num_workers,
                                    normal_fraction=args.normal_fraction)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
