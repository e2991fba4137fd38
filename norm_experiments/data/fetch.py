"""`norm-exp-fetch msd TASK`: download a Medical Segmentation Decathlon task into the dataset cache.

    norm-exp-fetch msd Task04_Hippocampus                      # then: norm-exp-train data=msd_hippocampus
    norm-exp-fetch msd Task09_Spleen --url https://mirror.example.org/Task09_Spleen.tar
    norm-exp-fetch msd Task04_Hippocampus --url ~/Downloads/Task04_Hippocampus.tar   # a local copy

The archive URLs and their published MD5 sums are MONAI's (monai.apps.DecathlonDataset.resource / .md5);
the download is ours (urllib), into the work folder below, its MD5 computed as it arrives and compared
without regard to case. A download that receives less than 1 KiB in --timeout seconds (default 30) gives up:
a server that sends nothing, stalls after a few bytes, or trickles them (a byte now and then, each read
within a socket timeout) ends in one line; so does one whose answer (connecting, headers) takes longer. The task lands in
CACHE/msd/TASK, CACHE being ${NORM_EXP_CACHE:-~/.cache/norm-experiments} or --cache-dir, where the
presets (data=msd_hippocampus, data=msd_spleen) look for it. Nothing is ever downloaded by a training run.

Nothing that looks like a dataset is left by a failure: the archive is downloaded and extracted inside a
hidden work folder beside the target (.TASK.tmp-HOST-PID-*), every member is checked before anything is
extracted (no absolute paths, no "..", no links), the extracted dataset.json and the files it lists are
checked, and only then is the dataset renamed into place (one atomic rename). A failed or interrupted fetch
removes its work folder, SIGTERM and Ctrl-C included (exit status 3; a kill -9'd one's is removed by the
next fetch); running the command again starts the download afresh. A task already in place is not fetched
again. The dataset.json of the archive is read with limits (size, nesting, digits) and every file it lists
must lie inside the dataset folder (data/layouts.py checks that again whenever a dataset is loaded).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import logging
import os
import re
import shlex
import shutil
import signal
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError, URLError
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname, urlopen

from omegaconf import OmegaConf

from norm_experiments import safe_io
from norm_experiments.config import CONFIG_DIR, config_cache_root, default_cache_root, hydra_quote
from norm_experiments.data.layouts import find_cases
from norm_experiments.data.workdirs import make_work_folder
from norm_experiments.errors import (
    EXIT_INTERRUPTED,
    OneLineParser,
    StdoutError,
    UserError,
    exit_on_user_error,
    flush_stdout,
    guard_stdout,
)
from norm_experiments.plugins import closest

DEFAULT_TIMEOUT = 30.0  # seconds: a download that receives less than MIN_PROGRESS in that time gives up
MIN_PROGRESS = 1024  # bytes per DEFAULT_TIMEOUT (or --timeout) seconds: less is a stalled download
MAX_TIMEOUT_S = 86400.0  # a day: an "inf" overflowed the alarm
_MD5 = re.compile(r"[0-9a-fA-F]{32}")

log = logging.getLogger(__name__)


def msd_tasks() -> dict[str, tuple[str, str]]:
    """Task name -> (archive URL, published MD5), as MONAI keeps them."""
    from monai.apps import DecathlonDataset

    return {task: (url, DecathlonDataset.md5[task]) for task, url in DecathlonDataset.resource.items()}


@dataclass(frozen=True)
class Fetched:
    path: Path  # the dataset folder (holds dataset.json)
    cases: int  # training cases listed in dataset.json
    already: bool  # it was there before this call


# ---------------------------------------------------------------------------------------------------------
# Fetching


def _closest_task(typed: str, tasks: list[str]) -> str:
    """' (did you mean Task04_Hippocampus?)' for a misspelt task, its number or its name without the prefix."""
    spellings = {}
    for task in tasks:  # Task04_Hippocampus, task04, 4, hippocampus: one spelling each
        number, _, name = task.removeprefix("Task").partition("_")
        spellings.update(
            {task.lower(): task, f"task{number}": task, str(int(number)): task, name.lower(): task}
        )
    found = closest(typed, spellings)
    return f" (did you mean {found}?)" if found else ""


def fetch_msd(
    task: str,
    cache_root: Path,
    source: str | None = None,
    md5: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Fetched:
    """Put MSD `task` at cache_root/msd/task, from `source` (URL or local archive; default: MONAI's URL),
    checked against `md5` (default: the published MD5). Raises UserError with one line for every failure."""
    tasks = msd_tasks()
    if task not in tasks:
        raise UserError(
            f"unknown MSD task {task!r}{_closest_task(task, list(tasks))}; choose one of {', '.join(tasks)}"
        )
    if md5 is not None and not _MD5.fullmatch(md5):
        raise UserError(f"--md5 {md5}: not an MD5 sum (32 hexadecimal digits)")
    url, published_md5 = tasks[task]
    logging.getLogger("monai.apps").setLevel(logging.CRITICAL)  # our own lines say what happens
    target = cache_root.expanduser() / "msd" / task
    if (target / "dataset.json").is_file():
        return Fetched(target, _count_cases(target), already=True)
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise UserError(
            f"{target}: exists but holds no dataset.json (not a fetched task); remove it and run again"
        )
    try:
        work = make_work_folder(target.parent, target.name, any_name=True)  # killed fetches' removed first
    except OSError as err:
        raise UserError(
            f"{target.parent}: cannot create the folder to fetch into ({safe_io.os_reason(err)})"
        ) from None
    try:
        archive = _obtain(source or url, (md5 or published_md5).lower(), work, timeout)
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


def _local_path(source: str) -> Path | None:
    """The file a source names when it is a local path or a file:// URL; None for a network URL."""
    parsed = urlparse(source)
    if parsed.scheme == "file":
        return Path(url2pathname(unquote(parsed.path)))
    if not parsed.scheme or len(parsed.scheme) == 1:  # a plain path (or one with a Windows drive letter)
        return Path(source).expanduser()
    return None


def _obtain(source: str, md5: str, work: Path, timeout: float) -> Path:
    """The archive, downloaded into `work` (or a local file, used in place), with its MD5 checked."""
    from monai.apps.utils import check_hash

    local = _local_path(source)
    if local is not None:
        if not local.is_file():
            raise UserError(f"{local}: archive not found")
        _say(f"checking the MD5 of {local}")
        if not check_hash(local, md5, "md5"):
            raise UserError(_md5_message(str(local), md5, local=True))
        return local
    archive = work / (PurePosixPath(urlparse(source).path).name or "archive")
    _say(f"downloading {source} (MD5 {md5}) ...")
    again = "nothing was kept: run the same command to start again"
    stalled = (
        f"download of {source} stalled: less than {MIN_PROGRESS // 1024} KiB in {timeout:g} s (--timeout); "
        f"{again}"
    )
    try:
        digest = _download(source, archive, timeout)
    except TimeoutError:
        raise UserError(stalled) from None
    except (URLError, http.client.HTTPException, OSError, ValueError) as err:
        reason = err if isinstance(err, HTTPError) else getattr(err, "reason", None) or err
        if isinstance(reason, TimeoutError):  # while connecting
            raise UserError(stalled) from None
        raise UserError(f"download of {source} failed ({reason}); {again}") from None
    if digest != md5:
        raise UserError(_md5_message(source, md5))
    return archive


def _download(source: str, archive: Path, timeout: float) -> str:
    """Stream `source` into `archive`; its MD5. Raises TimeoutError when less than MIN_PROGRESS bytes arrive
    in `timeout` seconds: the socket timeout ends a read that waits that long for a single byte, the check
    after every read ends a trickle (each read returns a byte or two in time), and in the main thread an
    alarm ends a connection or an answer's headers that take longer (http.client reads headers line by
    line, each line within the socket timeout, up to 100 lines of 64 KiB)."""
    digest = hashlib.md5()
    with _deadline(timeout):  # connecting, the request, the answer's status line and headers
        response = urlopen(source, timeout=timeout)  # noqa: S310 - http(s)/ftp URL the user gave
    with response, open(archive, "wb") as out:
        promised = response.headers.get("Content-Length")
        window_start, window_bytes = time.monotonic(), 0
        while chunk := response.read1(2**20):  # what has arrived: a partial download is on disk
            digest.update(chunk)
            out.write(chunk)
            window_bytes += len(chunk)
            if window_bytes >= MIN_PROGRESS:
                window_start, window_bytes = time.monotonic(), 0
            elif time.monotonic() - window_start > timeout:
                raise TimeoutError
    if promised is not None and promised.isdigit() and archive.stat().st_size != int(promised):
        raise OSError(f"the server sent {archive.stat().st_size} of {promised} bytes")
    return digest.hexdigest()


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the block after `seconds` (SIGALRM; only in the main thread, where signal
    handlers run: elsewhere the block is bounded by its socket timeouts alone). An alarm set by someone else
    is put back afterwards, with the time it had left."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError

    started = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, expire)
    previous_left, previous_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_left:
            left = max(previous_left - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, previous_interval)


def _say(line: str) -> None:
    """A progress line. Standard output that cannot be written (a closed pipe) does not stop the fetch:
    main() reports it in one line at the end (errors.flush_stdout), the dataset in place."""
    try:
        print(line, flush=True)
    except StdoutError:
        pass


def _md5_message(source: str, md5: str, local: bool = False) -> str:
    if local:  # a file of the user's: nothing was downloaded, nothing to retry
        return (
            f"{source}: MD5 differs from the expected {md5} (a corrupt or different archive); nothing was "
            "fetched: check the file, or pass --md5 for an archive you trust"
        )
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
    _say(f"extracting {archive.name} ...")
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
    """The overrides that train on the fetched task, as the user types them in a shell."""
    preset = preset_for(task)
    if preset is None:
        return f"data=msd {_path_override('data.root', fetched.path.absolute())}"
    cache = cache_root.expanduser().absolute()
    configured = config_cache_root().expanduser()
    # A configured root relative to the current folder (HOME unset) would differ in another folder.
    if not configured.is_absolute() or cache != configured:
        return f"data={preset} {_path_override('data.cache_dir', cache)}"
    return f"data={preset}"


def _path_override(key: str, path: Path) -> str:
    """KEY=PATH quoted for Hydra's grammar where it needs it (spaces, '=', ','), then for the shell."""
    value = str(path)
    if not re.fullmatch(r"[\w/.+@%-]+", value):
        value = hydra_quote(value)
    return shlex.quote(f"{key}={value}")


# ---------------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(
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
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"a download that receives less than {MIN_PROGRESS // 1024} KiB in this many seconds (connecting and "
        f"the answer's headers included) gives up (default {DEFAULT_TIMEOUT:g})",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache root (default: $NORM_EXP_CACHE or ~/.cache/norm-experiments); the task goes to CACHE/msd/TASK",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    """norm-exp-fetch msd TASK [--url URL|PATH] [--md5 HEX] [--timeout S] [--cache-dir DIR]"""
    # SIGTERM unwinds like Ctrl-C, so that fetch_msd removes its work folder (a partial download) on the way.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    guard_stdout()  # a closed pipe or a full disk on stdout: one line, not a traceback
    try:
        _fetch(argv)
        flush_stdout()
    except KeyboardInterrupt:
        print("interrupted: nothing was kept; run the same command to start again", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        signal.signal(signal.SIGTERM, previous)


@exit_on_user_error
def _fetch(argv: list[str] | None) -> None:
    problem = safe_io.argument_problem(sys.argv[1:] if argv is None else argv)
    if problem:
        raise UserError(problem)
    args = _parser().parse_args(argv)
    if not 0 < args.timeout <= MAX_TIMEOUT_S:  # the alarm (setitimer) takes no more than a year or so
        raise UserError(
            f"--timeout {args.timeout:g}: must be a positive number of seconds, at most {MAX_TIMEOUT_S:g}"
        )
    if args.url:
        try:
            urlparse(args.url)
        except ValueError as err:
            raise UserError(f"--url {args.url}: not a URL or path ({err})") from None
    cache_root = args.cache_dir or default_cache_root()
    fetched = fetch_msd(args.task, cache_root, args.url, args.md5, args.timeout)
    if fetched.already:
        _say(f"{args.task}: already fetched ({fetched.cases} training cases) at {fetched.path}")
    else:
        _say(f"fetched {args.task}: {fetched.cases} training cases at {fetched.path}")
    _say(f"train with: norm-exp-train {train_override(args.task, fetched, cache_root)}")


if __name__ == "__main__":
    main()
