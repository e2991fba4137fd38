"""Real brain anatomy with no download: grey and white matter from the MNI152 2009 template, one deformed and
re-scanned copy per case.

Source: the ICBM 2009a nonlinear symmetric template (T1-weighted average, grey- and white-matter probability
maps, 1 mm, skull-stripped) that the nilearn wheel ships in `nilearn/datasets/data/`. Nothing is downloaded.

How a case is made:
1. Labels on the template's 1 mm grid: the most probable of background, grey matter (1) and white matter (2).
2. Anatomy: the output grid (the brain's bounding box at `spacing` mm, in MNI world coordinates) is mapped
   into the template by a small random affine (rotation, scaling, translation about the brain's centre) plus
   a smooth random displacement field. The T1 is sampled trilinearly (smoothed first when the grid is coarser
   than 1 mm, against aliasing), the labels by nearest neighbour at the same points: labels and image move
   together, and every case keeps the output grid's affine.
3. Scanner (the synthetic generator's knobs, drawn per case): intensities in units of the template's white
   matter (about 1), then a gamma curve, a smooth multiplicative bias field, Rician noise (magnitude images:
   the air around the brain is positive noise, as in real MR) and a gain and offset.

    t      = T1(deformed) / white-matter level        (0 in the air outside the brain)
    clean  = (1 + bias * b(x)) * t ** gamma
    image  = gain * |clean + noise * (n1 + i n2)| + offset

A per-case z-score removes gain and offset; it does not remove gamma, bias or noise, and it does not make
patches alike: a patch of air, one of cortex and one of deep white matter keep very different statistics.
`norm-exp-explain` measures what that does to BatchNorm (docs/explanation/batchnorm_at_batch_1.md).

Everything is drawn from numpy generators seeded with (seed, case index): the same BrainConfig gives
byte-identical arrays.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from norm_experiments.data.generated import (
    LAYOUTS,
    GeneratedCase,
    ensure_generated,
    generate_dataset,
    out_dir_argument,
)
from norm_experiments.data.synthetic import _log_uniform, bias_field, smooth_noise
from norm_experiments.errors import OneLineParser, UserError, exit_on_user_error

# Bump when the generator's output changes for the same config, so old caches are not reused.
GENERATOR_VERSION = 1

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
SOURCE = (
    "MNI ICBM152 2009a nonlinear symmetric template (T1, grey- and white-matter probability maps), as shipped "
    "in the nilearn wheel (nilearn/datasets/data/); Fonov et al., NeuroImage 2011 and 2009; Collins et al. 1999"
)
LICENCE = (
    "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, "
    "McGill University. Permission to use, copy, modify, and distribute this software and its documentation "
    "for any purpose and without fee is hereby granted, provided that the above copyright notice appear in all "
    "copies. The authors and McGill University make no representations about the suitability of this "
    "software for any purpose. It is provided 'as is' without express or implied warranty."
)
LABELS = {0: "background", 1: "grey_matter", 2: "white_matter"}
BRAIN_THRESHOLD = 0.1  # T1 (in white-matter units) above this is brain: the crop box
MARGIN_MM = 4.0  # air kept around the brain's bounding box


@dataclass(frozen=True)
class BrainConfig:
    """Parameters of a brain dataset; see the module docstring for what each one does."""

    num_cases: int = 16
    spacing: float = 3.0  # mm, isotropic output grid
    rotation_deg: float = 6.0  # per axis, uniform in [-r, r]
    scale_range: tuple[float, float] = (0.92, 1.08)  # per axis, uniform
    translation_mm: float = 4.0  # per axis, uniform in [-t, t]
    deformation_mm: float = 3.0  # largest displacement of the smooth random field
    deformation_smoothness_mm: float = 12.0  # the field's correlation length
    intensity_scale_range: tuple[float, float] = (0.3, 3.0)  # gain, log-uniform
    intensity_offset_range: tuple[float, float] = (-0.2, 0.2)  # offset, in white-matter units
    gamma_range: tuple[float, float] = (0.7, 1.4)  # log-uniform
    bias_field: tuple[float, float] = (0.0, 0.3)  # strength, uniform
    noise_std: tuple[float, float] = (0.02, 0.08)  # Rician noise, in white-matter units, uniform
    seed: int = 0
    kind = "brain"  # not a field (no annotation): the cache folder prefix of generated.Generator

    def __post_init__(self) -> None:
        # Configs arrive from YAML/argparse as lists: normalise so that key() and equality are stable.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            try:
                if f.name in ("num_cases", "seed"):
                    value = int(value)
                elif isinstance(f.default, tuple):
                    value = tuple(float(x) for x in value)
                else:
                    value = float(value)
            except (TypeError, ValueError) as err:
                raise UserError(f"brain data: {f.name}={value!r} is not valid ({err})") from None
            object.__setattr__(self, f.name, value)
        self._validate()

    def _validate(self) -> None:
        def require(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise UserError(f"brain data: {name}={getattr(self, name)!r} {rule}")

        require(self.num_cases >= 1, "num_cases", "must be >= 1")
        require(self.seed >= 0, "seed", "must be >= 0")
        require(0.5 <= self.spacing <= 8, "spacing", "must be in [0.5, 8] mm")
        require(0 <= self.rotation_deg <= 30, "rotation_deg", "must be in [0, 30]")
        # the template's head is about 150 mm wide: a shift past 30 mm moves it out of the volume
        require(0 <= self.translation_mm <= 30, "translation_mm", "must be in [0, 30] mm")
        require(0 <= self.deformation_mm <= 10, "deformation_mm", "must be in [0, 10]")
        require(self.deformation_smoothness_mm > 0, "deformation_smoothness_mm", "must be > 0")
        for name in ("scale_range", "intensity_scale_range", "gamma_range"):
            lo, hi = _pair(getattr(self, name))
            require(0 < lo <= hi, name, "must be (min, max) with 0 < min <= max")
        lo, hi = _pair(self.intensity_offset_range)
        require(lo <= hi, "intensity_offset_range", "must be (min, max) with min <= max")
        lo, hi = _pair(self.bias_field)
        require(0 <= lo <= hi < 1, "bias_field", "must be (min, max) in [0, 1) with min <= max")
        lo, hi = _pair(self.noise_std)
        require(0 <= lo <= hi, "noise_std", "must be (min, max) with 0 <= min <= max")

    def key(self) -> str:
        """Short stable hash of every field (and the generator version): the cache folder name."""
        fields = dataclasses.asdict(self)
        fields["generator_version"] = GENERATOR_VERSION
        fields["template"] = template_digest()  # another nilearn release could ship other files
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    # The generated.Generator interface: what data/generated.py writes.

    def make(self, index: int) -> GeneratedCase:
        image, label, params = make_case(self, index)
        return GeneratedCase(f"brain_{index:03d}", image, label, output_grid(self.spacing)[1], params)

    def labels(self) -> dict[int, str]:
        return dict(LABELS)

    def modality(self) -> str:
        return "MRI"

    def provenance(self, cases: list[dict]) -> dict:
        return {
            "description": "norm-experiments brain anatomy: grey and white matter of the MNI152 2009 template, "
            "deformed and re-scanned per case",
            "source": SOURCE,
            "licence": LICENCE,
            "key": self.key(),
            "generator_version": GENERATOR_VERSION,
            "template_sha256": template_digest(),
            **dataclasses.asdict(self),
            "cases": cases,
        }


def _pair(value: tuple) -> tuple[float, float]:
    return (value[0], value[1]) if len(value) == 2 else (1, 0)


# ---------------------------------------------------------------------------------------------------------
# The template


def template_folder() -> Path:
    """nilearn's packaged data folder, found without importing nilearn (which imports pandas and sklearn)."""
    spec = importlib.util.find_spec("nilearn")
    folder = Path(spec.origin).parent / "datasets" / "data" if spec and spec.origin else None
    if folder is None or not all((folder / name).is_file() for name in TEMPLATE_FILES.values()):
        raise UserError(
            "data=brain needs the MNI152 template files of the nilearn package, which were not found; "
            "install it with: pip install nilearn"
        )
    return folder


@functools.lru_cache(maxsize=1)
def template_digest() -> str:
    """sha256 of the template files' bytes: part of the cache key."""
    digest = hashlib.sha256()
    folder = template_folder()
    for name in sorted(TEMPLATE_FILES.values()):
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Template:
    t1: np.ndarray  # float32, white-matter units (white matter ~ 1, air 0)
    label: np.ndarray  # uint8, LABELS
    affine: np.ndarray  # voxel -> MNI world (mm)
    box: tuple[np.ndarray, np.ndarray]  # world-space (min, max) corner of the brain, with a margin


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    folder = template_folder()
    images = {k: nib.load(str(folder / name)) for k, name in TEMPLATE_FILES.items()}
    t1 = np.asarray(images["t1"].dataobj, dtype=np.float32)
    gm = np.asarray(images["gm"].dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(images["wm"].dataobj, dtype=np.float32) / 255.0
    label = np.argmax(np.stack([1.0 - gm - wm, gm, wm]), axis=0).astype(np.uint8)
    t1 = t1 / float(np.median(t1[label == 2]))
    affine = images["t1"].affine
    inside = np.argwhere(t1 > BRAIN_THRESHOLD)
    corners = [nib.affines.apply_affine(affine, c) for c in (inside.min(0), inside.max(0))]
    lo, hi = np.minimum(*corners) - MARGIN_MM, np.maximum(*corners) + MARGIN_MM
    return Template(t1, label, affine, (lo, hi))


def output_grid(spacing: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, affine) of every case: the brain's bounding box at `spacing` mm, axes as the template's (RAS)."""
    lo, hi = load_template().box
    shape = tuple(int(np.ceil((h - low) / spacing)) for low, h in zip(lo, hi))
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = lo
    return shape, affine  # type: ignore[return-value]


@functools.lru_cache(maxsize=4)
def _smoothed_t1(spacing: float) -> np.ndarray:
    """The T1 low-passed for sampling at `spacing` mm (sigma ~ 0.4 output voxels): no aliasing at 2-4 mm."""
    t = load_template()
    voxel = float(np.mean(np.abs(np.diag(t.affine)[:3])))
    sigma = max(0.0, 0.4 * (spacing / voxel - 1.0))
    return ndimage.gaussian_filter(t.t1, sigma) if sigma > 0 else t.t1


# ---------------------------------------------------------------------------------------------------------
# One case


def _rotation(angles_deg: np.ndarray) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def anatomy(cfg: BrainConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(t1, label) of one deformed brain on the output grid, and the drawn affine parameters."""
    t = load_template()
    shape, out_affine = output_grid(cfg.spacing)
    angles = rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, 3)
    scales = rng.uniform(*cfg.scale_range, 3)
    shift = rng.uniform(-cfg.translation_mm, cfg.translation_mm, 3)
    # Output voxel -> world (mm) -> the template point it shows (about the brain's centre).
    grid = np.indices(shape, dtype=np.float64).reshape(3, -1)
    world = out_affine[:3, :3] @ grid + out_affine[:3, 3:4]
    centre = (t.box[0] + t.box[1])[:, None] / 2
    source = (_rotation(angles) * scales) @ (world - centre) + centre + shift[:, None]
    if cfg.deformation_mm > 0:
        sigma = cfg.deformation_smoothness_mm / cfg.spacing
        field = np.stack([smooth_noise(rng, shape, sigma) for _ in range(3)]).reshape(3, -1)
        source = source + cfg.deformation_mm * field / (np.abs(field).max() + 1e-12)
    voxel = np.linalg.inv(t.affine)
    coords = voxel[:3, :3] @ source + voxel[:3, 3:4]
    t1 = ndimage.map_coordinates(_smoothed_t1(cfg.spacing), coords, order=1, mode="constant", cval=0.0)
    label = ndimage.map_coordinates(t.label, coords, order=0, mode="constant", cval=0)
    params = {
        **{f"rotation_deg_{a}": float(v) for a, v in zip("xyz", angles)},
        **{f"scale_{a}": float(v) for a, v in zip("xyz", scales)},
        **{f"shift_mm_{a}": float(v) for a, v in zip("xyz", shift)},
    }
    return t1.reshape(shape).astype(np.float32), label.reshape(shape).astype(np.uint8), params


def scan(t1: np.ndarray, cfg: BrainConfig, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, float]]:
    """One acquisition of a brain: gamma, bias field, Rician noise, gain and offset (module docstring)."""
    case = {
        "gain": _log_uniform(rng, cfg.intensity_scale_range),
        "offset": float(rng.uniform(*cfg.intensity_offset_range)),
        "gamma": _log_uniform(rng, cfg.gamma_range),
        "bias_field": float(rng.uniform(*cfg.bias_field)),
        "noise_std": float(rng.uniform(*cfg.noise_std)),
    }
    clean = (1.0 + case["bias_field"] * bias_field(rng, t1.shape)) * np.maximum(t1, 0.0) ** case["gamma"]
    real = clean + case["noise_std"] * rng.standard_normal(t1.shape)
    imaginary = case["noise_std"] * rng.standard_normal(t1.shape)
    image = case["gain"] * np.hypot(real, imaginary) + case["offset"]
    return image.astype(np.float32), case


def make_case(cfg: BrainConfig, index: int) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Image (float32), label (uint8) and the case's drawn parameters; a pure function of (cfg, index)."""
    rng = np.random.default_rng([cfg.seed, index])
    t1, label, geometry = anatomy(cfg, rng)
    image, acquisition = scan(t1, cfg, rng)
    return image, label, {**geometry, **acquisition}


def ensure_brain(cache_root: Path, cfg: BrainConfig) -> Path:
    """cache_root/brain-<key> in msd layout, generated on first use and reused afterwards."""
    return ensure_generated(cache_root, cfg)


# ---------------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    d = BrainConfig()
    p = OneLineParser(
        prog="norm-exp-brain",
        description="Write the brain-anatomy dataset (grey/white matter from the MNI152 2009 template, deformed "
        "and re-scanned per case) as NIfTI files, to inspect what data=brain trains on. No download.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("out_dir", type=out_dir_argument, help="folder to create (must not exist or be empty)")
    p.add_argument("--layout", choices=LAYOUTS, default="msd", help="dataset layout")
    p.add_argument("--cases", type=int, default=d.num_cases, help="number of cases")
    p.add_argument("--spacing", type=float, default=d.spacing, help="isotropic voxel spacing in mm")
    p.add_argument("--deformation", type=float, default=d.deformation_mm, help="largest displacement in mm")
    p.add_argument(
        "--noise",
        type=float,
        nargs=2,
        default=d.noise_std,
        metavar=("LO", "HI"),
        help="each case's Rician noise level is drawn uniformly from [LO, HI], in white-matter intensity units",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="the dataset's own seed")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    """norm-exp-brain OUT_DIR [options]: write a brain dataset and say what was written."""
    a = _parser().parse_args(argv)
    cfg = BrainConfig(
        num_cases=a.cases, spacing=a.spacing, deformation_mm=a.deformation, noise_std=a.noise, seed=a.seed
    )
    out = generate_dataset(a.out_dir, cfg, a.layout)
    shape = "x".join(map(str, output_grid(cfg.spacing)[0]))
    print(
        f"wrote {cfg.num_cases} brain cases ({a.layout} layout, {shape} voxels at {cfg.spacing:g} mm) to {out}"
    )


if __name__ == "__main__":
    main()
