"""A command line checked against the configs before Hydra runs it.

Hydra refuses a wrong group option (`norm=gruop`) or an unknown key (`data.batchsize=2`) with twenty lines,
no "did you mean", exit status 1 and, for a key, advice to add it with `+` (a key nothing reads); a bad value
is only found after Hydra has created the run folder. Here each of them is one line naming the closest valid
names, checked before anything is created, so the command exits 2 with nothing left behind.

Torch-free itself (it runs before every command but `--help`); an app's `validate_run` may bring torch.
"""

from __future__ import annotations

import difflib
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from norm_experiments import safe_io
from norm_experiments.config import CONFIG_DIR, hydra_quote, path_argument, register_resolvers
from norm_experiments.errors import UserError

# Hydra flags after which Hydra alone decides what happens (help, printing the config, shell completion,
# another config path or name): the command line is left to Hydra. --config-dir is checked with its folder.
_HYDRA_ONLY_FLAGS = (
    "--help",
    "-h",
    "--hydra-help",
    "--cfg",
    "-c",
    "--info",
    "-i",
    "--shell-completion",
    "-sc",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--package",
    "-p",
)
_MULTIRUN_FLAGS = ("-m", "--multirun")
# Most compositions one command line may cost (each swept value of a key is checked in one composition).
_MAX_COMPOSITIONS = 48

Validate = Callable[[DictConfig], None]  # raises UserError naming the key


def single_run_argv(argv: list[str], command: str) -> list[str]:
    """argv of a command that runs once (norm-exp-check, norm-exp-explain), with hydra.mode=RUN added: a sweep
    preset (experiment=norm_sweep_quick sets hydra.mode: MULTIRUN) would otherwise start its sweeper. A
    multirun asked for on the command line is refused (it would create a sweep folder before any check)."""
    asked = [a for a in argv[1:] if a in _MULTIRUN_FLAGS or a.lstrip("+~").startswith("hydra.mode=")]
    if any(a in _MULTIRUN_FLAGS or a.split("=", 1)[1].strip("'\"") != "RUN" for a in asked):
        raise UserError(f"{command} runs once: drop {' '.join(asked)}")
    overrides, flags = _split_flags([a for a in argv[1:] if a not in asked])
    return [argv[0], *overrides, "hydra.mode=RUN", *flags]


def _split_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """(key=value overrides, the rest: flags and their values, in order). Hydra's argparse takes the overrides
    in one run: an override added after `--cfg job` ended in "unrecognized arguments"."""
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    return overrides, [a for a in args if a not in overrides]


def replay_run_argv(argv: list[str], key: str, value: Callable[[Path], Path] | None = None) -> list[str]:
    """`key=RUN_DIR` (the last one given): that run's own overrides (as resume= replays them:
    run_folder.replayable_overrides), then the rest of the command line (which wins), then
    key=value(RUN_DIR), quoted (run folders of a sweep hold '=' and ','). Unchanged without `key=`."""
    given = [a for a in argv[1:] if a.startswith(f"{key}=")]
    if not given:
        return argv
    from norm_experiments.training.run_folder import replayable_overrides

    run_dir = path_argument(given[-1])
    rest = [a for a in argv[1:] if not a.startswith(f"{key}=")]
    overrides = replayable_overrides(run_dir, CONFIG_DIR, key, rest)
    target = value(run_dir) if value else run_dir
    given_overrides, flags = _split_flags(rest)
    return [argv[0], *overrides, *given_overrides, f"{key}={hydra_quote(str(target))}", *flags]


def command_line_problem(
    argv: list[str], config_name: str, validate: Validate | None = None, validate_run: Validate | None = None
) -> str | None:
    """What is wrong with the overrides of `argv` for the root config `config_name`, in one line, or None.

    Checked: Hydra's grammar, each group option (every value of a sweep), each key that is not added with
    `+`, the keys Hydra would write outside the run folder with, a SLURM launcher without SLURM, with
    `validate` every value of the composed config (each swept value once) and, for a single run (not a sweep,
    whose impossible cells are recorded as failed runs while the others go on), `validate_run`."""
    try:
        check_command_line(argv, config_name, validate, validate_run)
    except UserError as err:
        return str(err)
    except Exception:  # noqa: BLE001 - a check of ours that fails is no reason to refuse: Hydra decides
        return None
    return None


def check_command_line(
    argv: list[str], config_name: str, validate: Validate | None = None, validate_run: Validate | None = None
) -> None:
    """command_line_problem's checks, raising UserError; any other exception is a bug of the check."""
    _check_modes(argv)
    _check_config_dirs(argv)
    if any(arg.split("=", 1)[0] in _HYDRA_ONLY_FLAGS for arg in argv):
        return
    if any(arg.lstrip("+").startswith("hydra.searchpath=") for arg in argv):
        return  # config folders of the user's own (plug-ins outside configs/): their options are Hydra's to find
    typed_dirs, rest = _config_dir_args(argv)
    config_dirs = [Path(d).expanduser().absolute() for d in typed_dirs]
    overrides = [arg for arg in rest if arg not in _MULTIRUN_FLAGS]
    multirun = any(arg in _MULTIRUN_FLAGS for arg in argv)
    _check(overrides, config_name, validate, validate_run, multirun, config_dirs)


# Hydra runs one of these at a time; two of them end in its ValueError and a traceback.
_MODE_FLAGS = {
    "-m": "--multirun",
    "--multirun": "--multirun",
    "-c": "--cfg",
    "--cfg": "--cfg",
    "-i": "--info",
    "--info": "--info",
    "-sc": "--shell-completion",
    "--shell-completion": "--shell-completion",
}


def _check_modes(argv: list[str]) -> None:
    given = sorted({_MODE_FLAGS[arg.split("=", 1)[0]] for arg in argv if arg.split("=", 1)[0] in _MODE_FLAGS})
    if len(given) > 1:
        raise UserError(
            f"{' and '.join(given)}: Hydra does one of them at a time (e.g. drop --multirun to print one run's "
            "config with --cfg job)"
        )
    # Hydra's own ValueError and traceback before, for the flag alone
    if "--shell-completion" in given and not any(a.startswith(_COMPLETION_ACTIONS) for a in argv):
        raise UserError(
            "--shell-completion: say what to do: --shell-completion install=bash (or fish; print the script "
            "to source), or uninstall=bash"
        )


_COMPLETION_ACTIONS = ("install=", "uninstall=", "query=")


def _check_config_dirs(argv: list[str]) -> None:
    """--config-dir DIR (docs/howto/sweeps.md: your own experiment files) names an existing folder, relative
    to the current one as Hydra reads it; Hydra's own refusal is three lines and exit status 1."""
    for typed in _config_dir_args(argv)[0]:
        if not Path(typed).expanduser().is_dir():
            raise UserError(f"--config-dir {typed}: no such folder (from {Path.cwd()})")


def _config_dir_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the --config-dir folder as typed, in a list: Hydra takes the last one given; the arguments without the
    flags and their values)."""
    dirs, rest, skip = [], [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        flag, eq, value = arg.partition("=")
        if flag in ("--config-dir", "-cd"):
            if not eq:
                value, skip = (argv[i + 1] if i + 1 < len(argv) else ""), True
            dirs.append(value)
            continue
        rest.append(arg)
    return dirs[-1:], rest


def _check(
    overrides: list[str],
    config_name: str,
    validate: Validate | None,
    validate_run: Validate | None,
    multirun: bool,
    config_dirs: Sequence[Path] = (),
) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    loader = _config_loader(config_dirs)
    parsed = []
    for arg in overrides:
        try:
            parsed.append(OverridesParser.create().parse_override(arg))
        except HydraException as err:
            raise UserError(f"{arg}: {_first_line(err)}") from None
    parsed = [o for o in parsed if not _is_glob(o)]  # a glob picks existing options by itself
    for override in parsed:
        _check_duplicate_keys(override)
    groups = [o for o in parsed if _is_group(loader, o)]
    for override in groups:
        _check_group_option(loader, override, config_dirs)
    first = [_with_value(o, _values(o)[0]) for o in parsed]
    try:
        composed = _compose(loader, config_name, first)
    except UserError:  # Hydra's first line; an unknown key gets a better one, with the closest keys
        base = _compose(loader, config_name, [_with_value(o, _values(o)[0]) for o in groups])
        for override in parsed:
            if override not in groups and not (
                override.is_add() or override.is_force_add() or override.is_delete()
            ):
                _check_key(base, override.key_or_group, override.input_line or "", config_name)
        raise
    _check_hydra_keys(parsed)
    _check_norm_name(composed)
    _check_launcher(composed, multirun)
    _check_sweep_folder(composed, multirun)
    _check_study(composed, overrides, multirun, loader)
    _check_same_fixed_keys(composed, parsed, multirun)
    if validate is not None:
        _validate(validate, composed)
        for variant in _one_value_changed(parsed):
            _validate(validate, _compose(loader, config_name, variant))
    if validate_run is not None and not _is_multirun(composed, multirun):
        _validate(validate_run, composed)


def _check_duplicate_keys(override) -> None:  # noqa: ANN001 - Hydra's Override
    """A dictionary value that names a key twice ('data.labels={0:bg,1:fg,1:x}'): Hydra keeps the last one
    silently, so a class the user named is gone."""
    text = override.input_line or ""
    if "{" not in text or not isinstance(override.value(), dict):
        return
    body = text[text.index("{") + 1 : text.rindex("}")] if "}" in text else ""
    keys, depth, item = [], 0, ""
    for char in body + ",":  # the top-level items: commas inside a nested list or dict do not split
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        if char == "," and depth == 0:
            keys.append(item.split(":", 1)[0].strip().strip("'\""))
            item = ""
        else:
            item += char
    twice = sorted({k for k in keys if keys.count(k) > 1 and k})
    if twice:
        raise UserError(
            f"{text}: the key {twice[0]} is given twice; each key once (Hydra would keep the last)"
        )


def _check_norm_name(cfg: DictConfig) -> None:
    """norm.name names the norm file that was chosen; set to another norm, the options of one met the name of
    the other, and the error blamed an option ("norm.options.momentum: not an option of norm 'group')."""
    chosen = cfg.hydra.runtime.choices.get("norm") if "hydra" in cfg else None
    name = cfg.get("norm", {}).get("name") if isinstance(cfg.get("norm"), DictConfig) else None
    if chosen and name is not None and str(name) != str(chosen).rsplit("/", 1)[-1]:
        raise UserError(
            f"norm.name={name}: the norm is chosen with norm={name} (norm.name is set by the chosen file, here "
            f"norm={chosen}, and must stay its name)"
        )


def _validate(validate: Validate, cfg: DictConfig) -> None:
    """The app's own checks on the config without Hydra's node (whose run-time values do not exist yet)."""
    validate(OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"]))


def _config_loader(config_dirs: Sequence[Path] = ()):
    """Hydra's config loader over configs/ and the installed plugins' configs, as `hydra.main` builds it, with
    the --config-dir folders first (as Hydra puts them)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.plugins import Plugins

    register_resolvers()
    Plugins.instance()  # registers the launchers' and sweepers' configs (hydra/launcher=joblib, ...)
    search_path = create_config_search_path(str(CONFIG_DIR))
    for folder in config_dirs:
        search_path.prepend("command-line", f"file://{folder}")
    return ConfigLoaderImpl(config_search_path=search_path)


def _is_group(loader, override) -> bool:
    return bool(override.package is None and loader.repository.group_exists(override.key_or_group))


def _values(override) -> list[Any]:
    """The values of an override: every value of a choice or range sweep, the one value otherwise."""
    if not override.is_sweep_override():
        return [override.value()]
    return list(override.sweep_iterator())


def _is_glob(override) -> bool:
    from hydra.core.override_parser.types import ValueType

    return override.value_type == ValueType.GLOB_CHOICE_SWEEP


def _with_value(override, value: Any) -> str:
    """The override with one value, in Hydra's grammar."""
    prefix = (
        "++" if override.is_force_add() else "+" if override.is_add() else "~" if override.is_delete() else ""
    )
    if not override.is_sweep_override():
        return override.input_line
    return f"{prefix}{override.get_key_element()}={_grammar(value)}"


def _grammar(value: Any) -> str:
    from norm_experiments.config import hydra_quote

    if isinstance(value, str):
        return value if re.fullmatch(r"[A-Za-z0-9_./-]+", value) else hydra_quote(value)
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _check_group_option(loader, override, config_dirs: Sequence[Path] = ()) -> None:
    group = override.key_or_group
    options = loader.get_group_options(group)
    for value in _values(override):
        if value is None or override.is_delete() or value in options:
            continue
        misplaced = [d / f"{value}.yaml" for d in config_dirs if (d / f"{value}.yaml").is_file()]
        if misplaced:  # sweeps.md: a group's options lie in a folder named after the group
            raise UserError(
                f"{group}={value}: {misplaced[0]} lies in the --config-dir folder itself, where Hydra does not "
                f"look for {group} options: move it to {misplaced[0].parent / group / misplaced[0].name}"
            )
        close = difflib.get_close_matches(str(value), options, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise UserError(f"{group}={value}: no such option; {hint}The options: {', '.join(options)}")


# The command whose --help lists the keys of each root config.
COMMANDS = {"train": "norm-exp-train", "check": "norm-exp-check", "explain": "norm-exp-explain"}


def _check_key(cfg: DictConfig, key: str, arg: str, config_name: str = "train") -> None:
    """A key set without `+` must exist: name the closest keys that do."""
    from omegaconf.errors import MissingMandatoryValue

    sentinel = object()
    try:  # a key whose value is still to be given (`weights: ???`) exists: select hands back the default
        if OmegaConf.select(cfg, key, default=sentinel, throw_on_missing=True) is not sentinel:
            return
    except MissingMandatoryValue:
        return
    keys = list(_key_paths(OmegaConf.to_container(cfg, resolve=False)))
    if not key.startswith("hydra."):
        keys = [k for k in keys if not k.startswith("hydra.")]
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    command = COMMANDS.get(config_name, "norm-exp-train")
    raise UserError(f"{arg}: {key} is not a key of the config{hint} ({command} --help lists them)")


def _key_paths(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}{key}"
            yield path
            yield from _key_paths(value, path + ".")


def _check_hydra_keys(parsed: list) -> None:
    """Hydra keys that would make a command write outside its run folder, or over a run's saved files."""
    for override in parsed:
        key = override.key_or_group
        if key == "hydra.output_subdir":
            raise UserError(
                f"{override.input_line}: hydra.output_subdir cannot be set: a run writes its own .hydra/ "
                "once it holds its folder (docs/reference/run_folder.md)"
            )
        if key == "hydra.job.name":
            for value in _values(override):
                if not isinstance(value, str) or not value or "/" in value or value in (".", ".."):
                    raise UserError(f"{override.input_line}: hydra.job.name must be a plain name (no '/')")


def _check_launcher(cfg: DictConfig, multirun: bool) -> None:
    target = str(OmegaConf.select(cfg, "hydra.launcher._target_", default="") or "")
    if "SlurmLauncher" in target and _is_multirun(cfg, multirun) and not shutil.which("sbatch"):
        raise UserError(
            "hydra/launcher=slurm: SLURM's sbatch is not on PATH here; start the sweep on a SLURM login "
            "node, or run it here with hydra/launcher=joblib"
        )


# What a sweep folder of ours holds besides its run folders: a folder without multirun.yaml that holds files is
# someone else's (a paper's folder, another tool's output), and the end-of-sweep report would replace its
# report.md, results.csv and runs.csv.
SWEEP_MARKER = "multirun.yaml"


def _is_multirun(cfg: DictConfig, multirun_flag: bool) -> bool:
    """-m on the command line, or a preset that sweeps by itself (hydra.mode: MULTIRUN)."""
    return multirun_flag or str(OmegaConf.select(cfg, "hydra.mode", default="")).endswith("MULTIRUN")


def _sweep_folder(cfg: DictConfig, multirun: bool) -> Path | None:
    """The folder a multirun writes in (None for a single run, or one only Hydra's run time resolves)."""
    if not _is_multirun(cfg, multirun):
        return None
    try:
        return Path(str(OmegaConf.select(cfg, "hydra.sweep.dir"))).expanduser()
    except Exception:  # noqa: BLE001 - an interpolation only Hydra's run time resolves: Hydra decides
        return None


def _holds_files_of_its_own(folder: Path) -> bool:
    """Anything but a sweep's bookkeeping (a sweep refused before Hydra wrote multirun.yaml leaves its lock)."""
    from norm_experiments.sweep.progress import BOOKKEEPING

    return any(path.name not in BOOKKEEPING for path in folder.iterdir())


def _check_sweep_folder(cfg: DictConfig, multirun: bool) -> None:
    folder = _sweep_folder(cfg, multirun)
    if folder is None:
        return
    if folder.is_dir() and not (folder / SWEEP_MARKER).exists() and _holds_files_of_its_own(folder):
        raise UserError(
            f"hydra.sweep.dir={folder}: the folder holds files but no {SWEEP_MARKER}, so it is not a sweep's; "
            "its files would be replaced by the sweep's report: choose a new or empty folder"
        )
    link = safe_io.link_problem(folder) if folder.is_dir() else None
    if link:
        raise UserError(f"hydra.sweep.dir={folder}: {link}")


def sweep_folder_problem(cfg: DictConfig) -> str | None:
    """The sweep folder's checks of command_line_problem (links, another config's folder, fixed keys changed)
    for a multirun Hydra has composed: run again by the sweep's first callback, for a preset from --config-dir
    whose command line is left to Hydra (check_command_line)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(cfg.hydra.overrides.task))
        _check_sweep_folder(cfg, True)
        _check_same_fixed_keys(cfg, parsed, True)
    except UserError as err:
        return str(err)
    return None


def _check_same_fixed_keys(cfg: DictConfig, parsed: list, multirun: bool) -> None:
    """A sweep run again in its folder, over runs that have a result, gives every key that is not swept as its
    runs were made with (a swept key may take more values; trainer.overwrite=true retrains in place): a changed
    key made each finished run refuse its folder while the sweep ended "skipped (already completed)" with the
    old scores, under a multirun.yaml naming the new command."""
    folder = _sweep_folder(cfg, multirun)
    saved = _previous_sweep(folder / SWEEP_MARKER) if folder is not None else None
    if saved is None or not _holds_a_result(folder):
        return
    before, now = _fixed_and_swept(saved[0], saved[1]), _fixed_and_swept(parsed, OmegaConf.to_container(cfg))
    if now[0].get("trainer.overwrite", (False,))[0] is True:
        return
    from norm_experiments.run_names import EXECUTION_KEYS

    (fixed_before, swept_before), (fixed_now, swept_now) = before, now
    keys = (set(fixed_before) | set(fixed_now)) - swept_before - swept_now - set(EXECUTION_KEYS)
    changed = sorted(k for k in keys if fixed_before.get(k, (None,))[0] != fixed_now.get(k, (None,))[0])
    if not changed:
        return
    said = lambda fixed, key: f"{key}={fixed[key][1]}" if key in fixed else f"no {key}="  # noqa: E731
    key = changed[0]
    more = f" (and {len(changed) - 1} more key(s))" if len(changed) > 1 else ""
    raise UserError(
        f"hydra.sweep.dir={folder}: its runs were made with {said(fixed_before, key)} and this command gives "
        f"{said(fixed_now, key)}{more}; a sweep's runs share every key but the swept ones: give the keys as "
        "before (a swept key may take more values), run in a new folder (name=NEW), or retrain its runs in "
        "place (trainer.overwrite=true)"
    )


def _holds_a_result(folder: Path) -> bool:
    """A run below `folder` has weights or a checkpoint: what a changed config would leave beside new runs."""
    return any(any(folder.rglob(name)) for name in ("model.pt", "checkpoint.pt"))


def _previous_sweep(multirun_yaml: Path) -> tuple[list, dict] | None:
    """(parsed command-line overrides, the composed config) a sweep folder's multirun.yaml says its runs were
    made with, or None (no file, or one that cannot be read: the runs' own identity checks still guard their
    results)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from norm_experiments import safe_yaml

    if not multirun_yaml.is_file():
        return None
    try:
        saved = safe_yaml.load(safe_io.read_text(multirun_yaml, safe_io.MAX_YAML_BYTES), multirun_yaml)
        task = saved["hydra"]["overrides"]["task"]
        if not isinstance(task, list) or not all(isinstance(t, str) for t in task):
            return None
        return OverridesParser.create().parse_overrides(task), saved
    except Exception:  # noqa: BLE001 - not ours to judge here (see the docstring)
        return None


# The study sweeper runs these itself (the questions' cells, the looks' seeds): swept whatever the command says
_STUDY_SWEEPS = {"norm", "data.batch_size", "seed"}


def _fixed_and_swept(parsed: list, config: Any) -> tuple[dict[str, tuple[Any, str]], set[str]]:
    """{key: (value, value as typed)} of the overrides that give one value, and the keys swept: on the command
    line, by the preset's hydra.sweeper.params, or by the study sweeper. `config`: the sweep's config as plain
    data (its hydra.sweeper section)."""
    sweeper = config.get("hydra", {}).get("sweeper", {}) if isinstance(config, dict) else {}
    params = sweeper.get("params") if isinstance(sweeper, dict) else None
    swept = {str(k).lstrip("+~") for k in params} if isinstance(params, dict) else set()
    if isinstance(sweeper, dict) and sweeper.get("study") is not None:
        swept |= _STUDY_SWEEPS
    fixed = {}
    for override in parsed:
        key = override.key_or_group
        if key.startswith("hydra"):
            continue
        if override.is_sweep_override():
            swept.add(key)
        else:
            fixed[key] = (override.value(), override.get_value_element_as_str())
    return fixed, swept


def _check_study(cfg: DictConfig, overrides: list[str], multirun: bool, loader) -> None:  # noqa: ANN001
    """A study preset's questions against the cells its command line runs (sweep/study.py plan_study), before
    Hydra writes the sweep folder's multirun.yaml over a finished study's."""
    study = OmegaConf.select(cfg, "hydra.sweeper.study")
    if not _is_multirun(cfg, multirun) or study is None:
        return
    from norm_experiments.sweep.study import design_change_problem, plan_study

    task = [o for o in overrides if not o.lstrip("+~").startswith("hydra.")]  # what Hydra hands the sweeper
    design, _ = plan_study(study, OmegaConf.select(cfg, "hydra.sweeper.params"), task, cfg, loader)
    folder = _sweep_folder(cfg, multirun)
    problem = design_change_problem(folder, design) if folder is not None else None
    if problem:
        raise UserError(problem)


def _one_value_changed(parsed: list) -> Iterator[list[str]]:
    """Override lists in which one swept key takes one of its later values (the first values are checked
    already): each value of a sweep is checked once, not every combination."""
    firsts = [_with_value(o, _values(o)[0]) for o in parsed]
    budget = _MAX_COMPOSITIONS
    for i, override in enumerate(parsed):
        for value in _values(override)[1:]:
            if budget == 0:
                return
            budget -= 1
            yield [*firsts[:i], _with_value(override, value), *firsts[i + 1 :]]


def _compose(loader, config_name: str, overrides: list[str]) -> DictConfig:
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = loader.load_configuration(config_name, overrides, RunMode.RUN)
        OmegaConf.to_container(cfg, resolve=False)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        raise UserError(_first_line(err)) from None
    return cfg


def _first_line(err: BaseException) -> str:
    """Hydra's message in one line: its first line, with the next where the first only announces it ("...
    ConfigKeyError raised while composing config:" then "Key 'n_jobs' not in 'BasicLauncherConf'")."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
