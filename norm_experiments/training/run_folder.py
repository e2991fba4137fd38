"""What a run folder may hold when a run starts, and what to do with it: skip a completed run, continue an
interrupted one, retrain a failed one, and refuse to touch a folder that holds another config's result.
One process at a time: a run holds an exclusive lock on its folder from before it reads it until it ends."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
from collections.abc import Iterator
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from norm_experiments import run_record, safe_io, safe_yaml
from norm_experiments.config_schema import typed
from norm_experiments.errors import UserError
from norm_experiments.run_names import EXECUTION_KEYS
from norm_experiments.run_record import Status
from norm_experiments.training import checkpoint as ckpt
from norm_experiments.training import distributed

RUN_CONFIG = (
    "run_config.yaml"  # the resolved config this run's checkpoint belongs to (Hydra rewrites .hydra/)
)


OVERRIDES = "overrides.yaml"  # in .hydra/: the run's command-line overrides, which resume= replays
LOCK = run_record.LOCK  # holds the PID and host of the process that holds (or last held) the folder's lock


class RunFolderBusy(UserError):
    """Another process holds the run folder's lock: this process must not read or write the folder."""


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on run_dir while the block runs, or raise RunFolderBusy naming the holder.

    flock: the operating system releases it when the holding process ends in any way (kill -9 included),
    so a stale lock cannot exist and the lock file is never removed. Under torchrun rank 0 takes it for every
    rank; a refusal on rank 0 is raised on every rank, so that none waits for the others forever.
    """
    handle, holder = None, "another process"
    if distributed.is_main():
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            handle = open(run_dir / LOCK, "a+", encoding="utf-8")  # held until the block ends
        except OSError as err:
            raise UserError(f"cannot lock {run_dir / LOCK}: {err.strerror or err}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = run_record.read_holder(handle.read(512))
            handle.close()
            handle = None
    if distributed.any_rank(distributed.is_main() and handle is None):
        who = holder if distributed.is_main() else "another process (rank 0 could not lock it)"
        raise RunFolderBusy(
            f"{run_dir} is in use by {who}: one run at a time per run folder; wait for it to end, stop it, "
            "or use another hydra.run.dir"
        )
    try:
        if handle is not None:
            _write_holder(handle)
            remove_abandoned_writes(run_dir)
        yield
    finally:
        if handle is not None:
            handle.close()  # closing the file releases the lock


# The files a run writes atomically (run_record.write_atomic: ".NAME.XXXXXXXX.tmp" beside NAME). A process killed
# during a write leaves its temporary file behind: a whole checkpoint, for a kill during a checkpoint save.
_ATOMIC_TMP = re.compile(
    r"\.("
    + "|".join(
        re.escape(n) for n in (run_record.FILENAME, ckpt.CHECKPOINT, ckpt.BEST_WEIGHTS, ckpt.FINAL_WEIGHTS)
    )
    + r")\.[A-Za-z0-9_]{8}\.tmp"
)


def remove_abandoned_writes(run_dir: Path) -> None:
    """Remove the temporary files of writes a killed process left in run_dir. Called with the folder's lock
    held: no other process of ours is writing there."""
    try:
        entries = list(os.scandir(run_dir))
    except OSError:
        return
    for entry in entries:
        if _ATOMIC_TMP.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def _write_holder(handle) -> None:
    """Say who holds the lock, for the refusal another process prints. Unbuffered (os.write): on a full disk
    the line is lost, but nothing is left in a buffer that would fail again when the file closes."""
    try:
        handle.truncate(0)
        os.write(handle.fileno(), f"{run_record.holder_line()}\n".encode())
    except OSError:
        pass  # the lock holds without the line


def _flatten(node: object, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        out: dict[str, object] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def config_diff(old: dict, new: dict, only: set[str] | None = None) -> list[str]:
    """Human-readable differences between two resolved configs, as 'key: old -> new', values spelt as typed
    (true, null, [16, 16, 16]). Execution-only keys (run_names.EXECUTION_KEYS: trainer.force_resume, ...) are
    left out: they do not make a run's config another one. With `only`, just those keys."""
    a, b = _flatten(old), _flatten(new)
    return [
        f"{k}: {typed(a.get(k, '<absent>'))} -> {typed(b.get(k, '<absent>'))}"
        for k in sorted(a.keys() | b.keys() if only is None else only)
        if a.get(k) != b.get(k) and not _execution_only(k)
    ]


def changed_from_run(run_dir: Path, cfg: DictConfig) -> list[str]:
    """The keys of `cfg` that both configs hold and that differ from the run's own (its run_config.yaml), as
    'key: run's -> now'. Empty when the file is unreadable."""
    old = _saved_config(run_dir / RUN_CONFIG) if (run_dir / RUN_CONFIG).exists() else None
    if not old:
        return []
    new = OmegaConf.to_container(cfg, resolve=True)
    shared = _flatten(old).keys() & _flatten(new).keys()  # type: ignore[arg-type]
    return config_diff(old, new, only=shared)  # type: ignore[arg-type]


def _execution_only(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in EXECUTION_KEYS)


def existing_run(run_dir: Path, run_id: str, cfg: DictConfig) -> dict | None:
    """Decide what to do with what a previous run left in run_dir.

    Returns the previous record when that run completed with this very config (nothing to do). Raises
    UserError when the folder holds a run of a different config, because continuing or overwriting it would
    lose a result. Returns None when the run should start or continue from its checkpoint.
    """
    if cfg.trainer.overwrite:
        return None
    previous = run_record.read(run_dir)
    if previous is None:
        return None
    completed = previous.get("status") == Status.COMPLETED
    if previous.get("run_id") == run_id:
        return previous if completed else None
    has_result = completed or (run_dir / ckpt.CHECKPOINT).exists()
    if not has_result:
        return None  # a run that failed before saving anything: nothing to lose
    if cfg.trainer.force_resume and not completed:
        return None
    diff = []
    if (run_dir / RUN_CONFIG).exists():
        old = _saved_config(run_dir / RUN_CONFIG)
        diff = config_diff(old, OmegaConf.to_container(cfg, resolve=True)) if old else []  # type: ignore[arg-type]
    # force_resume continues an unfinished run only: for a completed one it would be advice that does nothing
    resume = "" if completed else ", or trainer.force_resume=true to continue it with the new config"
    status = previous.get("status")
    what = (
        f"{'an' if str(status)[:1] in 'aeiou' else 'a'} {status} run" if status in tuple(Status) else "a run"
    )
    raise UserError(
        f"{run_dir} holds {what} of a different config "
        f"({'; '.join(diff[:6]) or 'see its run_config.yaml'}). Use another hydra.run.dir, or "
        f"trainer.overwrite=true to retrain in place (its result is lost){resume}"
    )


def _saved_config(path: Path) -> dict | None:
    """run_config.yaml as plain data, never resolved (a crafted one may hold ${oc.env:...}); None when it is
    no readable mapping: the refusal then only lacks the list of differences."""
    try:
        old = safe_yaml.load(safe_io.read_text(path, safe_io.MAX_YAML_BYTES), path)
    except Exception:  # noqa: BLE001 - any unreadable file (UnsafeFile: too large, an alias bomb, no YAML): no diff
        return None
    return old if isinstance(old, dict) else None


def save_config(cfg: DictConfig, run_dir: Path) -> None:
    if distributed.is_main():
        with written(run_dir / RUN_CONFIG):
            OmegaConf.save(cfg, run_dir / RUN_CONFIG, resolve=True)


@contextlib.contextmanager
def written(path: Path) -> Iterator[None]:
    """Turn an OSError while writing `path` (a full disk, a quota, a read-only folder) into one line naming
    the file and the errno, so that the run is recorded as failed instead of crashing with a traceback."""
    try:
        yield
    except OSError as err:
        raise UserError(f"could not write {path}: {safe_io.os_reason(err)}") from err


def save_hydra_files(cfg: DictConfig, run_dir: Path) -> None:
    """The .hydra/ folder Hydra would write (config.yaml, hydra.yaml, overrides.yaml), written here instead
    (configs/hydra/default.yaml sets hydra.output_subdir=null) by the process that holds the folder's lock and
    passed the identity check, so that a command refused on this folder (busy, or another config) cannot
    replace them: `resume=RUN_DIR` reads .hydra/overrides.yaml."""
    if not distributed.is_main() or not HydraConfig.initialized():  # e.g. a test calling loop.train()
        return
    hydra_cfg = HydraConfig.get()
    folder = run_dir / ".hydra"
    with written(folder):
        folder.mkdir(parents=True, exist_ok=True)
    with written(folder / "config.yaml"):
        OmegaConf.save(cfg, folder / "config.yaml")
    with written(folder / "hydra.yaml"):
        OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), folder / "hydra.yaml")
    with written(folder / OVERRIDES):
        OmegaConf.save(hydra_cfg.overrides.task, folder / OVERRIDES)


# ------------------------------------------------------------------------------------------ resume=RUN_DIR

# What resume= accepts from a run folder's .hydra/overrides.yaml: plain `key=value` overrides of the run's own
# config, as save_hydra_files wrote them. The folder may come from someone else, and each line becomes part of
# a Hydra command line: a flag (--config-dir) or a config group path (experiment=../../x) would load a config
# from anywhere, and a Hydra key (a callback's _target_) or a resolver (${oc.env:...}) would run or read
# whatever the file says.
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_OPTION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_PLAIN_REFERENCE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_.]*\}")  # ${data.batch_size}: another key's value


# One-time instructions are never replayed from a run folder: the trust opt-in holds for one load,
# overwrite=true would discard the very checkpoint a resume continues from, and force_resume=true (given once
# to continue with a new config) would silence every later refusal of another config or other data.
ONE_TIME_KEYS = ("trainer.trust_checkpoint", "trainer.overwrite", "trainer.force_resume")
# Keys that name where to write: a run folder may be someone else's, so it never decides where this process
# writes. Replayed only when the command line gives the key again (the user's own choice, which wins).
WRITE_LOCATION_KEYS = ("data.cache_dir",)


def replayable_overrides(run_dir: Path, config_dir: Path, key: str, command_line: list[str]) -> list[str]:
    """The overrides of the run in run_dir that `key`=run_dir replays before `command_line` (the rest of the
    command line): saved_overrides without the one-time instructions; a key that names where to write is
    refused unless the command line gives it too."""
    replayed = []
    for override in saved_overrides(run_dir, config_dir, key):
        name = _override_key(override)
        if name in ONE_TIME_KEYS:
            continue
        given = any(_override_key(arg) == name for arg in command_line)
        if name in WRITE_LOCATION_KEYS and not given:
            raise UserError(
                f"{key}={run_dir}: {run_dir / '.hydra' / OVERRIDES} sets {override}, a folder to write in, which "
                f"is never taken from a run folder; give {name}=... on the command line if that folder is yours"
            )
        replayed.append(override)
    return replayed


def _override_key(override: str) -> str:
    """The key of a `key=value` command-line override, without Hydra's +, ++ or ~ prefix."""
    return override.split("=", 1)[0].lstrip("+~")


def saved_overrides(run_dir: Path, config_dir: Path, key: str = "resume") -> list[str]:
    """The overrides of the run in run_dir, each checked to be a plain key=value of the configs in
    config_dir; raises UserError naming the argument (`key`=run_dir), the file and the first line it refuses."""
    where = f"{key}={run_dir}"
    if not run_dir.exists():
        raise UserError(f"{where}: no such folder")
    saved = run_dir / ".hydra" / OVERRIDES
    # A file of a run (its model.pt, say) instead of the run's folder: name the folder to give.
    if not run_dir.is_dir() and (run_dir.parent / ".hydra" / OVERRIDES).exists():
        raise UserError(f"{where}: a file; give its run folder: {key}={run_dir.parent}")
    if not saved.exists():  # something else than a file (a FIFO, a device) is refused below, by its kind
        raise UserError(f"{where}: not a run folder (no {saved})")
    try:
        overrides = safe_yaml.load(safe_io.read_text(saved, safe_io.MAX_YAML_BYTES), saved)
    except safe_io.UnsafeFile as err:  # too large, not a file, an alias bomb, not YAML
        raise UserError(f"{where}: {err}") from None
    except Exception as err:  # noqa: BLE001 - kept so that any other failure to read it is one line too
        raise UserError(f"{where}: {saved} is not a list of overrides ({type(err).__name__})") from None
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise UserError(f"{where}: {saved} is not a list of overrides")
    for override in overrides:
        problem = _override_problem(override, config_dir)
        if problem:
            raise UserError(f"{where}: {saved} {problem}")
    return overrides


def _override_problem(override: str, config_dir: Path) -> str | None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    never = f"sets {override}, which a run's overrides never do"
    if override.startswith("-"):
        return f"{never} (a command-line flag)"
    try:
        parsed = OverridesParser.create().parse_override(override)
    except HydraException:
        return f"holds {override!r}: not a key=value override"
    key = parsed.key_or_group
    if key == "hydra" or key.startswith(("hydra.", "hydra/")):
        return never
    root = re.split(r"[./]", key, maxsplit=1)[0]
    if root not in _training_roots(config_dir):  # check's trust_weights=, save_predictions=, explain's keys
        return f"{never} ({root} is no key of norm-exp-train's config)"
    problem = _value_problem(override, parsed, config_dir)
    return f"holds {override!r}: {problem}" if problem else None


@functools.cache
def _training_roots(config_dir: Path) -> frozenset[str]:
    """The first component of every key norm-exp-train's config has: its groups (folders of config_dir) and
    the root keys of train.yaml (our own file, not the run folder's)."""
    roots = safe_yaml.load((config_dir / "train.yaml").read_text(encoding="utf-8"), config_dir / "train.yaml")
    groups = {child.name for child in config_dir.iterdir() if child.is_dir()}
    return frozenset(groups | (set(roots) - {"defaults"}))


def _value_problem(override: str, parsed, config_dir: Path) -> str | None:
    key = parsed.key_or_group
    if parsed.package is not None or not _KEY.fullmatch(key):
        return f"{key} is not a plain config key"
    if parsed.is_sweep_override():
        return "a sweep, not one run's value"
    if "_target_" in override:
        return "a _target_, which would be imported and called"
    for start in (m.start() for m in re.finditer(r"\$\{", override)):
        if not _PLAIN_REFERENCE.match(override, start):
            return "an interpolation that calls a resolver (e.g. reads the environment)"
    if (config_dir / key).is_dir():  # a config group: the value must name one of its files
        value = parsed.value()
        if value is not None and not (
            isinstance(value, str)
            and _OPTION.fullmatch(value)
            and (config_dir / key / f"{value}.yaml").is_file()
        ):
            return f"{key} must name a file of {config_dir / key} (an option such as {key}=NAME)"
    return None
