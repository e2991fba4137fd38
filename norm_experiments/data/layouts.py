"""Finding the training cases of a dataset on disk, and splitting them into training and validation.

The layouts on disk are the records of the layout registry (data/registry.py, one plug-in module each in
data/plugins/); their finders are here. The built-in ones:

- "msd" (Medical Segmentation Decathlon): dataset.json with a "training" list of
  {"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"} (an "image" may also be a list of
  per-channel files), "labels" {"0": "background", ...} and "modality" {"0": "MRI", ...} (the channel
  count; if "modality" is missing it is read from the first image: 4D = channels last). Paths are relative
  to data.root. Files in imagesTr/ that the list does not name (e.g. macOS "._x.nii.gz") are ignored.
- "nnunet" (nnU-Net v2 raw): imagesTr/CASE_0000<file_ending>, _0001 ... one file per channel,
  labelsTr/CASE<file_ending>, dataset.json with "channel_names" (or the older "modality"), "labels"
  {"background": 0, ...} and "file_ending". Region-based labels and the optional "dataset" file list of
  nnU-Net are not supported.
- "folder": images/CASE.nii.gz and labels/CASE.nii.gz (or .nii), matched by file name, no dataset.json.
  The classes come from the `labels` argument (the data.labels config key: a mapping {0: "background",
  1: "tumor"} or a list ["background", "tumor"]); by default {0: "background", 1: "foreground"}. The channel
  count is read from the first image (3D = 1 channel, 4D = channels last).

For "msd" and "nnunet" the classes come from dataset.json; a `labels` argument that disagrees with it is an
error (naming data.labels) rather than being silently ignored.

Case names are file names without the extension (for "nnunet" without the _XXXX channel suffix too). Classes
must be the consecutive integers 0..K-1, with 0 the background.

Symlinks in the dataset folder are followed (data linked in is the user's doing; norm-exp-fetch refuses
archives with links); a path written in dataset.json must lie inside the folder as written, and a link that
loops or leads nowhere is refused by name.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib

from norm_experiments import safe_io
from norm_experiments.data import registry as layouts_registry
from norm_experiments.errors import UserError
from norm_experiments.plugins import resolve

NIFTI_ENDINGS = (".nii.gz", ".nii")
DEFAULT_LABELS = {0: "background", 1: "foreground"}


@dataclass(frozen=True)
class Case:
    name: str
    images: tuple[Path, ...]  # one file per input channel, or one 3D/4D (channels last) file
    label: Path


@dataclass(frozen=True)
class DatasetInfo:
    root: Path
    layout: str
    num_channels: int  # input channels
    labels: dict[int, str]  # every class including 0: background
    # per channel, as dataset.json declares it ("modality" / "channel_names"); None where nothing says
    modalities: tuple[str, ...] | None = None


# Within full_paths(): messages name files by their full path (a dataset in a cache folder the user never
# typed, whose name a relative path would not tell).
_FULL_PATHS: contextvars.ContextVar[bool] = contextvars.ContextVar("full_paths", default=False)


def shown(path: Path, root: Path) -> str:
    """A path as error messages show it: relative to the dataset root when it lies inside (the full path
    within full_paths())."""
    if _FULL_PATHS.get():
        return os.path.abspath(path)
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


@contextlib.contextmanager
def full_paths() -> Iterator[None]:
    """Messages name files by their full path in this block."""
    token = _FULL_PATHS.set(True)
    try:
        yield
    finally:
        _FULL_PATHS.reset(token)


# ---------------------------------------------------------------------------------------------------------
# Public entry point


def find_cases(layout: str, root: Path, *, labels: dict | None = None) -> tuple[list[Case], DatasetInfo]:
    """The training cases of the dataset at `root` (sorted by name) and what the dataset declares.

    Raises UserError naming data.root, data.layout, data.labels, dataset.json and its key, or the file, for
    every problem that is the user's to fix.
    """
    found = layouts_registry.on_disk()
    if layout not in found:
        raise UserError(f"data.layout={layout!r} is not one of {', '.join(found)}")
    root = Path(root).expanduser()
    problem = link_problem(root)
    if problem:
        raise UserError(f"data.root={root}: {problem}")
    if not root.exists():
        raise UserError(f"data.root={root}: directory does not exist")
    if not root.is_dir():
        raise UserError(f"data.root={root}: is not a directory")
    finder = resolve(layouts_registry.get(layout).find)
    cases, info = finder(root, labels)
    if not cases:
        raise UserError(f"data.root={root}: no training cases found in {_where(layout, root)}")
    _check_unique(cases, root)
    return sorted(cases, key=lambda c: c.name), info


def _where(layout: str, root: Path) -> str:
    if layout == "msd":
        return f"{root / 'dataset.json'} ('training' list)"
    return str(root / ("imagesTr" if layout == "nnunet" else "images"))


def _check_unique(cases: list[Case], root: Path) -> None:
    seen: dict[str, Case] = {}
    for case in cases:
        if case.name in seen:
            a, b = shown(seen[case.name].label, root), shown(case.label, root)
            raise UserError(f"data.root={root}: duplicate case name '{case.name}' ({a} and {b})")
        seen[case.name] = case


# ---------------------------------------------------------------------------------------------------------
# dataset.json and labels


def read_dataset_json(root: Path, required: Sequence[str], layout: str) -> dict:
    path = root / "dataset.json"
    if not path.is_file():
        raise UserError(f"{path}: not found (data.root must contain the dataset's dataset.json)")
    try:
        content = safe_io.load_json(path)  # bounded: size, nesting depth, digits of a number
    except json.JSONDecodeError as err:
        raise UserError(
            f"{path}: invalid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
        ) from None
    except safe_io.UnsafeFile as err:
        raise UserError(str(err)) from None
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({safe_io.os_reason(err)})") from None
    if not isinstance(content, dict):
        raise UserError(f"{path}: expected a JSON object at the top level")
    for key in required:
        if key not in content:
            raise UserError(f"{path}: missing key '{key}'{_layout_hint(content, layout)}")
    return content


def _layout_hint(content: dict, layout: str) -> str:
    """A likely cause of a missing key: the dataset is in the other layout than `layout`, the one read."""
    if "training" in content and "file_ending" not in content and layout != "msd":
        return " (it has a 'training' list: an MSD dataset? use data.layout=msd)"
    if "file_ending" in content and "training" not in content and layout != "nnunet":
        return " (it has 'file_ending': an nnU-Net dataset? use data.layout=nnunet)"
    return ""


def _labels_from_msd(raw: object, where: str) -> dict[int, str]:
    """MSD style {"0": "background", "1": "x"}: class value -> name."""
    if not isinstance(raw, Mapping):
        raise UserError(f'{where}: \'labels\' must be a mapping like {{"0": "background", "1": "x"}}')
    out = {}
    for key, name in raw.items():
        try:
            out[int(key)] = str(name)
        except (TypeError, ValueError):
            raise UserError(f"{where}: 'labels' key {key!r} is not an integer class value") from None
    return _consecutive(out, where)


def _labels_from_nnunet(raw: object, where: str) -> dict[int, str]:
    """nnU-Net style {"background": 0, "x": 1}: name -> class value."""
    if not isinstance(raw, Mapping):
        raise UserError(f'{where}: \'labels\' must be a mapping like {{"background": 0, "x": 1}}')
    out = {}
    for name, value in raw.items():
        if isinstance(value, list):
            raise UserError(
                f"{where}: 'labels' entry {name!r} is a region (a list); regions are not supported"
            )
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: 'labels' value of {name!r} must be an integer, got {value!r}")
        if value in out:
            raise UserError(f"{where}: 'labels' gives the value {value} to {out[value]!r} and to {name!r}")
        out[value] = str(name)
    if "background" in raw and raw["background"] != 0:
        raise UserError(f"{where}: 'labels' gives background the value {raw['background']!r}; nnU-Net's is 0")
    return _consecutive(out, where)


def _labels_from_config(raw: object) -> dict[int, str]:
    """data.labels: {0: "background", 1: "x"} (keys may be strings) or ["background", "x"]."""
    if isinstance(raw, Mapping):
        return _labels_from_msd(raw, "data.labels")
    if isinstance(raw, Sequence) and not isinstance(raw, str):
        return _consecutive({i: str(n) for i, n in enumerate(raw)}, "data.labels")
    raise UserError(f"data.labels={raw!r}: expected a mapping {{0: background, 1: name}} or a list of names")


def _consecutive(labels: dict[int, str], where: str) -> dict[int, str]:
    """Classes must be 0..K-1 (a one-hot loss needs that), with at least one foreground class."""
    values = sorted(labels)
    if values != list(range(len(values))) or len(values) < 2:
        raise UserError(f"{where}: 'labels' must be the consecutive classes 0..K-1 with K >= 2, got {values}")
    first: dict[str, int] = {}
    for value in values:  # per-class scores are recorded by name: two classes of one name would merge
        twice = first.setdefault(labels[value], value)
        if twice != value:
            raise UserError(
                f"{where}: 'labels' names classes {twice} and {value} both {labels[value]!r}; each class needs "
                "its own name"
            )
    return {v: labels[v] for v in values}


def _agree(declared: dict[int, str], given: dict | None, path: Path) -> None:
    if given is not None and _labels_from_config(given) != declared:
        raise UserError(
            f"data.labels={given} disagrees with {path} 'labels' {declared}; leave data.labels unset "
            "for this layout"
        )


def _modalities_from(raw: object, where: str, key: str) -> tuple[str, ...]:
    """{"0": "CT", "1": "T2"} -> ("CT", "T2"): one name per input channel, in channel order."""
    if not isinstance(raw, Mapping) or not raw:
        raise UserError(f'{where}: \'{key}\' must be a non-empty mapping like {{"0": "MRI"}}')
    keys = sorted(raw, key=str)
    if sorted(str(k) for k in raw) != sorted(str(i) for i in range(len(raw))):
        raise UserError(f'{where}: \'{key}\' keys must be "0".."{len(raw) - 1}", got {keys}')
    by_index = {int(k): str(v) for k, v in raw.items()}
    return tuple(by_index[i] for i in range(len(raw)))


def channels_in_file(path: Path, root: Path) -> int:
    """Channels of a NIfTI file from its header: 3D = 1, 4D = the 4th dimension (NIfTI puts channels last)."""
    try:
        shape = nib.load(str(path)).shape
    except Exception as err:  # noqa: BLE001 - any reader failure is a bad file, reported by name
        raise UserError(f"{shown(path, root)}: not a readable NIfTI file ({err})") from None
    return int(shape[3]) if len(shape) == 4 else 1


# ---------------------------------------------------------------------------------------------------------
# The built-in layouts on disk (their records: data/plugins/)


def _strip_ending(name: str, endings: Sequence[str]) -> str | None:
    for ending in endings:
        if name.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)]
    return None


def _entry_path(root: Path, entry: object, where: str, index: int, key: str) -> Path:
    if not isinstance(entry, str) or not entry:
        raise UserError(f"{where}: 'training'[{index}]['{key}'] must be a file path, got {entry!r}")
    path = Path(os.path.normpath(root / entry))
    # A dataset.json may come with a download: the paths it writes must lie inside the dataset folder
    # ("../x" and "/etc/x" are refused), or training would read files from anywhere on the machine. The
    # check is on the path as written: a file there that is a symlink (data linked in, a common way to
    # assemble a dataset) is followed, as the user made it (norm-exp-fetch refuses archives with links).
    if not Path(os.path.abspath(path)).is_relative_to(os.path.abspath(root)):
        raise UserError(
            f"{where}: 'training'[{index}]['{key}'] = {entry!r} lies outside the dataset folder "
            f"{os.path.abspath(root)}; refused"
        )
    problem = link_problem(path)
    if problem:
        raise UserError(f"{shown(path, root)}: {problem} (listed in {where} 'training'[{index}])")
    if not path.is_file():
        raise UserError(f"{shown(path, root)}: file not found (listed in {where} 'training'[{index}])")
    return path


def link_problem(path: Path) -> str | None:
    """Why a symlink cannot be followed (a loop, or a target that is missing), or None: not a symlink, or one
    that leads to something. Messages name the link and where it points."""
    if not path.is_symlink():
        return None
    try:
        os.stat(path)
    except OSError as err:
        target = os.readlink(path)
        if err.errno == errno.ELOOP:
            return f"a symlink loop (it points to {target}, and following the links never reaches a file)"
        if err.errno == errno.ENOENT:
            return f"a broken symlink (it points to {target}, which does not exist)"
        return f"a symlink that cannot be followed (to {target}: {safe_io.os_reason(err)})"
    return None


def _find_msd(root: Path, labels: dict | None) -> tuple[list[Case], DatasetInfo]:
    path = root / "dataset.json"
    meta = read_dataset_json(root, ["training", "labels"], "msd")
    declared = _labels_from_msd(meta["labels"], str(path))
    _agree(declared, labels, path)
    training = meta["training"]
    if not isinstance(training, list):
        raise UserError(f'{path}: \'training\' must be a list of {{"image": ..., "label": ...}}')
    cases = []
    for i, entry in enumerate(training):
        if not isinstance(entry, Mapping) or "image" not in entry or "label" not in entry:
            raise UserError(f"{path}: 'training'[{i}] must have 'image' and 'label', got {entry!r}")
        raw_images = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
        images = tuple(_entry_path(root, p, str(path), i, "image") for p in raw_images)
        label = _entry_path(root, entry["label"], str(path), i, "label")
        name = _strip_ending(label.name, NIFTI_ENDINGS) or label.name
        cases.append(Case(name=name, images=images, label=label))
    modalities = None
    if "modality" in meta:
        modalities = _modalities_from(meta["modality"], str(path), "modality")
        channels = len(modalities)
    elif cases:
        first = cases[0].images
        channels = len(first) if len(first) > 1 else channels_in_file(first[0], root)
    else:
        channels = 1
    info = DatasetInfo(root=root, layout="msd", num_channels=channels, labels=declared, modalities=modalities)
    return cases, info


_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _visible_files(folder: Path, root: Path) -> list[Path]:
    """Plain files (symlinks followed), skipping hidden ones (macOS "._x.nii.gz" copies, editor files). A
    NIfTI-named symlink that cannot be followed (a loop, a missing target) is refused by name: skipping it
    would report its case as incomplete, or silently train without it."""
    files = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file():
            files.append(p)
        elif p.name.endswith(NIFTI_ENDINGS) and (problem := link_problem(p)):
            raise UserError(f"{shown(p, root)}: {problem}")
        elif p.name.endswith(NIFTI_ENDINGS) and p.exists():  # a folder, a FIFO, a device under a NIfTI name
            raise UserError(f"{shown(p, root)}: {safe_io.kind_of(p)}, not a NIfTI file")
    return files


def _require_dir(folder: Path, root: Path, layout: str) -> None:
    problem = link_problem(folder)
    if problem:
        raise UserError(f"data.root={root}: {folder.name}/ is {problem}")
    if not folder.is_dir():
        raise UserError(f"data.root={root}: missing folder {folder.name}/ (expected by data.layout={layout})")


def _find_nnunet(root: Path, labels: dict | None) -> tuple[list[Case], DatasetInfo]:
    path = root / "dataset.json"
    meta = read_dataset_json(root, ["labels", "file_ending"], "nnunet")
    channel_key = "channel_names" if "channel_names" in meta else "modality"
    if channel_key not in meta:
        raise UserError(f"{path}: missing key 'channel_names'{_layout_hint(meta, 'nnunet')}")
    modalities = _modalities_from(meta[channel_key], str(path), channel_key)
    channels = len(modalities)
    declared = _labels_from_nnunet(meta["labels"], str(path))
    _agree(declared, labels, path)
    ending = meta["file_ending"]
    if ending not in NIFTI_ENDINGS:
        raise UserError(f"{path}: 'file_ending' {ending!r} is not supported (NIfTI only: .nii.gz or .nii)")
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    _require_dir(images_dir, root, "nnunet")
    _require_dir(labels_dir, root, "nnunet")

    by_case: dict[str, dict[int, Path]] = {}
    for file in _visible_files(images_dir, root):
        stem = _strip_ending(file.name, [ending])
        match = _CHANNEL_SUFFIX.match(stem) if stem else None
        if match is None:
            continue  # not an image of this dataset (other ending, stray file)
        by_case.setdefault(match["case"], {})[int(match["channel"])] = file
    if not by_case:
        other = sorted(
            {e for f in _visible_files(images_dir, root) for e in NIFTI_ENDINGS if f.name.endswith(e)}
        )
        if other and ending not in other:  # e.g. "file_ending": ".nii" over .nii.gz files
            raise UserError(
                f"{path}: 'file_ending' is {ending!r}, but the images in imagesTr/ end in {', '.join(other)}"
            )

    cases = []
    for name, files in sorted(by_case.items()):
        for ch in sorted(files):
            if ch >= channels:
                raise UserError(
                    f"{shown(files[ch], root)}: channel {ch} but {path} '{channel_key}' declares {channels}"
                )
        for ch in range(channels):
            if ch not in files:
                raise UserError(
                    f"imagesTr/{name}_{ch:04d}{ending}: file not found (channel {ch} of '{name}')"
                )
        label = labels_dir / f"{name}{ending}"
        if not label.is_file():
            raise UserError(
                f"{shown(label, root)}: label file not found (images of '{name}' are in imagesTr/)"
            )
        cases.append(Case(name=name, images=tuple(files[ch] for ch in range(channels)), label=label))
    for file in _visible_files(labels_dir, root):
        stem = _strip_ending(file.name, [ending])
        if stem and stem not in by_case:
            raise UserError(f"{shown(file, root)}: label without images (no imagesTr/{stem}_0000{ending})")
    _check_num_training(meta, path, len(cases))
    info = DatasetInfo(
        root=root, layout="nnunet", num_channels=channels, labels=declared, modalities=modalities
    )
    return cases, info


def _check_num_training(meta: dict, path: Path, found: int) -> None:
    """nnU-Net refuses a dataset whose numTraining disagrees with the files; so do we, with the numbers."""
    declared = meta.get("numTraining")
    if found and declared is not None and declared != found:
        raise UserError(f"{path}: 'numTraining' is {declared} but imagesTr/ and labelsTr/ hold {found} cases")


def _find_folder(root: Path, labels: dict | None) -> tuple[list[Case], DatasetInfo]:
    declared = _labels_from_config(labels) if labels is not None else dict(DEFAULT_LABELS)
    images_dir, labels_dir = root / "images", root / "labels"
    _require_dir(images_dir, root, "folder")
    _require_dir(labels_dir, root, "folder")
    images = _by_name(images_dir, root)
    label_files = _by_name(labels_dir, root)
    for name, file in images.items():
        if name not in label_files:
            raise UserError(
                f"{shown(file, root)}: no matching label file in labels/ (expected labels/{file.name})"
            )
    for name, file in label_files.items():
        if name not in images:
            raise UserError(
                f"{shown(file, root)}: no matching image file in images/ (expected images/{file.name})"
            )
    cases = [Case(name=n, images=(images[n],), label=label_files[n]) for n in sorted(images)]
    channels = channels_in_file(cases[0].images[0], root) if cases else 1
    return cases, DatasetInfo(root=root, layout="folder", num_channels=channels, labels=declared)


def _by_name(folder: Path, root: Path) -> dict[str, Path]:
    """NIfTI files of a folder by case name; x.nii and x.nii.gz side by side is a duplicate."""
    out: dict[str, Path] = {}
    for file in _visible_files(folder, root):
        name = _strip_ending(file.name, NIFTI_ENDINGS)
        if name is None:
            continue
        if name in out:
            a, b = shown(out[name], root), shown(file, root)
            raise UserError(f"data.root={root}: duplicate case name '{name}' ({a} and {b})")
        out[name] = file
    return out


# ---------------------------------------------------------------------------------------------------------
# Train/validation split


def split_cases(
    cases: list[Case], val_fraction: float, seed: int, val_cases: list[str] | None = None
) -> tuple[list[Case], list[Case]]:
    """(train, validation), each sorted by name.

    With val_cases (case names) those are the validation set and val_fraction is not used. Otherwise
    round(val_fraction * N) cases go to validation, chosen by a hash of (seed, name): the split depends only
    on the case names, the fraction and the seed, never on the order of `cases`, and adding one case moves
    at most one other case between the sets. An empty val_cases list counts as not given.
    """
    by_name = {c.name: c for c in cases}
    if val_cases:
        unknown = sorted(set(val_cases) - set(by_name))
        if unknown:
            examples = ", ".join(sorted(by_name)[:5])
            raise UserError(f"data.val_cases: unknown case names {unknown} (cases include {examples})")
        val_names = set(val_cases)
        if len(val_names) == len(by_name):
            raise UserError("data.val_cases: names every case, which leaves no training cases")
    else:
        val_names = _val_by_fraction(sorted(by_name), val_fraction, seed)
    train = [by_name[n] for n in sorted(by_name) if n not in val_names]
    val = [by_name[n] for n in sorted(val_names)]
    return train, val


def _val_by_fraction(names: list[str], val_fraction: float, seed: int) -> set[str]:
    if not 0 < val_fraction < 1:
        raise UserError(f"data.val_fraction={val_fraction}: must be between 0 and 1 (exclusive)")
    n_val = math.floor(val_fraction * len(names) + 0.5)
    if n_val == 0:
        raise UserError(
            f"data.val_fraction={val_fraction} of {len(names)} cases gives an empty validation split; "
            "raise data.val_fraction or name cases in data.val_cases"
        )
    if n_val == len(names):
        raise UserError(
            f"data.val_fraction={val_fraction} of {len(names)} cases gives an empty training split; "
            "lower data.val_fraction"
        )
    ranked = sorted(names, key=lambda n: hashlib.sha256(f"{seed}:{n}".encode()).hexdigest())
    return set(ranked[:n_val])
