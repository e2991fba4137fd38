"""Where the configs live, the resolvers they use, and checks that stop a bad config before any work."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from norm_experiments import config_schema, run_names
from norm_experiments.errors import UserError
from norm_experiments.safe_io import full_disk_problem

# configs/ sits beside the package in the repository; the README's set-up installs the project in editable
# mode, so this path holds from any working directory.
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def register_resolvers() -> None:
    """Resolvers used in configs/; registering twice is harmless."""
    run_names.register()  # run_dirname, sweep_run_dirname, execution_keys
    if not OmegaConf.has_resolver("single_process_norms"):
        OmegaConf.register_new_resolver("single_process_norms", single_process_norms)


def single_process_norms() -> str:
    """Every registered norm that runs in one process, as a sweep value ("batch,group,..."): the GPU study
    sweeps the registry, not a list of its own (syncbatch needs several processes)."""
    from norm_experiments.norms import registry  # imports torch: only when a config asks for the list

    return ",".join(name for name, record in registry.records().items() if not record.syncs_ranks)


def config_cache_root() -> Path:
    """data.cache_dir as the data configs resolve it here: ${oc.env:NORM_EXP_CACHE,${oc.env:HOME,.}/.cache/
    norm-experiments}; relative (to the folder training starts in) when neither variable is set."""
    if "NORM_EXP_CACHE" in os.environ:
        return Path(os.environ["NORM_EXP_CACHE"])
    return Path(os.environ.get("HOME", ".")) / ".cache" / "norm-experiments"


def default_cache_root() -> Path:
    """Where a fetch puts tasks without --cache-dir: the data configs' cache root, as an absolute path."""
    return config_cache_root().expanduser().absolute()


def validate_config(cfg: DictConfig, extra: dict | None = None) -> None:
    """Refuse, naming the key, unknown keys, values of the wrong type or range (config_schema.SCHEMA, plus an
    app's own root keys in `extra`) and a dataset folder that does not exist."""
    config_schema.validate(cfg, extra)
    if cfg.data.get("fetch"):  # a preset for a dataset that norm-exp-fetch downloads
        root = Path(str(cfg.data.root)).expanduser()
        if not (root / "dataset.json").is_file():
            cache = Path(str(cfg.data.cache_dir)).expanduser().absolute()
            where = "" if cache == default_cache_root() else f" --cache-dir {shlex.quote(str(cache))}"
            raise UserError(
                f"data={cfg.data.preset}: dataset not found at {root}; run: norm-exp-fetch {cfg.data.fetch}{where}"
            )
    from norm_experiments.data import registry as layouts  # torch-free; lazily, as the schema reads it

    if cfg.data.layout not in layouts.generated():  # generated datasets have no root
        root = cfg.data.root
        if root is None or not Path(str(root)).expanduser().is_dir():
            raise UserError(f"data.root: dataset folder does not exist: {root}")


def path_argument(arg: str) -> Path:
    """The folder or file of a `key=PATH` argument (resume=, trained=, weights=), as Hydra would read it when the
    user quoted it (`resume='outputs/sweeps/s/norm=batch/seed=0'`, as our quoting advice says), else as typed:
    an unquoted run folder of a sweep holds '=' and ',' that Hydra's grammar refuses, and is taken literally."""
    raw = arg.split("=", 1)[1]
    if raw[:1] in ("'", '"'):
        from hydra.core.override_parser.overrides_parser import OverridesParser

        try:
            value = OverridesParser.create().parse_override(arg).value()
        except Exception:  # noqa: BLE001 - not Hydra's grammar after all: the text as typed
            value = raw
        raw = value if isinstance(value, str) else raw
    if not raw:  # Path("") is the current folder: the line would name "." as the folder given
        raise UserError(f"{arg}: empty; give a path")
    return Path(raw).expanduser()


def hydra_quote(value: str) -> str:
    """`value` as a single-quoted string of Hydra's override grammar, which reads it back unchanged: a quote
    is escaped, and so are the backslashes right before a quote or at the end (elsewhere one is itself)."""
    inner = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    inner = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, inner)
    return f"'{inner}'"


# What Hydra's override grammar reads in an unquoted value besides letters and digits (its OverrideLexer.g4:
# ID, UNQUOTED_CHAR, WS, and ':' as a plain value); '=', ',', '~', non-ASCII letters ... need quotes.
_UNQUOTED_OK = set("_-/\\+.$%*@?| \t:")


def quoting_problem(argv: list[str]) -> str | None:
    """An override Hydra would refuse, or would read as a sweep of Hydra's own settings, only because its
    value is not quoted: say how to quote it (Hydra's own message does not). None when there is none.

    E.g. a run folder named after its overrides: hydra.run.dir=outputs/runs/data.batch_size=2,norm=group.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        if value.startswith(("'", '"')):
            continue  # quoted already
        try:
            override = parser.parse_override(arg)
        except HydraException:
            pass  # refused: does quoting repair it?
        else:
            hydra_key = key.lstrip("+~").startswith("hydra.")
            if not (hydra_key and override.is_sweep_override() and "," in value):
                continue  # Hydra reads it (a comma elsewhere is a sweep: right for -m)
        quoted = f"{key}={hydra_quote(value)}"
        try:
            parser.parse_override(quoted)
        except HydraException:
            continue  # something else is wrong with it: Hydra's own message says what
        odd = dict.fromkeys(c for c in value if not (c.isascii() and c.isalnum()) and c not in _UNQUOTED_OK)
        what = ", ".join(repr(c) for c in odd) or "this value"
        return (
            f"{arg}: Hydra's command-line grammar reads {what} only in a quoted value; quote it as "
            f"{_shell_quoted(quoted)} (the outer quotes are for the shell, the inner ones for Hydra)"
        )
    return None


def _shell_quoted(arg: str) -> str:
    """arg as a user types it in a POSIX shell: in double quotes where they keep it as it is (no ", $, `,
    ! and no \\\\, which double quotes would read as one backslash)."""
    if any(c in arg for c in '"$`!') or "\\\\" in arg:
        return shlex.quote(arg)
    return f'"{arg}"'


def output_dir_problem(argv: list[str]) -> str | None:
    """Why the run or sweep folder named on the command line (by default the folders Hydra creates them in,
    outputs/runs and outputs/sweeps/NAME) cannot be created, or None.

    Checked before Hydra starts, because Hydra creates the folder first and would fail with a traceback.
    """
    named = [
        (arg, _override_value(arg)) for arg in argv if arg.startswith(("hydra.run.dir=", "hydra.sweep.dir="))
    ]
    names = [_override_value(arg) for arg in argv if arg.startswith("name=")]
    sweeps = f"outputs/sweeps/{names[-1]}" if names else "outputs/sweeps"
    for label, folder in named or [("outputs/runs", "outputs/runs"), (sweeps, sweeps)]:
        if not folder.strip():  # Hydra would write the run into the current folder, whatever it holds
            return f"{label}: names no folder"
        path = Path(folder).expanduser().absolute()
        while not path.exists():
            path = path.parent
        if not path.is_dir():
            return f"{label}: cannot create the folder, {path} is a file"
        if not os.access(path, os.W_OK):
            return f"{label}: cannot create the folder, {path} is not writable"
        full = full_disk_problem(path)  # Hydra writes multirun.yaml, and a run .hydra/, before any check
        if full:
            return f"{label}: {full}"
    subdirs = [_override_value(arg) for arg in argv if arg.startswith("hydra.sweep.subdir=")]
    if subdirs and "${" not in subdirs[-1]:  # a fixed folder for every run of the sweep
        sweep_dir = next((f for a, f in named if a.startswith("hydra.sweep.dir=")), sweeps)
        run_dir = Path(sweep_dir).expanduser() / subdirs[-1]
        if not subdirs[-1].strip():
            return "hydra.sweep.subdir: names no folder"
        if run_dir.exists() and not run_dir.is_dir():
            return f"hydra.sweep.subdir: cannot create the run folder, {run_dir} is a file"
    return None


def _override_value(arg: str) -> str:
    """The value of a KEY=VALUE override as Hydra reads it (quotes removed); as written if Hydra refuses it
    (it then says why itself) or it is not a plain string."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        value = OverridesParser.create().parse_override(arg).value()
    except HydraException:
        value = None
    return value if isinstance(value, str) else arg.split("=", 1)[1]
