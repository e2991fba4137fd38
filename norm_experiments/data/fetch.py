"""`norm-exp-fetch msd TASK`: download a Medical Segmentation Decathlon task into the dataset cache.

    norm-exp-fetch msd Task04_Hippocampus                      # then: norm-exp-train data=msd_hippocampus
    norm-exp-fetch msd Task09_Spleen --url https://mirror.example.org/Task09_Spleen.tar
    norm-exp-fetch msd Task04_Hippocampus --url ~/Downloads/Task04_Hippocampus.tar   # a local copy

The archive URLs and their published MD5 sums are MONAI's (monai.apps.DecathlonDataset.resource / .md5);
the download and the checksum are MONAI's too (monai.apps.download_url). The task lands in
CACHE/msd/TASK, CACHE being ${NORM_EXP_CACHE:-~/.cache/norm-experiments} or --cache-dir, where the
presets (data=msd_hippocampus, data=msd_spleen) look for it. Nothing is ever downloaded by a training run.

Nothing that looks like a dataset is left by a failure: the archive is downloaded and extracted inside a
hidden work folder beside the target (.TASK.tmp-HOST-PID-*), every member is checked before anything is
extracted (no absolute paths, no "..", no links), the extracted dataset.json and the files it lists are
checked, and only then is the dataset renamed into place (one atomic rename). A failed or interrupted fetch
removes its work folder (a killed one's is removed by the next fetch); running the command again starts
the download afresh. A task already in place is not fetched again.
"""

from __future__ import annotations

import argparse
import http.client
import logging
import os
import shutil
import socket
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError, URLError
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from omegaconf import OmegaConf

from norm_experiments.config import CONFIG_DIR
from norm_experiments.data.layouts import find_cases
from norm_experiments.errors import UserError, exit_on_user_error

log = logging.getLogger(__name__)


def msd_tasks() -> dict[str, tuple[str, str]]:
    """Task name -> (archive URL, published MD5), as MONAI keeps them."""
    from monai.apps import DecathlonDataset

    return {task: (url, DecathlonDataset.md5[task]) for task, url in DecathlonDataset.resource.items()}


def default_cache_root() -> Path:
    """The cache root the data configs use: ${NORM_EXP_CACHE:-$HOME/.cache/norm-experiments}."""
    return Path(os.environ.get("NORM_EXP_CACHE") or Path.home() / ".cache" / "norm-experiments")


@dataclass(frozen=True)
class Fetched:
    path: Path  # the dataset folder (holds dataset.json)
    cases: int  # training cases listed in dataset.json
    already: bool  # it was there before this call


# ---------------------------------------------------------------------------------------------------------
# Fetching


def fetch_msd(task: str, cache_root: Path, source: str | None = None, md5: str | None = None) -> Fetched:
    """Put MSD `task` at cache_root/msd/task, from `source` (URL or local archive; default: MONAI's URL),
    checked against `md5` (default: the published MD5). Raises UserError with one line for every failure."""
    tasks = msd_tasks()
    if task not in tasks:
        raise UserError(f"unknown MSD task {task!r}; choose one of {', '.join(tasks)}")
    url, published_md5 = tasks[task]
    target = cache_root.expanduser() / "msd" / task
    if (target / "dataset.json").is_file():
        return Fetched(target, _count_cases(target), already=True)
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise UserError(
            f"{target}: exists but holds no dataset.json (not a fetched task); remove it and run again"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_work(target)
    work = Path(tempfile.mkdtemp(prefix=f"{_work_prefix(target)}{os.getpid()}-", dir=target.parent))
    try:
        archive = _obtain(source or url, md5 or published_md5, work)
        dataset = _extract(archive, work / "extract", task)
        cases = _check_dataset(dataset, task)
        try:
            os.rename(dataset, target)  # atomic: target is either absent/empty or a complete dataset
        except OSError as err:
            if (target / "dataset.json").is_file():  # another fetch of the same task finished first
                return Fetched(target, _count_cases(target), already=True)
            raise UserError(f"{target}: could not move the dataset into place ({err.strerror})") from None
        return Fetched(target, cases, already=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _count_cases(root: Path) -> int:
    return len(find_cases("msd", root)[0])


def _work_prefix(target: Path) -> str:
    return f".{target.name}.tmp-{socket.gethostname()}-"


def _remove_abandoned_work(target: Path) -> None:
    """Remove work folders of fetches on this host whose process is gone (killed before cleaning up)."""
    prefix = _work_prefix(target)
    for folder in target.parent.glob(f"{prefix}*"):
        pid = folder.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _local_path(source: str) -> Path | None:
    """The file a source names when it is a local path or a file:// URL; None for a network URL."""
    parsed = urlparse(source)
    if parsed.scheme == "file":
        return Path(url2pathname(unquote(parsed.path)))
    if not parsed.scheme or len(parsed.scheme) == 1:  # a plain path (or one with a Windows drive letter)
        return Path(source).expanduser()
    return None


def _obtain(source: str, md5: str, work: Path) -> Path:
    """The archive, downloaded into `work` (or a local file, used in place), with its MD5 checked."""
    from monai.apps.utils import HashCheckError, check_hash, download_url

    logging.getLogger("monai.apps").setLevel(logging.CRITICAL)  # our own lines say what happens
    local = _local_path(source)
    if local is not None:
        if not local.is_file():
            raise UserError(f"{local}: archive not found")
        print(f"checking the MD5 of {local}", flush=True)
        if not check_hash(local, md5, "md5"):
            raise UserError(_md5_message(str(local), md5))
        return local
    archive = work / (PurePosixPath(urlparse(source).path).name or "archive")
    print(f"downloading {source} (MD5 {md5}) ...", flush=True)
    try:
        download_url(source, archive, hash_val=md5, hash_type="md5", progress=False)
    except HashCheckError:
        raise UserError(_md5_message(source, md5)) from None
    except (URLError, http.client.HTTPException, OSError, RuntimeError) as err:
        reason = err if isinstance(err, HTTPError) else getattr(err, "reason", None) or err
        raise UserError(
            f"download of {source} failed ({reason}); nothing was kept: run the same command to start again"
        ) from None
    if not archive.is_file():  # MONAI's download_url swallows some permission errors
        raise UserError(
            f"download of {source} failed (no file was written); run the same command to start again"
        )
    return archive


def _md5_message(source: str, md5: str) -> str:
    return (
        f"{source}: MD5 differs from the expected {md5} (a corrupt or different archive); nothing was kept: run "
        "the same command to download it again, or pass --md5 for an archive you trust"
    )


def _archive_kind(archive: Path, shown: str) -> str:
    if tarfile.is_tarfile(archive):
        return "tar"
    if zipfile.is_zipfile(archive):
        return "zip"
    raise UserError(f"{shown}: not a tar or zip archive")


def _member_names(archive: Path, kind: str) -> list[str]:
    """Every member's name, after refusing any that would land outside the extraction folder."""
    from monai.apps.utils import safe_extract_member

    probe = archive.parent / "probe"  # a folder name only, never created: the checks are on paths
    try:
        if kind == "tar":
            with tarfile.open(archive) as tar:
                members = tar.getmembers()
        else:
            with zipfile.ZipFile(archive) as zf:
                members = zf.infolist()
        for member in members:
            safe_extract_member(member, str(probe))
    except ValueError as err:
        raise UserError(
            f"{archive.name}: refused, unsafe archive member ({err}); nothing was extracted"
        ) from None
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as err:
        raise UserError(f"{archive.name}: unreadable archive ({err}); nothing was kept") from None
    return [getattr(m, "filename", None) or m.name for m in members]


def _dataset_folder(names: list[str], task: str, shown: str) -> str:
    """The archive folder that holds dataset.json: TASK/ as MSD archives have it, else the only one."""
    holders = set()
    for name in names:
        parts = PurePosixPath(name.replace("\\", "/")).parts
        parts = tuple(p for p in parts if p != ".")
        if parts and parts[-1] == "dataset.json" and len(parts) <= 2:
            holders.add(parts[0] if len(parts) == 2 else "")
    if task in holders:
        return task
    if len(holders) == 1:
        return holders.pop()
    if not holders:
        raise UserError(
            f"{shown}: no dataset.json in the archive (expected {task}/dataset.json); nothing was kept"
        )
    raise UserError(
        f"{shown}: several dataset.json files ({sorted(holders)}) and none in {task}/; nothing was kept"
    )


def _extract(archive: Path, dest: Path, task: str) -> Path:
    """Extract into `dest` (a new folder) after checking every member; returns the dataset's folder."""
    from monai.apps.utils import extractall

    kind = _archive_kind(archive, archive.name)
    folder = _dataset_folder(_member_names(archive, kind), task, archive.name)
    print(f"extracting {archive.name} ...", flush=True)
    dest.mkdir()
    try:
        extractall(archive, dest, file_type=kind, has_base=False)
    except (ValueError, tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as err:
        raise UserError(f"{archive.name}: extraction failed ({err}); nothing was kept") from None
    return dest / folder if folder else dest


def _check_dataset(dataset: Path, task: str) -> int:
    """dataset.json must parse and every training file it lists must be there: a usable MSD dataset."""
    try:
        return _count_cases(dataset)
    except UserError as err:
        message = str(err).replace(str(dataset), task)
        raise UserError(f"the archive's dataset is not usable ({message}); nothing was kept") from None


# ---------------------------------------------------------------------------------------------------------
# What to type next


def preset_for(task: str) -> str | None:
    """The data preset (configs/data/NAME.yaml) whose `fetch` key is `msd TASK`, if there is one."""
    for path in sorted((CONFIG_DIR / "data").glob("*.yaml")):
        if OmegaConf.load(path).get("fetch") == f"msd {task}":
            return path.stem
    return None


def train_override(task: str, fetched: Fetched, cache_root: Path) -> str:
    preset = preset_for(task)
    if preset is None:
        return f"data=msd data.root={fetched.path}"
    if cache_root.expanduser().absolute() != default_cache_root().expanduser().absolute():
        return f"data={preset} data.cache_dir={cache_root}"
    return f"data={preset}"


# ---------------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="norm-exp-fetch",
        description="Download a public dataset into the dataset cache and print the data=... override to train on it.",
    )
    p.add_argument("source", choices=["msd"], help="msd: a Medical Segmentation Decathlon task")
    p.add_argument("task", help="e.g. Task04_Hippocampus (CPU-sized, MR) or Task09_Spleen (GPU-sized, CT)")
    p.add_argument(
        "--url",
        help="download from this URL instead (a mirror, a proxy), or use a local archive: a path or file:// URL",
    )
    p.add_argument("--md5", help="expected MD5 of the archive (default: the published one of TASK)")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache root (default: $NORM_EXP_CACHE or ~/.cache/norm-experiments); the task goes to CACHE/msd/TASK",
    )
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    """norm-exp-fetch msd TASK [--url URL|PATH] [--md5 HEX] [--cache-dir DIR]"""
    args = _parser().parse_args(argv)
    cache_root = args.cache_dir or default_cache_root()
    fetched = fetch_msd(args.task, cache_root, args.url, args.md5)
    if fetched.already:
        print(f"{args.task}: already fetched ({fetched.cases} training cases) at {fetched.path}")
    else:
        print(f"fetched {args.task}: {fetched.cases} training cases at {fetched.path}")
    print(f"train with: norm-exp-train {train_override(args.task, fetched, cache_root)}")


if __name__ == "__main__":
    main()
