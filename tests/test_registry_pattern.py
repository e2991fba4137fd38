"""One registry pattern for every plug-in (norm_experiments/plugins.py): a norm, a model and a dataset layout are
each one module that registers a record, one YAML file and one test row, and the registries are the only lists
of their names.

The run-time test adds a thirteenth norm, a fourth model and a new layout, each from one module written into a
temporary folder and one YAML file in a config folder of its own (given to Hydra with hydra.searchpath), and
finds each in the schema, the configuration reference, a sweep and the report; nothing else is edited."""

from __future__ import annotations

import ast
import importlib
import json
import sys
import textwrap
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import open_dict

from norm_experiments import config_reference, config_schema
from norm_experiments.config import CONFIG_DIR, register_resolvers, single_process_norms, validate_config
from norm_experiments.data import registry as layouts
from norm_experiments.errors import UserError
from norm_experiments.models import registry as models
from norm_experiments.norms import registry as norms
from norm_experiments.run_names import sweep_run_name

ROOT = Path(__file__).parents[1]
REGISTRIES = {"norm": norms.REGISTRY, "model": models.REGISTRY, "layout": layouts.REGISTRY}

# ---------------------------------------------------------------------------------------------------------
# The registries are the only lists


# Lists of registered names still outside the registries: (file, kind) -> why. The test fails when one is gone
# (remove it here) or a new one appears.
KNOWN_LEFT: dict[tuple[str, str], str] = {}


def name_lists(path: Path, kinds: dict[str, set[str]]) -> list[tuple[str, int, list[str]]]:
    """(kind, line, names) of each literal in `path` naming two or more registered names of one kind: a tuple,
    list or set, a dict's keys, or a call's arguments (`choice("unet", "dynunet")`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            items = node.elts
        elif isinstance(node, ast.Dict):
            items = [key for key in node.keys if key is not None]
        elif isinstance(node, ast.Call):
            items = node.args
        else:
            continue
        texts = {i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)}
        for kind, names in kinds.items():
            if len(texts & names) >= 2:
                found.append((kind, node.lineno, sorted(texts & names)))
    return found


def test_the_registries_are_the_only_lists_of_their_names() -> None:
    kinds = {kind: set(registry.names()) for kind, registry in REGISTRIES.items()}
    found: dict[tuple[str, str], list] = {}
    for folder in ("norm_experiments", "hydra_plugins"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for kind, line, names in name_lists(path, kinds):
                found.setdefault((str(path.relative_to(ROOT)), kind), []).append((line, names))
    unexpected = {where: lists for where, lists in found.items() if where not in KNOWN_LEFT}
    assert not unexpected, f"hard-coded lists of registered names (ask the registry instead): {unexpected}"
    assert set(KNOWN_LEFT) <= set(found), f"fixed: remove from KNOWN_LEFT {set(KNOWN_LEFT) - set(found)}"


def test_the_grep_finds_a_hard_coded_list(tmp_path: Path) -> None:
    source = tmp_path / "x.py"
    source.write_text(
        'A = ("unet", "dynunet")\nB = {"msd": 1, "folder": 2}\nC = choice("batch", "group")\nD = ("unet",)\n'
    )
    kinds = {kind: set(registry.names()) for kind, registry in REGISTRIES.items()}
    assert [(kind, line) for kind, line, _ in name_lists(source, kinds)] == [
        ("model", 1),
        ("layout", 2),
        ("norm", 3),
    ]


def test_the_model_and_layout_registries_import_no_torch() -> None:
    """The schema reads them before Hydra starts (command_line.py), where no torch is loaded."""
    import subprocess

    code = (
        "import sys\n"
        "from norm_experiments import config_schema\n"
        "assert config_schema.SCHEMA['model.name']('dynunet') is None\n"
        "assert config_schema.SCHEMA['data.layout']('nnunet') is None\n"
        "assert config_schema.plugin_keys() == {}\n"
        "assert 'torch' not in sys.modules, 'torch loaded'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------------------------------------
# A new norm, model and layout, each one module + one YAML file


NORM_MODULE = '''
"""A thirteenth norm: GroupNorm with two channels per group."""
from torch import nn

from norm_experiments.norms.options import Option, count, eps
from norm_experiments.norms.registry import NormRecord, register

register(NormRecord(
    name="pair_group",
    summary="GroupNorm with two channels per group",
    build=lambda channels, o: nn.GroupNorm(channels // o["per_group"], channels, eps=o["eps"]),
    options={"per_group": Option(2, count), "eps": eps()},
    config_dir=CONFIGS,
))
'''
NORM_YAML = "name: pair_group\noptions:\n  per_group: 2\n  eps: 1.0e-5\n"

MODEL_MODULE = '''
"""A fourth model: one conv, its norm and a 1x1 head. No torch until it is built."""
from norm_experiments.models.registry import ModelRecord, register
from norm_experiments.config_schema import integer


def build(model_cfg, spec, in_ch, out_ch, spacing=None):
    from torch import nn

    width = int(model_cfg.width)
    return nn.Sequential(spec.conv(in_ch, width), spec.norm(width), nn.ReLU(), nn.Conv3d(width, out_ch, 1))


def levels(model_cfg, patch_size, spacing=None):
    from norm_experiments.models import Level

    return [Level((1, 1, 1), int(model_cfg.width))]


register(ModelRecord(
    name="tiny",
    summary="one conv block and a 1x1 head",
    build=f"{__name__}:build",
    levels=f"{__name__}:levels",
    keys={"model.width": integer(1)},
    check=lambda node: "model.width must be even" if node.get("width", 0) % 2 else None,
    config_dir=CONFIGS,
))
'''
MODEL_YAML = "name: tiny\nwidth: 4   # channels of its one conv block\n"

LAYOUT_MODULE = '''
"""A new layout: scans/CASE.nii.gz and masks/CASE.nii.gz, classes from data.labels."""
from norm_experiments.config_schema import text
from norm_experiments.data.registry import LayoutRecord, register


def find(root, labels):
    from norm_experiments.data.layouts import Case, DatasetInfo

    cases = [
        Case(name=p.name.split(".")[0], images=(p,), label=root / "masks" / p.name)
        for p in sorted((root / "scans").glob("*.nii.gz"))
    ]
    return cases, DatasetInfo(root=root, layout="scans", num_channels=1, labels={0: "background", 1: "blob"})


register(LayoutRecord(
    name="scans",
    summary="scans/CASE.nii.gz and masks/CASE.nii.gz",
    find=f"{__name__}:find",
    keys={"data.scanner": text},
    config_dir=CONFIGS,
))
'''
LAYOUT_YAML = (
    "layout: scans\nroot: ???   # the folder holding scans/ and masks/\nscanner: any   # the scanner's name\n"
)


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each plug-in's module in tmp_path/modules (imported: it registers itself) and its YAML file in
    tmp_path/configs/GROUP/; the registries are as before afterwards. Returns the config folder."""
    configs, modules = tmp_path / "configs", tmp_path / "modules"
    modules.mkdir()
    for group, name, text in (("norm", "pair_group", NORM_YAML), ("model", "tiny", MODEL_YAML)):
        (configs / group).mkdir(parents=True)
        (configs / group / f"{name}.yaml").write_text(text)
    (configs / "data").mkdir()
    (configs / "data" / "scans.yaml").write_text(LAYOUT_YAML)
    saved = {kind: dict(registry.records()) for kind, registry in REGISTRIES.items()}
    monkeypatch.syspath_prepend(str(modules))
    try:
        for module, source in (
            ("plugin_norm", NORM_MODULE),
            ("plugin_model", MODEL_MODULE),
            ("plugin_layout", LAYOUT_MODULE),
        ):
            header = f"from pathlib import Path\nCONFIGS = Path({str(configs)!r})\n"
            (modules / f"{module}.py").write_text(header + textwrap.dedent(source))
            importlib.import_module(module)
        yield configs
    finally:
        for kind, registry in REGISTRIES.items():
            registry.by_name.clear()
            registry.by_name.update(saved[kind])
        for module in ("plugin_norm", "plugin_model", "plugin_layout"):
            sys.modules.pop(module, None)


def compose_with(configs: Path, overrides: list[str], hydra: bool = False):
    register_resolvers()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose(
            "train",
            overrides=[f"hydra.searchpath=[file://{configs}]", *overrides],
            return_hydra_config=hydra,
        )


def usable(cfg):
    """The config a run gets (without Hydra's node), validated as norm-exp-train validates it."""
    with open_dict(cfg):
        cfg.pop("hydra", None)
    validate_config(cfg)
    return cfg


NEW = ["norm=pair_group", "model=tiny", "data=scans"]


def test_a_new_norm_model_and_layout_are_in_the_schema(plugins: Path, tmp_path: Path) -> None:
    root = f"data.root={tmp_path}"
    cfg = usable(compose_with(plugins, [*NEW, root]))
    assert (cfg.norm.name, cfg.model.name, cfg.data.layout) == ("pair_group", "tiny", "scans")
    assert norms.get("pair_group").options["per_group"].default == 2
    # Each works where it is used: the network with the new norm, the cases of the new layout.
    import torch

    from norm_experiments.data.layouts import find_cases
    from norm_experiments.models import build_model, model_levels
    from norm_experiments.norms import make_norm_spec

    net = build_model(cfg.model, make_norm_spec(cfg.norm.name, **cfg.norm.options), 1, 2)
    assert net(torch.zeros(1, 1, 8, 8, 8)).shape == (1, 2, 8, 8, 8)
    assert isinstance(net[1], torch.nn.GroupNorm) and net[1].num_groups == 2
    assert model_levels(cfg.model, [8, 8, 8])[-1].channels == 4
    for folder in ("scans", "masks"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "case1.nii.gz").touch()
    cases, info = find_cases("scans", tmp_path)
    assert [c.name for c in cases] == ["case1"] and info.layout == "scans"
    for bad, message in (
        (["model.name=tiyn"], "model.name: must be one of basic_unet, dynunet, tiny, unet, got 'tiyn'"),
        (["data.layout=scan"], "data.layout: must be one of brain, folder, msd, nnunet, scans, synthetic"),
        (["model.width=0"], "model.width: must be a whole number >= 1, got 0"),  # the model's own key
        (["model.width=3"], "model=tiny: model.width must be even"),  # the model's own check
        (["data.scanner=3"], "data.scanner: must be a string, got 3"),  # the layout's own key
        (["+model.widht=2"], "model.widht: not a key this project reads; did you mean model.width?"),
    ):
        with pytest.raises(UserError) as err:
            config_schema.validate(compose_with(plugins, [*NEW, root, *bad]))
        assert str(err.value).startswith(message), err.value
    with pytest.raises(UserError, match="did you mean 'pair_group'"):
        norms.get("pair_gruop")


def test_a_new_norm_model_and_layout_are_in_the_configuration_reference(plugins: Path) -> None:
    page = config_reference.with_tables((ROOT / "docs" / "reference" / "configuration.md").read_text())
    lines = page.splitlines()
    for kind, name, summary in (
        ("norm", "pair_group", "GroupNorm with two channels per group"),
        ("model", "tiny", "one conv block and a 1x1 head"),
        ("dataset layout", "scans", "scans/CASE.nii.gz and masks/CASE.nii.gz"),
    ):
        assert any(line.startswith(f"| {kind} | `{name}` | `{plugins}") and summary in line for line in lines)
    groups = {line.split("|")[1].strip(): line.split("|")[2] for line in lines if line.startswith("| `")}
    assert (
        "`pair_group`" in groups["`norm`"] and "`tiny`" in groups["`model`"] and "`scans`" in groups["`data`"]
    )
    assert "| `model.name` | one of basic_unet, dynunet, tiny, unet |" in page
    assert "| `data.layout` | one of brain, folder, msd, nnunet, scans, synthetic |" in page
    assert (
        "| `model.width` | a whole number >= 1 | `model=tiny`: `4` | channels of its one conv block |" in page
    )
    assert "| `data.scanner` | a string | `data=scans`: `any` | the scanner's name |" in page


def test_a_new_norm_model_and_layout_are_in_a_sweep(plugins: Path, tmp_path: Path) -> None:
    """The study's norm sweep takes every single-process norm from the registry; a sweep over models and
    layouts composes and validates each run, named by what it varies."""
    assert "pair_group" in single_process_norms().split(",")
    study = compose_with(plugins, ["experiment=norm_sweep"], hydra=True)
    assert "pair_group" in str(study.hydra.sweeper.params.norm).split(",")
    command = ["norm=pair_group,group", "model=tiny,unet", "data=scans", f"data.root={tmp_path}"]
    parsed = OverridesParser.create().parse_overrides(command)
    (jobs,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    assert len(jobs) == 4
    names = []
    for job in jobs:
        cfg = usable(compose_with(plugins, list(job)))
        assert cfg.data.layout == "scans"
        names.append(sweep_run_name(job, ["norm", "model"], ["data.root"]))
    assert "norm=pair_group/model=tiny" in names


def test_a_new_norm_model_and_layout_are_in_the_report(plugins: Path, tmp_path: Path) -> None:
    """Run records (metrics.json) naming the new norm, model and dataset are rows of the report."""
    from norm_experiments.report import build_report
    from tests.report.conftest import make_metrics

    sweep = tmp_path / "sweep"
    for norm, model, dice in (
        ("pair_group", "tiny", 0.8),
        ("pair_group", "unet", 0.75),
        ("group", "tiny", 0.7),
    ):
        for batch_size in (1, 2):
            for seed in range(3):
                run = sweep / f"norm={norm}" / f"model={model}" / f"bs={batch_size}" / f"seed={seed}"
                run.mkdir(parents=True)
                score, run_id = dice + 0.01 * seed, f"{norm}-{model}-{batch_size}-{seed}"
                record = make_metrics(
                    norm, batch_size, seed, score, model=model, dataset="scans", run_id=run_id
                )
                (run / "metrics.json").write_text(json.dumps(record))
    report = build_report([sweep])
    (summary,) = report.analysis.conditions
    assert {"pair_group [model=tiny]", "pair_group [model=unet]", "group"} == set(summary.rows)
    assert len(report.collection.runs) == 18 and not report.collection.unreadable
    assert {run.data["dataset"] for run in report.collection.runs} == {"scans"}
    assert "pair_group [model=tiny]" in report.markdown


@pytest.mark.slow
def test_an_outside_norm_trains_through_the_command_line(plugins: Path, tmp_path: Path) -> None:
    """own_model.md: "import its module before the config is checked" had no way on the command line;
    NORM_EXP_PLUGINS names the module, and a module that cannot be imported is one line."""
    import os
    import subprocess

    from tests.helpers import SMOKE, metrics_of

    def run(
        plugins_env: str,
    ) -> subprocess.CompletedProcess:  # a fresh interpreter: PYTHONPATH as a user sets it
        env = {**os.environ, "NORM_EXP_PLUGINS": plugins_env, "PYTHONPATH": str(tmp_path / "modules")}
        command = [sys.executable, "-m", "norm_experiments.train", *args]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    args = [
        *SMOKE,
        "norm=pair_group",
        f"hydra.searchpath=[file://{plugins}]",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    result = run("plugin_norm")
    assert result.returncode == 0, result.stderr[-2000:]
    assert metrics_of(tmp_path / "run")["norm"] == "pair_group"
    broken = run("plugin_norm,no_such_module")
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    assert "error: NORM_EXP_PLUGINS: cannot import no_such_module (ModuleNotFoundError" in broken.stderr
