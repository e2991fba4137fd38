"""Datasets the project generates itself (synthetic ellipsoids, brain anatomy from the MNI152 template), written
as real NIfTI files in a dataset layout, atomically, and cached by their parameters.

A generator is any object with the `Generator` interface below; this module knows nothing about what it draws.
Files are written into a hidden temporary folder beside the target and renamed into place at the end, so an
interrupted or failed generation never leaves a half dataset where a dataset is expected, and two processes
that generate the same dataset at once both end with the same complete folder. A failed generation removes its
folder; one killed outright leaves it, and the next generation beside it removes it (data/workdirs.py).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import nibabel as nib
import numpy as np

from norm_experiments import run_record
from norm_experiments.data import registry as layouts_registry
from norm_experiments.data.workdirs import make_work_folder, remove_abandoned
from norm_experiments.errors import UserError
from norm_experiments.plugins import resolve


def __getattr__(name: str) -> tuple[str, ...]:
    """LAYOUTS: the layouts a generated dataset can be written in, read from the layout registry when asked."""
    if name == "LAYOUTS":
        return layouts_registry.writable()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class GeneratedCase:
    name: str
    image: np.ndarray  # float32 (D, H, W)
    label: np.ndarray  # uint8 (D, H, W), values 0..K
    affine: np.ndarray  # 4x4 voxel -> world (mm)
    params: dict[str, Any]  # what was drawn for this case (recorded in the metadata)


class Generator(Protocol):
    """What generate_dataset and ensure_generated need from a dataset's parameters."""

    kind: str  # folder prefix in the cache ("synthetic", "brain") and the dataset's name stem
    num_cases: int

    def key(self) -> str: ...  # short stable hash of every parameter: the cache folder's suffix

    def make(self, index: int) -> GeneratedCase: ...  # a pure function of (parameters, index)

    def labels(self) -> dict[int, str]: ...

    def modality(self) -> str: ...  # "MRI", "CT", ...: what data.intensity=auto decides by

    def provenance(self, cases: list[dict]) -> dict: ...  # recorded in the metadata: parameters, source


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    # Code 1 ("scanner") on both forms: every reader (nibabel, ITK, MONAI) then agrees on the geometry.
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.set_data_dtype(array.dtype)
    nib.save(img, str(path))


def case_paths(layout: str, name: str) -> tuple[str, str]:
    """(image, label) paths of a case relative to the dataset root (the layout's record says)."""
    return resolve(layouts_registry.get(layout).case_files)(name)


def metadata(gen: Generator, layout: str, cases: list[dict]) -> tuple[str, dict]:
    """(file name, content) of the JSON file written last: dataset.json, or <kind>.json for "folder"."""
    return resolve(layouts_registry.get(layout).metadata)(gen, cases)


def _write_into(folder: Path, gen: Generator, layout: str) -> None:
    """Write every case, then the JSON metadata last."""
    for sub in {p.split("/")[0] for p in case_paths(layout, "x")}:
        (folder / sub).mkdir()
    cases = []
    for i in range(gen.num_cases):
        case = gen.make(i)
        image_rel, label_rel = case_paths(layout, case.name)
        save_nifti(case.image, case.affine, folder / image_rel)
        save_nifti(case.label, case.affine, folder / label_rel)
        cases.append({"name": case.name, **case.params})
    filename, content = metadata(gen, layout, cases)
    (folder / filename).write_text(json.dumps(content, indent=2) + "\n")


def _generate_temp(parent: Path, prefix: str, gen: Generator, layout: str, any_name: bool = False) -> Path:
    """Generate into a fresh hidden folder in `parent`; on any error (a full disk, SIGTERM, Ctrl-C) nothing
    is left behind, and the folders of generators killed outright are removed first (workdirs.py: those of
    `prefix`, or in a cache folder with any_name, of any dataset)."""
    tmp = make_work_folder(parent, prefix, any_name=any_name)
    try:
        os.chmod(tmp, 0o777 & ~run_record.current_umask())  # mkdtemp's 0700 would stay the dataset's mode
        _write_into(tmp, gen, layout)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def out_dir_argument(text: str) -> Path:
    """OUT_DIR of norm-exp-synth and norm-exp-brain (an argparse type). A bare `key=value` is refused: it is an
    override typed as norm-exp-train takes them (`cases=10`), which would otherwise become a folder of that
    name; `./key=value` still names such a folder."""
    key = text.split("=", 1)[0]
    if "=" in text and "/" not in text and key.replace(".", "_").replace("-", "_").isidentifier():
        raise argparse.ArgumentTypeError(
            f"{text!r} looks like a key=value override: this command takes --options and a folder to write "
            f"(./{text} writes into a folder of that name)"
        )
    return Path(text)


def generate_dataset(out_dir: Path, gen: Generator, layout: str = "msd") -> Path:
    """Write a generated dataset at out_dir in the given layout ("msd", "nnunet" or "folder").

    The files are written into a temporary folder beside out_dir and renamed into place at the end, so an
    interrupted run never leaves a half dataset at out_dir. Refuses an existing non-empty out_dir.
    """
    # By its absolute name: "." has neither a parent to write beside nor a name to move into.
    out_dir = Path(os.path.abspath(Path(out_dir).expanduser()))
    if layout not in layouts_registry.writable():
        raise UserError(f"layout '{layout}' is not one of {', '.join(layouts_registry.writable())}")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory")
    if _is_nonempty_dir(out_dir):
        raise UserError(f"{out_dir}: already exists and is not empty; choose a new directory or remove it")
    try:
        tmp = _generate_temp(out_dir.parent, out_dir.name, gen, layout)
    except OSError as err:  # an unwritable or full parent folder
        raise UserError(f"{out_dir}: cannot write the dataset there ({err.strerror or err})") from None
    try:
        if out_dir.is_dir():  # the user's empty folder (perhaps their shell's own): filled, not replaced
            _move_contents(tmp, out_dir)
        else:
            os.rename(tmp, out_dir)  # atomic: a folder with dataset.json is complete
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(
            f"{out_dir}: could not move the generated dataset into place ({err.strerror})"
        ) from None
    return out_dir


def _move_contents(tmp: Path, out_dir: Path) -> None:
    """Every entry of tmp into out_dir, dataset.json last (its presence says the dataset is complete); a folder
    renamed over would leave a shell in out_dir in a deleted folder, seeing nothing."""
    entries = sorted(tmp.iterdir(), key=lambda path: path.name == "dataset.json")
    for entry in entries:
        if (out_dir / entry.name).exists():  # filled up meanwhile
            raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), str(out_dir / entry.name))
        os.rename(entry, out_dir / entry.name)
    tmp.rmdir()


def ensure_generated(cache_root: Path, gen: Generator) -> Path:
    """cache_root/<kind>-<key> in msd layout, generated on first use and reused afterwards.

    Safe for concurrent callers: each generates into its own temporary folder and renames it into place;
    a caller whose rename loses the race discards its copy and uses the winner's (identical) one. The
    rename is atomic, so a folder with dataset.json is always complete.
    """
    cache_root = Path(cache_root).expanduser()
    target = cache_root / f"{gen.kind}-{gen.key()}"
    if cache_root.is_dir():  # every start: what generators killed outright left (any dataset of the cache)
        remove_abandoned(cache_root, None)
    if (target / "dataset.json").is_file():
        return target
    if _is_nonempty_dir(target):
        raise UserError(f"{target}: incomplete {gen.kind} dataset (no dataset.json); remove the folder")
    try:
        tmp = _generate_temp(cache_root, target.name, gen, "msd", any_name=True)
    except OSError as err:  # a read-only home, a cache folder that is a file, a full disk
        raise UserError(
            f"{cache_root}: cannot write the {gen.kind} dataset there ({err.strerror or err}); set "
            "data.cache_dir (or the NORM_EXP_CACHE environment variable) to a writable folder"
        ) from None
    try:
        os.rename(tmp, target)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        lost_race = err.errno in (errno.ENOTEMPTY, errno.EEXIST) and (target / "dataset.json").is_file()
        if not lost_race:
            raise UserError(
                f"{target}: could not move the generated dataset into place ({err.strerror})"
            ) from None
    return target
