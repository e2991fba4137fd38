"""The run record, `metrics.json`: the contract between training (which writes it), and the report, the sweep
callback and the tests (which read it). One module owns its file name, its statuses, its fields (RunRecord, the
one typed builder) and how it is read and written, so that no other module spells them. Torch-free: the report
and the sweep callback import it.

A record is a JSON object. Every record has `status` and the run's coordinates (`norm`, `batch_size`, `seed`);
a completed run adds its results. docs/reference/run_folder.md's field table is written from RunRecord
(`python -m norm_experiments.run_record docs/reference/run_folder.md`; a test fails when it is stale).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from norm_experiments import safe_io

FILENAME = "metrics.json"
# In a run folder: "process PID on HOST" of the process that holds (or last held) the folder's flock
# (training/run_folder.py); the report reads it to tell a run still training from one that was killed.
LOCK = ".lock"
HOLDER = re.compile(r"process (\d{1,9}) on (\S{1,255})")


def holder_line() -> str:
    """What a lock file says about the process holding it (this one)."""
    return f"process {os.getpid()} on {socket.gethostname()}"


def read_holder(text: str) -> str:
    """A lock file's holder as a refusal may print it: its line when it is one of ours, else "another process"
    (the file lies in a folder that may be someone else's: its text is not printed as it is)."""
    text = text.strip()
    return text if HOLDER.fullmatch(text) else "another process"


class Status(str, Enum):
    """What a run's record says about it. A str: records store the plain value ("completed")."""

    RUNNING = "running"  # training (or killed while training: a later run of the same command resumes it)
    COMPLETED = "completed"  # finished; the same command again skips it
    FAILED = "failed"  # a mistake in the config or the data, or a crash; the same command retries it
    DIVERGED = "diverged"  # the loss became NaN or infinite
    INTERRUPTED = "interrupted"  # SIGTERM/SIGINT: a checkpoint was saved; the same command continues it


# Statuses that mean "this run ended without a usable result".
NO_RESULT = frozenset({Status.FAILED.value, Status.DIVERGED.value})


def _doc(meaning: str, default: object = None, only_when_set: bool = False) -> Any:
    """A field with its meaning; `only_when_set`: left out of the JSON while None (a result a run has only
    for some norms, e.g. eval_modes)."""
    return field(default=default, metadata={"doc": meaning, "only_when_set": only_when_set})


@dataclass
class RunRecord:
    """Every field of metrics.json, its type and its meaning. The four without a default are the coordinates:
    every record has them, an early failure records little more."""

    status: Status = field(
        metadata={"doc": "`running`, `completed`, `failed` (with `error`), `diverged`, `interrupted`"}
    )
    norm: str = field(metadata={"doc": "the normalization (a name of the norm registry)"})
    batch_size: int = field(metadata={"doc": "volumes per step and rank (`data.batch_size`)"})
    seed: int = field(metadata={"doc": "the run's seed: initialization and patch sampling"})
    error: str | None = _doc("why the run failed, diverged or was interrupted; null otherwise")
    run_id: str | None = _doc("the config's identity hash: the same config, the same run")
    run_name: str | None = _doc("the run folder's name")
    norm_options: dict | None = _doc("the norm's options (e.g. `num_groups`)")
    group_layers: dict | None = _doc(
        "GroupNorm layers of the network: `layers`, `groups` and `channels_per_group` ([min, max]); a layer "
        "with one channel per group is InstanceNorm, with one group LayerNorm",
        only_when_set=True,
    )
    batch_dependent: bool | None = _doc("its training output depends on the other samples of the batch")
    bn_family: bool | None = _doc("keeps running statistics: scored in every evaluation mode")
    model: str | None = _doc("the network (`model.name`)")
    patches_per_volume: int | None = _doc("patches drawn per volume and step")
    effective_batch: int | None = _doc("patches per rank and forward (micro-batch)")
    accumulate_steps: int | None = _doc("micro-batches per optimizer step (gradient accumulation)")
    world_size: int | None = _doc("ranks (processes) that trained the run")
    global_batch: int | None = _doc("patches per optimizer step, all ranks and micro-batches")
    bn_batch: int | None = _doc("patches per BatchNorm statistic in training (null: the norm uses none)")
    lr: float | None = _doc("the learning rate after `optim.lr_scaling`")
    lr_scaling: str | None = _doc("how the learning rate follows the batch size (`optim.lr_scaling`)")
    dataset: str | None = _doc("a condition of the study: synthetic, brain, a preset or a folder")
    intensity: str | None = _doc("a condition of the study: the intensity preprocessing (`data.intensity`)")
    budget_unit: str | None = _doc("a condition of the study: the budget counts patches or steps")
    samples_budget: int | None = _doc("training patches the run was given")
    samples_seen: int | None = _doc("training patches seen so far")
    steps: int | None = _doc("optimizer steps taken so far")
    total_steps: int | None = _doc("optimizer steps of the whole run")
    best_val_dice: float | None = _doc("the best validation Dice during training (eval mode)")
    best_step: int | None = _doc("the step of `best_val_dice`")
    samples_per_s: float | None = _doc("training patches per second (data waits included)")
    data_wait_fraction: float | None = _doc("share of training time spent waiting for data")
    amp: str | None = _doc("mixed precision (`bfloat16`, `float16` or `off`)")
    amp_skipped_steps: int | None = _doc("float16 steps the gradient scaler skipped")
    peak_memory_mb: float | None = _doc("peak resident memory of the process, MiB")
    peak_cuda_memory_mb: float | None = _doc(
        "peak GPU memory allocated on the run's device, MiB (null on CPU)"
    )
    device: str | None = _doc("`cpu` or the GPU's name")
    machine: str | None = _doc("CPU model and cores (and GPU)")
    versions: dict | None = _doc("Python, torch, MONAI, nibabel, NumPy, Hydra and CUDA versions")
    history: list | None = _doc("each validation during training: step, patches seen, Dice")
    loss_history: list | None = _doc("mean training loss per logging window: the convergence test's points")
    batch_stats_windows: int | None = _doc(
        "windows per forward in the `batch` evaluation mode (null: no modes)"
    )
    preprocessing: dict | None = _doc(
        "intensity per channel, CT statistics, target spacing, dataset fingerprint"
    )
    val_dice: float | None = _doc("final validation Dice in eval mode (running statistics for BatchNorm)")
    val_dice_per_class: dict | None = _doc("`val_dice` per foreground class (null: absent from every case)")
    val_hd95: float | None = _doc(
        "final validation HD95 in mm (a missed class counts as the volume's diagonal)"
    )
    val_hd95_per_class: dict | None = _doc("`val_hd95` per foreground class")
    absent_classes: list | None = _doc("classes absent from every validation case: left out of the means")
    convergence: dict | None = _doc(
        "`still_improving` from a slope test on the late training loss (metric, slope, se, t, p, points); "
        "null for short runs"
    )
    eval_modes: dict | None = _doc(
        "BatchNorm family: Dice with `running`, `precise` (PreciseBN), `batch` statistics, and with "
        "`trainer.remedy_modes` `batch_alone` (each window alone) and `precise_more` (PreciseBN over 4x the "
        "patches) (absent otherwise)",
        only_when_set=True,
    )
    eval_modes_hd95: dict | None = _doc(
        "BatchNorm family: HD95 in each evaluation mode (absent otherwise)", only_when_set=True
    )
    per_case: dict | None = _doc(
        "Dice and HD95 per evaluation mode, validation case and class (null where the class is absent from the "
        "case), each mode's error locations per case (`errors`), and `running_lcc`: the running mode's "
        "predictions with each class's largest connected component kept; the report's intervals count cases"
    )
    wall_time_s: float | None = _doc("seconds from start to the written record")

    def to_json(self, keep_none: bool = True) -> dict[str, Any]:
        """The JSON object (statuses as plain strings); fields that are None are left out when they exist only
        for some runs (only_when_set), and all of them without keep_none."""
        record = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None or not f.metadata.get("only_when_set")
        }
        record["status"] = Status(self.status).value
        return record if keep_none else {k: v for k, v in record.items() if v is not None}


# Fields without which a record cannot be placed in a table (an early failure records only these).
COORDINATES = tuple(f.name for f in dataclasses.fields(RunRecord) if f.default is dataclasses.MISSING)
FIELDS = frozenset(f.name for f in dataclasses.fields(RunRecord))


def path_in(run_dir: Path) -> Path:
    return Path(run_dir) / FILENAME


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename over `path`: a reader never sees
    half a file, and a crash or a full disk keeps the previous one. The file gets the permissions the umask
    gives a new file (not mkstemp's 0600), so teammates on a shared filesystem can read results."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process's umask (a new file gets 0o666 & ~umask): read by setting it and setting it back."""
    current = os.umask(0)
    os.umask(current)
    return current


def write(run_dir: Path, record: RunRecord | dict[str, Any]) -> None:
    """Write a run's record atomically (statuses as plain strings)."""
    if isinstance(record, RunRecord):
        record = record.to_json()
    text = json.dumps(record, indent=2, default=lambda v: v.value if isinstance(v, Enum) else str(v))
    write_atomic(path_in(run_dir), (text + "\n").encode())


def read(run_dir: Path) -> dict[str, Any] | None:
    """The record in run_dir, or None when it is missing, unreadable or not a JSON object."""
    try:
        record = safe_io.load_json(path_in(run_dir))  # bounded: no FIFO, no /dev/zero, no deep nesting
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def score_text(value: float | None) -> str:
    """A score of a record as the command line prints it: four decimals, `none` where the record has none
    (val_dice is null when no validation case holds a class)."""
    return "none" if value is None else f"{value:.4f}"


def status_of(record: dict[str, Any] | None) -> str | None:
    return None if record is None else record.get("status")


# ------------------------------------------------------------------------------------------ the reference page

TABLE_START = "<!-- metrics.json fields: written by python -m norm_experiments.run_record; do not edit -->"
TABLE_END = "<!-- end of the metrics.json fields -->"


def field_table() -> str:
    """The metrics.json fields as a Markdown table: name, JSON type, meaning."""
    rows = ["| field | type | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(RunRecord):
        rows.append(f"| `{f.name}` | {_json_type(f.type)} | {f.metadata['doc']} |")
    return "\n".join(rows)


JSON_TYPES = {
    "Status": "string",
    "str": "string",
    "int": "integer",
    "float": "number",
    "bool": "boolean",
    "dict": "object",
    "list": "array",
}


def _json_type(annotation: object) -> str:
    """'int | None' -> 'integer or null' (annotations are strings here: postponed evaluation)."""
    names = [part.strip() for part in str(annotation).split("|")]
    return " or ".join("null" if n == "None" else JSON_TYPES[n] for n in names)


def with_field_table(page: str) -> str:
    """`page` with the text between TABLE_START and TABLE_END replaced by field_table()."""
    before, rest = page.split(TABLE_START, 1)
    _, after = rest.split(TABLE_END, 1)
    return f"{before}{TABLE_START}\n{field_table()}\n{TABLE_END}{after}"


if __name__ == "__main__":
    page_path = Path(sys.argv[1])
    page_path.write_text(with_field_table(page_path.read_text(encoding="utf-8")), encoding="utf-8")
