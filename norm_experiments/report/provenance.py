"""Where a report's numbers come from: the commands, the machine, the dates and the library versions."""

from __future__ import annotations

import shlex
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from norm_experiments import safe_io, safe_yaml
from norm_experiments.errors import UserError
from norm_experiments.report.collect import Collection, Run


def sweep_command(sweep_dir: Path) -> str | None:
    """The `norm-exp-train` command that made a sweep, from the multirun.yaml Hydra writes in its folder; None
    when the folder has none. Raises UserError (one line naming the file) for one that cannot be read, is no
    valid YAML, is refused by safe_yaml's limits (aliases, nesting, size), or lacks Hydra's shape
    (hydra.overrides.task: a list of strings)."""
    path = sweep_dir / "multirun.yaml"
    try:  # bounded read and parse; never resolved: ${oc.env:...} in a shared sweep folder must not reach a document
        plain = safe_yaml.load(safe_io.read_text(path, safe_io.MAX_YAML_BYTES), path)
    except FileNotFoundError:
        return None
    except safe_io.UnsafeFile as err:
        raise UserError(str(err)) from None
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({safe_io.os_reason(err)})") from None
    task: Any = plain
    for key in ("hydra", "overrides", "task"):
        if not isinstance(task, dict) or key not in task:
            raise UserError(f"{path}: not a multirun.yaml as Hydra writes it (no hydra.overrides.task)")
        task = task[key]
    if not isinstance(task, list) or not all(isinstance(o, str) for o in task):
        raise UserError(f"{path}: hydra.overrides.task is not a list of overrides (strings)")
    return shlex.join(["norm-exp-train", *task])


def _time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _most_common(values: list[str]) -> str:
    counts = Counter(values)
    text = counts.most_common(1)[0][0]
    return text if len(counts) == 1 else f"{text} (and {len(counts) - 1} other value(s) in some runs)"


def header_lines(collection: Collection, report_command: str) -> list[str]:
    """Markdown lines naming the command that wrote the document, the sweep commands, machine, dates and
    library versions, read from the runs' own metrics.json (not from the machine writing the report)."""
    lines = [f"Written by `{report_command}` on {_time(datetime.now(timezone.utc).timestamp())}."]
    for sweep_dir in collection.sweep_dirs:
        command = sweep_command(sweep_dir)
        if command:
            lines.append(f"Runs made by `{command}` (from `{sweep_dir}/multirun.yaml`).")
    done = [r for r in collection.runs if r.completed]
    if done:
        ends = [r.mtime for r in done]
        starts = [r.mtime - (r.value("wall_time_s") or 0.0) for r in done]
        minutes = (max(ends) - min(starts)) / 60
        lines.append(
            f"Runs: {_time(min(starts))} to {_time(max(ends))} ({minutes:.0f} min from the first start to the "
            "last end; a resumed run counts from its last start)."
        )
        machines = [str(r.data.get("machine") or "not recorded") for r in done]
        devices = [str(r.data.get("device") or "?") for r in done]
        lines.append(f"Machine: {_most_common(machines)}; device: {_most_common(devices)}.")
        versions = [
            ", ".join(f"{k} {v}" for k, v in sorted((r.data.get("versions") or {}).items())) for r in done
        ]
        lines.append(f"Libraries: {_most_common(versions)}.")
    return [f"- {line}" for line in lines]


def _preprocessing(run: Run) -> str:
    """'intensity=auto -> zscore per channel; spacing as stored' from one record's `preprocessing`."""
    record = run.data.get("preprocessing")
    if not isinstance(record, dict):
        return "not recorded"
    channels = record.get("channel_intensity")
    used = ", ".join(str(c) for c in channels) if isinstance(channels, list) else "?"
    spacing = record.get("target_spacing")
    spacing_text = "as stored" if spacing is None else "×".join(f"{float(s):g}" for s in spacing) + " mm"
    text = f"intensity={record.get('intensity', '?')} → {used} per channel; target spacing {spacing_text}"
    if record.get("ct_statistics"):
        text += "; CT channels clipped and scaled with pooled foreground statistics"
    return text


def preprocessing_lines(runs: list[Run]) -> list[str]:
    """The preprocessing the runs used, as they recorded it (not the config's setting), with run counts."""
    counts = Counter(_preprocessing(r) for r in runs if r.completed)
    return [f"{text} ({n} run{'s' if n != 1 else ''})" for text, n in sorted(counts.items())]
