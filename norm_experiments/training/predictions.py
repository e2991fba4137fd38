"""trainer.save_predictions: each validation case's predicted label map, per evaluation mode, as NIfTI on the
case's own image grid, so that the image and the label maps open together in a viewer (3D Slicer, ITK-SNAP).

    run_dir/predictions/<case>/<mode>.nii.gz         predicted classes (0 = background), uint8
    run_dir/predictions/<case>/<mode>_errors.nii.gz  0 agrees with the truth, 1 missed, 2 false positive,
                                                     3 wrong foreground class
    run_dir/predictions/cases.json                   per case: the source image and label files, and Dice
                                                     per class and mode

Modes: running (model.eval()) for every norm; precise (PreciseBN) and batch (batch statistics) too for norms
that keep running statistics, when trainer.eval_modes is on: the same three modes the run is scored in.

Geometry: the network sees each case reoriented to RAS, maybe resampled (data.target_spacing) and padded to
the patch. Each prediction is mapped back onto the first image file's voxel grid (shape, affine and header,
as a label map) by nearest neighbour through the two grids' affines: the reorientation and the padding are
undone exactly, a resampling as well as nearest neighbour can. The truth of the error map is the
preprocessed label mapped back the same way, so an error map shows what was scored.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage
from torch import nn

from norm_experiments.data.layouts import Case, find_cases
from norm_experiments.data.pipeline import DataBundle, Volume
from norm_experiments.errors import UserError
from norm_experiments.norms import bn_eval_mode, recompute_bn_statistics
from norm_experiments.training import distributed
from norm_experiments.training.evaluate import Inference, case_dice, precise_bn_batches, score_volumes
from norm_experiments.training.signals import phase, stop_point, stop_point_all_ranks

if TYPE_CHECKING:
    from norm_experiments.training.build import Built

log = logging.getLogger("norm_experiments.train")

FOLDER = "predictions"
INDEX = "cases.json"
CORRECT, MISSED, FALSE_POSITIVE, WRONG_CLASS = 0, 1, 2, 3  # values of an error map


@dataclass
class Cases:
    """What writing label maps needs to know about the validation cases and how they were scored: a training
    run's (from_built) or norm-exp-check's."""

    data: DataBundle  # the validation volumes, the dataset's folder and preprocessing
    num_classes: int
    class_names: list[str]  # foreground classes 1..K
    inference: Inference
    patch_size: list[int]
    pad_to_patch: bool


def from_built(built: Built) -> Cases:
    cfg = built.cfg.data
    return Cases(
        built.data,
        built.num_classes,
        built.class_names,
        built.inference,
        list(cfg.patch_size),
        bool(cfg.pad_to_patch),
    )


def mode_models(built: Built) -> Iterator[tuple[str, nn.Module, str]]:
    """(evaluation mode, model, BatchNorm mode to run it in) for every mode the run is scored in.

    PreciseBN statistics are recomputed on a copy over the same patches as evaluate_bn_modes, every rank
    taking part (synchronized layers merge their statistics across ranks). Every rank passes the same
    collective stop points here, before each mode (signals.stop_point_all_ranks)."""
    stop_point_all_ranks()
    yield "running", built.model, "running"
    if not (built.plan.spec.bn_family and built.cfg.trainer.eval_modes):
        return
    stop_point_all_ranks()
    yield "batch", built.model, "batch"
    stop_point_all_ranks()
    precise = copy.deepcopy(built.model)
    with built.autocast(), phase("PreciseBN"):
        recompute_bn_statistics(precise, precise_bn_batches(built), built.device)
    distributed.broadcast_buffers(precise)
    yield "precise", precise, "running"


def write_predictions(built: Built, run_dir: Path) -> Path | None:
    """Write every validation case's label map per mode under run_dir/predictions/; returns that folder
    (None on ranks other than 0, which only help recompute PreciseBN statistics)."""
    folder = run_dir / FOLDER
    log.info("predictions: writing the label maps of %d validation cases to %s", len(built.data.val), folder)
    try:
        with phase("predictions"):
            models = mode_models(built)
            if not distributed.is_main():
                for _ in models:  # every rank takes part in recomputing the PreciseBN statistics
                    pass
                return None
            write_label_maps(from_built(built), models, folder)
    except OSError as err:  # a full disk, a read-only folder, a dataset file gone since training
        raise UserError(f"trainer.save_predictions: could not write {folder}: {err}") from err
    log.info("predictions: %d validation cases written to %s", len(built.data.val), folder)
    return folder


def write_label_maps(cases: Cases, models: Iterable[tuple[str, nn.Module, str]], folder: Path) -> None:
    """Each validation case's label map and error map for every (mode, model, BatchNorm mode), and
    cases.json; raises OSError when a file cannot be written."""
    sources = source_cases(cases)
    index: dict[str, dict] = {
        vol.name: {"image": [str(p) for p in sources[vol.name].images], "label": str(sources[vol.name].label)}
        for vol in cases.data.val
    }
    for mode, model, bn_mode in models:
        write_mode(cases, model, mode, bn_mode, sources, index, folder)
    atomic_write_text(folder / INDEX, json.dumps(index, indent=2) + "\n")


def write_mode(
    cases: Cases,
    model: nn.Module,
    mode: str,
    bn_mode: str,
    sources: dict[str, Case],
    index: dict,
    folder: Path,
) -> None:
    """Every validation case's maps in one evaluation mode, and its Dice per class into `index`. A stop
    request (SIGTERM during a training run) is acted on before each case and each forward."""
    with bn_eval_mode(model, bn_mode), distributed.local_batch_statistics(model):
        for vol in cases.data.val:
            stop_point()
            totals, example = score_volumes(
                model, [vol], cases.num_classes, cases.inference.for_mode(bn_mode)
            )
            assert example is not None  # one volume scored: its (image, label, prediction)
            index[vol.name].setdefault("dice", {})[mode] = case_dice(totals, cases.class_names)
            grid = preprocessed_affine(vol, sources[vol.name], cases)
            write_case(vol, sources[vol.name], grid, example[2], mode, folder / vol.name)


def source_cases(cases: Cases) -> dict[str, Case]:
    """The dataset's own files of each case, by name (the cached volumes keep no file names)."""
    info = cases.data.info
    found, _ = find_cases(info.layout, info.root, labels=dict(info.labels))
    return {case.name: case for case in found}


def write_case(
    vol: Volume, case: Case, grid: np.ndarray, pred: torch.Tensor, mode: str, folder: Path
) -> None:
    """<mode>.nii.gz and <mode>_errors.nii.gz of one case (predicted on the grid with affine `grid`), on
    its image's grid."""
    source = nib.load(str(case.images[0]))
    shape = tuple(int(s) for s in source.shape[:3])
    predicted = to_source_grid(pred, grid, source.affine, shape)
    truth = to_source_grid(vol.label[0].cpu(), grid, source.affine, shape)
    folder.mkdir(parents=True, exist_ok=True)
    save_label_map(predicted, source, folder / f"{mode}.nii.gz")
    stop_point()  # each map of a large image is seconds of resampling and compression
    save_label_map(error_map(predicted, truth), source, folder / f"{mode}_errors.nii.gz")


def preprocessed_affine(vol: Volume, case: Case, cases: Cases) -> np.ndarray:
    """The voxel-to-world affine of the grid the network saw (MONAI updates it through every transform)."""
    affine = getattr(vol.item["label"], "affine", None)
    if affine is None:  # data.cache_on_device replaced the MetaTensor by a plain tensor on the GPU
        affine = regridded_label(case, cases).affine
    return np.asarray(torch.as_tensor(affine).cpu(), dtype=np.float64)


def regridded_label(case: Case, cases: Cases):
    """The case's label through the pipeline's geometric steps (data/pipeline.py deterministic_transforms:
    RAS, target spacing, padding to the patch), as a MetaTensor that carries the resulting affine."""
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation, Spacing, SpatialPad

    steps = [LoadImage(image_only=True), EnsureChannelFirst(), Orientation(axcodes="RAS")]
    target = cases.data.preprocessing.get("target_spacing")
    if target:
        steps.append(Spacing(pixdim=target, mode="nearest"))
    if cases.pad_to_patch:
        steps.append(SpatialPad(spatial_size=cases.patch_size))
    return Compose(steps)(str(case.label))


def to_source_grid(
    labels: torch.Tensor, grid: np.ndarray, source_affine: np.ndarray, shape: tuple[int, ...]
) -> np.ndarray:
    """A (D, H, W) class map on the grid with affine `grid`, resampled (nearest neighbour) onto the source
    grid (`source_affine`, `shape`); voxels outside the preprocessed grid get 0."""
    to_grid = np.linalg.inv(grid) @ np.asarray(source_affine, dtype=np.float64)  # source voxel -> grid voxel
    values = labels.cpu().numpy().astype(np.uint8)
    # grid-constant: a source voxel that lands a rounding error outside the grid's first or last row (an oblique
    # affine: -1e-13) takes that row's value; "constant" gave it 0 and blanked a whole face of the map.
    return ndimage.affine_transform(
        values,
        to_grid[:3, :3],
        offset=to_grid[:3, 3],
        output_shape=shape,
        order=0,
        mode="grid-constant",
        cval=0,
    )


def error_map(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    errors = np.full(truth.shape, CORRECT, dtype=np.uint8)
    errors[(truth > 0) & (predicted == 0)] = MISSED
    errors[(truth == 0) & (predicted > 0)] = FALSE_POSITIVE
    errors[(truth > 0) & (predicted > 0) & (truth != predicted)] = WRONG_CLASS
    return errors


def save_label_map(values: np.ndarray, source: nib.spatialimages.SpatialImage, path: Path) -> None:
    """`values` as a uint8 NIfTI with the source image's affine and header (3D, no intensity scaling,
    intent "label"), written under a temporary name first so that no half-written file is left."""
    header = nib.Nifti1Header.from_header(source.header)
    header.set_data_dtype(np.uint8)
    image = nib.Nifti1Image(values.astype(np.uint8), source.affine, header=header)
    image.header.set_slope_inter(1.0, 0.0)
    image.header.set_intent("label")
    temporary = path.with_name(f".{path.name}.tmp.nii.gz")
    nib.save(image, str(temporary))
    os.replace(temporary, path)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
