"""Bounded reads of files the project does not control: a run folder's metrics.json and .hydra/overrides.yaml,
a dataset's dataset.json, weights handed to norm-exp-check. docs/safety.md says which files count as untrusted.

A file is opened only when it is a regular file (a FIFO would block the reader forever, /dev/zero would fill
the memory) of a sane size, and JSON is parsed with limits on nesting depth and on the digits of a number
(Python's own parser raises RecursionError on deep nesting and ValueError past 4,300 digits, both tracebacks
where the user should read one line). Torch-free: the report imports it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path
from typing import IO, Any

# Sizes far above what this project writes or reads (a metrics.json of a long run is tens of kB, an MSD
# dataset.json under 1 MB), far below what would exhaust a machine's memory.
MAX_JSON_BYTES = 64 * 2**20
MAX_YAML_BYTES = 4 * 2**20
MAX_JSON_DEPTH = 64  # our records nest 4 deep, dataset.json 3
MAX_NUMBER_CHARS = 100  # a float written by json.dumps takes at most 24


class UnsafeFile(ValueError):
    """A file that is refused before (or while) it is parsed; the message names the file and why."""


def _kind(mode: int) -> str:
    kinds = {
        stat.S_ISFIFO: "a FIFO (named pipe)",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
        stat.S_ISDIR: "a folder",
    }
    return next((name for test, name in kinds.items() if test(mode)), "not a regular file")


def kind_of(path: Path | str) -> str:
    """What `path` is when it is not a regular file ("a folder", "a FIFO (named pipe)", ...), symlinks followed."""
    return _kind(os.stat(path).st_mode)


def open_regular(path: Path | str, max_bytes: int) -> IO[bytes]:
    """`path` opened for binary reading, only if it is a regular file (after symlinks) of at most max_bytes.

    O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer; the type is then checked on the
    open descriptor itself, so the file cannot be swapped between the check and the read. Raises UnsafeFile
    (a FileNotFoundError for a missing file, as open() does)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as err:
        raise UnsafeFile(f"{path}: cannot be opened ({os_reason(err)})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFile(f"{path}: refused, {_kind(info.st_mode)} where a file is expected")
        if info.st_size > max_bytes:
            raise UnsafeFile(
                f"{path}: refused, {info.st_size / 2**20:.1f} MiB is more than the {max_bytes / 2**20:.0f} MiB "
                "such a file can sanely hold"
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: Path | str, max_bytes: int) -> bytes:
    """The whole file, through open_regular; also refuses a file that grew past max_bytes while read."""
    with open_regular(path, max_bytes) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UnsafeFile(f"{path}: refused, it grew past {max_bytes / 2**20:.0f} MiB while being read")
    return data


def read_text(path: Path | str, max_bytes: int) -> str:
    try:
        return read_bytes(path, max_bytes).decode("utf-8")
    except UnicodeDecodeError as err:
        raise UnsafeFile(f"{path}: not UTF-8 text (byte {err.start})") from None


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON text (brackets inside strings do not count)."""
    depth = deepest = 0
    for match in _BRACKET.finditer(_STRING.sub("", text)):
        depth += 1 if match.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _number(kind: type) -> Any:
    def parse(literal: str) -> Any:
        if len(literal) > MAX_NUMBER_CHARS:
            raise UnsafeFile(f"a number of {len(literal)} characters")
        return kind(literal)

    return parse


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object's pairs as a dict; a key that appears twice is refused (Python's parser would silently keep
    the last value, another reader the first: the file says two things)."""
    found = dict(pairs)
    if len(found) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                shown = key if len(key) <= 40 else key[:37] + "..."
                raise UnsafeFile(f"the key {shown!r} appears twice in one object")
            seen.add(key)
    return found


def parse_json(text: str, where: Path | str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """json.loads with a depth and a number-size limit, refusing duplicate keys. Raises UnsafeFile, or
    json.JSONDecodeError (which callers already report with line and column) for text that is not JSON."""
    depth = json_depth(text)
    if depth > max_depth:
        raise UnsafeFile(f"{where}: refused, nested {depth} levels deep (at most {max_depth})")
    try:
        return json.loads(
            text, parse_int=_number(int), parse_float=_number(float), object_pairs_hook=_unique_keys
        )
    except UnsafeFile as err:
        raise UnsafeFile(f"{where}: refused, {err}") from None
    except RecursionError:  # not reached below the depth limit; kept so that no limit change brings it back
        raise UnsafeFile(f"{where}: refused, nested too deeply") from None


def load_json(path: Path | str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A JSON file from a place the project does not control: bounded read, bounded parse."""
    return parse_json(read_text(path, max_bytes), path)


def link_inside(folder: Path, limit: int = 100_000) -> Path | None:
    """The first symbolic link found inside `folder` (at any depth; links are not followed), or None. A run or
    sweep folder may be someone else's: writing its train.log, .hydra/ or a run's folder through a link would
    write wherever the link points. Not below `.submitit/`, the SLURM launcher's own folder (submitit links its
    submission files there). Looks at `limit` entries at most (a sweep of 480 runs holds a few thousand)."""
    pending, seen = [Path(folder)], 0
    while pending and seen <= limit:
        try:  # a DirEntry knows its kind from the listing: no stat per entry
            entries = list(os.scandir(pending.pop()))
        except OSError:  # a folder this user cannot list: nothing of ours is written in it either
            continue
        for entry in entries:
            seen += 1
            if entry.is_symlink():
                return Path(entry.path)
            if entry.is_dir(follow_symlinks=False) and entry.name != ".submitit":
                pending.append(Path(entry.path))
    return None


def link_problem(folder: Path) -> str | None:
    """One line naming the symbolic link inside `folder` (link_inside), or None."""
    link = link_inside(folder)
    if link is None:
        return None
    try:
        target = os.readlink(link)
    except OSError:
        target = "?"
    return (
        f"{link} is a symbolic link (to {target}): this command writes in {folder} and never through a link; "
        "remove the link, or run in a new folder"
    )


def os_reason(err: OSError) -> str:
    """'ENOSPC: No space left on device': the errno's name and its text, for one-line messages."""
    name = errno.errorcode.get(err.errno or 0, "")
    text = err.strerror or str(err)
    return f"{name}: {text}" if name else text


def memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# Below this much free space a run or sweep folder cannot even hold its config files.
MIN_FREE_BYTES = 2**20


def full_disk_problem(folder: Path) -> str | None:
    """Why nothing can be written below `folder` (its nearest existing ancestor's filesystem is full), or None."""
    path = Path(folder).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        info = os.statvfs(path)
    except OSError:
        return None  # nothing known: the write itself will say
    if info.f_blocks == 0:  # /sys, /proc: a kernel's view, no storage (its "0 bytes free" is no full disk)
        return f"{path}: a filesystem that stores no files (like /sys or /proc); choose a folder on a disk"
    free = info.f_bavail * info.f_frsize
    if free < MIN_FREE_BYTES:
        return f"{path}: the disk is full (ENOSPC: {free} bytes free); free some space and run again"
    return None


# Command-line values that name files or folders (or, `name`, a sweep's folder).
PATH_KEYS = (
    "hydra.run.dir",
    "hydra.sweep.dir",
    "hydra.sweep.subdir",
    "data.root",
    "data.cache_dir",
    "resume",
    "name",
    "weights",
    "net",
    "write_repaired",
)
NAME_MAX = 255  # bytes in one file or folder name on Linux, macOS and Windows filesystems


def argument_problem(argv: list[str]) -> str | None:
    """An argument no file operation could use, said in one line (None if there is none): bytes that are
    not UTF-8 anywhere (the shell passes them as they are; YAML, Hydra and the terminal then fail), or a
    file or folder name longer than filesystems allow (mkdir would fail deep inside Hydra)."""
    for arg in argv:
        if any("\udc80" <= c <= "\udcff" for c in arg):
            shown = arg.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            return f"{shown}: holds bytes that are not UTF-8; use a UTF-8 name"
        key, _, value = arg.partition("=")
        if key.lstrip("+~") not in PATH_KEYS:
            continue
        for part in value.strip("'\"").split("/"):
            if len(part.encode()) > NAME_MAX:
                return (
                    f"{key}: the name {part[:20]}... is {len(part.encode())} bytes long, more than the "
                    f"{NAME_MAX} a file or folder name can have"
                )
    return None
