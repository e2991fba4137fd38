"""Synthetic 3D segmentation data that separates normalization layers.

Each case is a volume of ellipsoidal objects on a textured background. The segmentation is learnable from
*local* contrast only: an object is brighter or darker than its own surroundings, but every case then gets
its own random "scanner" gain and offset, so absolute intensities mean nothing across cases. A network whose
normalization uses per-volume statistics (InstanceNorm, GroupNorm, BatchNorm in training mode at batch 1)
removes the gain and offset; BatchNorm evaluated with running statistics applies one average
normalization to volumes whose statistics differ a lot, and loses Dice.

How a case is made (all in "contrast units", where an object differs from the background by about 1):

    tissue = BACKGROUND + TEXTURE_STD * smooth_noise(x) + contrast * sum_k intensity_k * mask_k(x)
    curved = BACKGROUND * (tissue / BACKGROUND) ** gamma
    clean  = (1 + bias * b(x)) * curved
    image  = gain * (clean + noise * white_noise(x)) + offset

with gain, offset, contrast, gamma, bias and noise drawn per case. Gain and offset are a linear change of
intensities, which a per-case z-score removes exactly; contrast (tissue contrast), gamma (a non-linear
intensity curve: bright and dark structures change by different amounts), bias-field strength and noise
level are the ways real scanners and protocols also differ, and a z-score does not remove them.

How each knob affects the normalization comparison:

- intensity_scale_range (gain, log-uniform per case) and intensity_offset_range (offset, uniform per case):
  the main lever. They make per-volume mean and standard deviation differ between cases, which is what
  running statistics cannot follow. Set both to a single value (e.g. (1, 1) and (0, 0)) for a control
  dataset where BatchNorm's running statistics match every case and eval-mode BN should not lose Dice.
- contrast_range (log-uniform per case) and gamma_range (log-uniform per case): what stays different between
  cases after a per-case z-score. Set both to (1, 1) for cases that differ only linearly.
- noise_std (white noise, relative to the object contrast; a (min, max) range drawn per case, or one value):
  task difficulty. Near 0 every norm reaches Dice ~1 and nothing separates; around 0.25-0.5 the task is
  learnable but not trivial.
- bias_field: a smooth multiplicative field (1 + bias * b(x), |b| <= 1, a random quadratic), its strength
  drawn per case from this (min, max) range (or one value). It changes intensities *within* a volume, so it
  rewards local (convolutional) contrast rather than global thresholds.
- num_classes, objects_per_class, radius_range, class_imbalance: how much foreground there is per class.
  Small, rare classes make Dice noisier, so more seeds are needed to separate norms.
  class_imbalance = f: class c (1-based) has its radii multiplied by f ** (-(c - 1) / 3), so each class has
  about 1/f of the expected volume of the class before it (f = 1: all classes alike; f < 1 is allowed and
  makes higher classes larger).
- air_margin: the share of each axis, at each end, that is air: no tissue there, only noise (as outside a
  head in MR), and objects only inside the body. Patches then differ by what they hold (air, tissue, objects)
  even after a per-case z-score, as patches of real anatomy do (docs/explanation/batchnorm_at_batch_1.md);
  0 (the default) keeps the whole volume tissue.
- shape and spacing: only the volume size and the spacing written into the NIfTI header; the objects are
  defined in voxels.

Class intensities (before gain and offset): class c gets sign (+ for odd c, - for even c) times ceil(c / 2),
i.e. +1, -1, +2, -2, ... relative to the background, each object jittered by +-10%. Classes are therefore
told apart by the sign and size of their local contrast, never by an absolute intensity.

Per-case intensity normalization (the loader's data.intensity=zscore, nnU-Net's default for MRI) undoes gain
and offset exactly, but not contrast, gamma, bias or noise. `python scripts/synthetic_variation.py` prints
how much each case's statistics still differ after z-scoring; docs/results.md shows what that does to
BatchNorm's evaluation gap.

Everything is drawn from numpy generators seeded with (seed, case index): the same SynthConfig gives
byte-identical arrays (the .nii.gz bytes may differ only in the gzip time stamp).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from norm_experiments.data.generated import GeneratedCase, ensure_generated
from norm_experiments.data.generated import (
    generate_dataset as generate_dataset,  # callers write a dataset from here
)
from norm_experiments.errors import UserError

# Bump when the generator's output changes for the same config, so old caches are not reused.
GENERATOR_VERSION = 2

BACKGROUND = 2.0  # tissue level before gain/offset; keeps the bias field from vanishing on the background
TEXTURE_STD = 0.3  # smooth background texture, in contrast units
TEXTURE_SIGMA = 2.0  # voxels; the texture's correlation length
MIN_RADIUS = 1.0  # voxels; smaller objects would vanish on the grid


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of a synthetic dataset; see the module docstring for what each one does."""

    num_cases: int = 24
    shape: tuple[int, int, int] = (48, 48, 48)
    spacing: tuple[float, float, float] = (1.5, 1.5, 2.0)
    num_classes: int = 2
    objects_per_class: tuple[int, int] = (1, 3)
    radius_range: tuple[float, float] = (4.0, 10.0)
    class_imbalance: float = 1.0
    noise_std: tuple[float, float] = (0.15, 0.35)
    intensity_scale_range: tuple[float, float] = (0.3, 3.0)
    intensity_offset_range: tuple[float, float] = (-2.0, 2.0)
    contrast_range: tuple[float, float] = (0.6, 1.6)
    gamma_range: tuple[float, float] = (0.7, 1.4)
    bias_field: tuple[float, float] = (0.0, 0.3)
    seed: int = 0
    air_margin: float = 0.0  # share of each axis, at each end, that is air around the body (0 = no air)
    kind = "synthetic"  # not a field (no annotation): the cache folder prefix of generated.Generator

    def __post_init__(self) -> None:
        # Configs arrive from YAML/argparse as lists: normalise so that key() and equality are stable.
        conv = {
            "num_cases": int,
            "shape": lambda v: tuple(int(x) for x in v),
            "spacing": lambda v: tuple(float(x) for x in v),
            "num_classes": int,
            "objects_per_class": lambda v: tuple(int(x) for x in v),
            "radius_range": lambda v: tuple(float(x) for x in v),
            "class_imbalance": float,
            "noise_std": _range,
            "intensity_scale_range": lambda v: tuple(float(x) for x in v),
            "intensity_offset_range": lambda v: tuple(float(x) for x in v),
            "contrast_range": lambda v: tuple(float(x) for x in v),
            "gamma_range": lambda v: tuple(float(x) for x in v),
            "bias_field": _range,
            "seed": int,
            "air_margin": float,
        }
        for name, fn in conv.items():
            try:
                object.__setattr__(self, name, fn(getattr(self, name)))
            except (TypeError, ValueError) as err:
                raise UserError(
                    f"synthetic data: {name}={getattr(self, name)!r} is not valid ({err})"
                ) from None
        self._validate()

    def _validate(self) -> None:
        def require(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise UserError(f"synthetic data: {name}={getattr(self, name)!r} {rule}")

        require(self.num_cases >= 1, "num_cases", "must be >= 1")
        require(self.seed >= 0, "seed", "must be >= 0")
        # 512 per side: a case of 512^3 float32 voxels is 0.5 GiB, and the generator holds several such arrays
        require(
            len(self.shape) == 3 and 8 <= min(self.shape) and max(self.shape) <= 512,
            "shape",
            "must be 3 sizes, each in [8, 512]",
        )
        require(
            len(self.spacing) == 3 and all(0 < s < 1000 for s in self.spacing),
            "spacing",
            "must be 3 positive numbers (mm, below 1000)",
        )
        require(1 <= self.num_classes <= 254, "num_classes", "must be between 1 and 254")
        lo, hi = _pair(self.objects_per_class)
        require(1 <= lo <= hi, "objects_per_class", "must be (min, max) with 1 <= min <= max")
        lo, hi = _pair(self.radius_range)
        require(0 < lo <= hi, "radius_range", "must be (min, max) with 0 < min <= max")
        require(self.class_imbalance > 0, "class_imbalance", "must be > 0")
        lo, hi = _pair(self.noise_std)
        require(0 <= lo <= hi, "noise_std", "must be >= 0 (one value, or (min, max) with min <= max)")
        lo, hi = _pair(self.intensity_scale_range)
        require(0 < lo <= hi, "intensity_scale_range", "must be (min, max) with 0 < min <= max")
        lo, hi = _pair(self.intensity_offset_range)
        require(lo <= hi, "intensity_offset_range", "must be (min, max) with min <= max")
        for name in ("contrast_range", "gamma_range"):
            lo, hi = _pair(getattr(self, name))
            require(0 < lo <= hi, name, "must be (min, max) with 0 < min <= max")
        lo, hi = _pair(self.bias_field)
        require(
            0 <= lo <= hi < 1, "bias_field", "must be in [0, 1) (one value, or (min, max) with min <= max)"
        )
        require(0 <= self.air_margin < 0.4, "air_margin", "must be in [0, 0.4)")
        body = [n - 2 * round(self.air_margin * n) for n in self.shape]
        require(min(body) >= 8, "air_margin", f"leaves a body of {body} voxels; each side must be >= 8")

    def key(self) -> str:
        """Short stable hash of every field (and the generator version): the cache folder name."""
        fields = dataclasses.asdict(self)
        fields["generator_version"] = GENERATOR_VERSION
        if not self.air_margin:  # added later: datasets without air keep their cache folders
            del fields["air_margin"]
        text = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    # The generated.Generator interface: what data/generated.py writes.

    def make(self, index: int) -> GeneratedCase:
        image, label, params = make_case(self, index)
        return GeneratedCase(case_name(index), image, label, np.diag([*self.spacing, 1.0]), params)

    def labels(self) -> dict[int, str]:
        return {0: "background", **{c: f"class{c}" for c in range(1, self.num_classes + 1)}}

    def modality(self) -> str:
        return "MRI"

    def provenance(self, cases: list[dict]) -> dict:
        """The generator's settings and each case's drawn parameters (to relate Dice to a case's intensity)."""
        return {
            "description": "norm-experiments synthetic dataset",
            "key": self.key(),
            "generator_version": GENERATOR_VERSION,
            **dataclasses.asdict(self),
            "cases": cases,
        }


def _range(value: object) -> tuple[float, float]:
    """A (min, max) range from one number (a fixed value) or two."""
    if isinstance(value, int | float):
        return (float(value), float(value))
    return tuple(float(x) for x in value)  # type: ignore[union-attr, return-value]


def _pair(value: tuple) -> tuple[float, float]:
    """(lo, hi) of a range; anything but two values fails validation with (1, 0)."""
    return (value[0], value[1]) if len(value) == 2 else (1, 0)


# ---------------------------------------------------------------------------------------------------------
# One case


def class_intensity(c: int) -> float:
    """Contrast of class c relative to the background: +1, -1, +2, -2, ... for c = 1, 2, 3, 4, ..."""
    return (1.0 if c % 2 == 1 else -1.0) * math.ceil(c / 2)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise with unit standard deviation (Fourier domain: no scipy needed)."""
    white = rng.standard_normal(shape)
    freqs = np.meshgrid(
        *[np.fft.fftfreq(n) for n in shape[:-1]], np.fft.rfftfreq(shape[-1]), indexing="ij", sparse=True
    )
    sq = sum(f**2 for f in freqs)
    smooth = np.fft.irfftn(
        np.fft.rfftn(white) * np.exp(-2 * (np.pi * sigma) ** 2 * sq), s=shape, axes=range(len(shape))
    )
    return smooth / (smooth.std() + 1e-12)


def bias_field(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A random quadratic polynomial over the volume, scaled to max |b| = 1 (a slowly varying field)."""
    axes = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij", sparse=True)
    terms = [np.ones((1, 1, 1))] + list(axes) + [a * b for i, a in enumerate(axes) for b in axes[i:]]
    field = sum(rng.uniform(-1, 1) * t for t in terms)
    field = np.broadcast_to(field, shape)
    return field / (np.abs(field).max() + 1e-12)


@dataclass
class _Object:
    cls: int
    center: np.ndarray  # voxels
    radii: np.ndarray  # voxels, one per axis (an axis-aligned ellipsoid)
    intensity: float


def _draw_objects(rng: np.random.Generator, cfg: SynthConfig, body: tuple[int, ...]) -> list[_Object]:
    """Objects inside a body of shape `body` (the whole volume, or the box inside the air margin)."""
    shape = np.array(body, dtype=float)
    max_radii = (shape - 3) / 2  # keep every object inside the volume with a voxel to spare
    objects: list[_Object] = []
    for c in range(1, cfg.num_classes + 1):
        count = int(rng.integers(cfg.objects_per_class[0], cfg.objects_per_class[1] + 1))
        scale = cfg.class_imbalance ** (-(c - 1) / 3)
        for _ in range(count):
            r = rng.uniform(*cfg.radius_range) * scale
            radii = np.clip(r * rng.uniform(0.75, 1.25, size=3), MIN_RADIUS, max_radii)
            center = _place(rng, radii, shape, objects)
            objects.append(_Object(c, center, radii, class_intensity(c) * rng.uniform(0.9, 1.1)))
    return objects


def _place(
    rng: np.random.Generator, radii: np.ndarray, shape: np.ndarray, others: list[_Object]
) -> np.ndarray:
    """A center keeping the object inside the volume, away from other objects if that is possible."""
    center = rng.uniform(radii + 1, shape - radii - 1)
    for _ in range(30):
        if all(np.linalg.norm(center - o.center) > radii.max() + o.radii.max() for o in others):
            break
        center = rng.uniform(radii + 1, shape - radii - 1)
    return center


def _paint(obj: _Object, shape: tuple[int, int, int]) -> tuple[tuple[slice, ...], np.ndarray]:
    """The bounding box of an object and its boolean mask inside that box."""
    lo = np.maximum(np.floor(obj.center - obj.radii), 0).astype(int)
    hi = np.minimum(np.ceil(obj.center + obj.radii) + 1, shape).astype(int)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    grids = np.ogrid[box]
    dist = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, obj.center, obj.radii, strict=True))
    return box, dist <= 1.0


def _object_maps(objects: list[_Object], shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Label map (uint8) and contrast map; big objects first so small ones stay visible on overlap."""
    label = np.zeros(shape, dtype=np.uint8)
    contrast = np.zeros(shape, dtype=np.float64)
    order = sorted(objects, key=lambda o: -float(np.prod(o.radii)))

    def draw(obj: _Object) -> None:
        box, mask = _paint(obj, shape)
        label[box][mask] = obj.cls
        contrast[box][mask] = obj.intensity

    for obj in order:
        draw(obj)
    # An object may be hidden entirely under others: redraw the smallest one of each missing class.
    for _ in range(3):
        missing = set(range(1, max(o.cls for o in objects) + 1)) - set(np.unique(label).tolist())
        if not missing:
            break
        for cls in sorted(missing):
            draw(min((o for o in objects if o.cls == cls), key=lambda o: float(np.prod(o.radii))))
    return label, contrast


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    lo, hi = bounds
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def scanner(rng: np.random.Generator, cfg: SynthConfig) -> dict[str, float]:
    """One case's acquisition: how its intensities differ from every other case's."""
    return {
        "gain": _log_uniform(rng, cfg.intensity_scale_range),
        "offset": float(rng.uniform(*cfg.intensity_offset_range)),
        "contrast": _log_uniform(rng, cfg.contrast_range),
        "gamma": _log_uniform(rng, cfg.gamma_range),
        "bias_field": float(rng.uniform(*cfg.bias_field)),
        "noise_std": float(rng.uniform(*cfg.noise_std)),
    }


def make_case(cfg: SynthConfig, index: int) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Image (float32), label (uint8) and the case's drawn acquisition parameters (see scanner()); a pure
    function of (cfg, index)."""
    rng = np.random.default_rng([cfg.seed, index])
    shape = cfg.shape
    margin = tuple(int(round(cfg.air_margin * n)) for n in shape)
    body = tuple(slice(m, n - m) for m, n in zip(margin, shape))
    body_shape = tuple(b.stop - b.start for b in body)
    body_label, body_contrast = _object_maps(_draw_objects(rng, cfg, body_shape), body_shape)
    label, contrast_map = np.zeros(shape, np.uint8), np.zeros(shape)
    label[body], contrast_map[body] = body_label, body_contrast
    case = scanner(rng, cfg)
    tissue = (
        BACKGROUND + TEXTURE_STD * smooth_noise(rng, shape, TEXTURE_SIGMA) + case["contrast"] * contrast_map
    )
    if any(margin):  # air: no signal outside the body, only the noise added below (as outside a head in MR)
        inside = np.zeros(shape, dtype=bool)
        inside[body] = True
        tissue = np.where(inside, tissue, 0.0)
    curved = BACKGROUND * (np.maximum(tissue, 0.0) / BACKGROUND) ** case["gamma"]
    clean = (1.0 + case["bias_field"] * bias_field(rng, shape)) * curved
    noisy = clean + case["noise_std"] * rng.standard_normal(shape)
    image = (case["gain"] * noisy + case["offset"]).astype(np.float32)
    return image, label, case


# ---------------------------------------------------------------------------------------------------------
# Writing a dataset (data/generated.py writes the files)


def case_name(index: int) -> str:
    return f"synth_{index:03d}"


def ensure_synthetic(cache_root: Path, cfg: SynthConfig) -> Path:
    """cache_root/synthetic-<key> in msd layout, generated on first use and reused afterwards."""
    return ensure_generated(cache_root, cfg)
