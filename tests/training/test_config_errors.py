"""Mistakes in a command or a dataset stop before training: one line naming the key or file, exit != 0,
no traceback, and nothing left behind that could pass for a result."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from norm_experiments import config_schema
from norm_experiments.config import CONFIG_DIR, quoting_problem
from norm_experiments.errors import UserError
from norm_experiments.train import resume_argv
from norm_experiments.training.build import make_plan
from tests.helpers import assert_clean_failure, compose_config, no_result_left, run_cli


@pytest.mark.slow  # a subprocess of the real CLI
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["norm=gruop"], "error: norm=gruop: no such option; did you mean group or ws_group?"),
        (
            ["data.batchsize=2"],
            "error: data.batchsize=2: data.batchsize is not a key of the config; did you mean data.batch_size",
        ),
        (["-m", "norm=batch,gruop", "seed=0,1"], "error: norm=gruop: no such option; did you mean group"),
        (["data.batch_size=0"], "error: data.batch_size: must be a whole number >= 1, got 0"),
        # the norm registry's check (the run's plan), also before Hydra makes the folder
        (["experiment=smoke", "norm=group", "norm.options.num_groups=3"], "does not divide 8 channels"),
    ],
)
def test_a_wrong_option_key_or_value_is_one_line_exit_2_and_no_folder(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    """Checked before Hydra creates anything: no run folder, no .lock, no log (Hydra's own refusal used to
    be twenty lines with exit status 1, advising `+data.batchsize=2`, a key nothing reads)."""
    result = run_cli(args, cwd=tmp_path)
    assert_clean_failure(result, needle)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "+data.batchsize" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["norm=gruop"], "norm=gruop: no such option; did you mean group or ws_group? The options: batch,"),
        (["hydra/launcher=jobib"], "hydra/launcher=jobib: no such option; did you mean joblib?"),
        (["experiment=norm_sweep_qiuck"], "did you mean norm_sweep_quick"),
        (["model.depht=3"], "model.depht is not a key of the config; did you mean model.depth"),
        (["-m", "seed=0,1", "data.batch_size=1,0"], "data.batch_size: must be a whole number >= 1, got 0"),
        (["-m", "seed=range(0,3)", "trainer.samples=-1"], "trainer.samples: must be a whole number >= 1"),
        (["data.patch_size=[16,16]"], "data.patch_size: must be a list of 3 whole numbers"),
        # each valid alone; together the remedies were silently not scored
        (
            ["trainer.eval_modes=false", "trainer.remedy_modes=true"],
            "trainer.remedy_modes=true: the remedies",
        ),
        (["norm=group", "+trainer.sampels=4"], "trainer.sampels: not a key this project reads; did you mean"),
        (["hydra.job.name=../../x"], "hydra.job.name must be a plain name"),
        (["hydra.output_subdir=.hydra"], "hydra.output_subdir cannot be set"),
        (["norm=group,"], "norm=group,:"),  # Hydra's grammar, its first line
        # Hydra's own ValueError and traceback before: two of its modes at once
        (["-m", "seed=0,1", "--cfg", "job"], "--cfg and --multirun: Hydra does one of them at a time"),
        (["--info", "-m", "seed=0"], "--info and --multirun: Hydra does one of them at a time"),
        (["--shell-completion"], "--shell-completion: say what to do: --shell-completion install=bash"),
        (["-sc"], "--shell-completion: say what to do"),
        (
            ["--config-dir", "no_such_folder", "experiment=mine"],
            "--config-dir no_such_folder: no such folder",
        ),
        (["--config-dir=/no/such/folder"], "--config-dir /no/such/folder: no such folder"),
        # the sweep's folder is outputs/sweeps/<name>: ../x would be outputs/x
        (["-m", "seed=0", "name=../escape"], "name: must be a folder name under outputs/sweeps/"),
        (["-m", "seed=0", "name=/tmp/mine"], "no leading '/'), got '/tmp/mine'"),
        # the options of one norm checked against another's name blamed an option
        (["norm=group", "norm.name=batch"], "norm.name=batch: the norm is chosen with norm=batch"),
        # Hydra keeps the last of a key given twice: the class named first was gone without a word
        (["data.labels={0:bg,1:fg,1:x}"], "data.labels={0:bg,1:fg,1:x}: the key 1 is given twice"),
        # Hydra's first line only announced its error ("... raised while composing config:"): the next says what
        (["experiment=norm_sweep_quick", "hydra/launcher=basic"], "Key 'n_jobs' not in 'BasicLauncherConf'"),
    ],
)
def test_command_line_problems_name_the_closest_valid_names(argv: list[str], needle: str) -> None:
    from norm_experiments.command_line import command_line_problem
    from norm_experiments.config import validate_config

    problem = command_line_problem(argv, "train", validate_config)
    assert problem is not None and needle in problem, problem
    assert "\n" not in problem


@pytest.mark.parametrize(
    "argv",
    [
        ["norm=group", "data.batch_size=2", "seed=3"],
        ["-m", "norm=batch,group", "seed=range(0,2)", "name=mine"],
        ["-m", "seed=0", "name=my_study/round_1"],  # subfolders of outputs/sweeps/ are fine
        ["-m", "norm=glob(gr*)", "seed=0"],
        ["experiment=norm_sweep_quick"],
        ["+trainer.num_threads=1"],
        ["trainer.num_threads=1", "hydra.job.name=myjob"],
        ["--cfg", "job", "norm=gruop"],  # Hydra prints the config or its own refusal
        ["--shell-completion", "install=bash"],
        ["model=tiny", "hydra.searchpath=[file:///my/plugins]"],  # a plug-in's config folder: Hydra finds it
    ],
)
def test_good_command_lines_pass_the_check(argv: list[str]) -> None:
    from norm_experiments.command_line import check_command_line
    from norm_experiments.config import validate_config

    check_command_line(argv, "train", validate_config)  # raises on a refusal and on a bug of the check


def test_a_wrong_key_beside_a_key_still_to_be_given_is_the_one_named() -> None:
    """norm-exp-check's `weights: ???` exists though its value is missing: a wrong key beside it (here a
    typo for norm.options.num_groups) is the one the line names, not `weights`."""
    from norm_experiments.command_line import command_line_problem

    problem = command_line_problem(["weights=model.pt", "norm=group", "norm.groups=3"], "check")
    assert problem is not None and problem.startswith("norm.groups=3: norm.groups is not a key"), problem
    assert "norm.options.num_groups" in problem
    assert command_line_problem(["weights=model.pt", "experiment=smoke", "norm=group"], "check") is None


def test_a_slurm_sweep_without_slurm_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No sbatch here (PATH without it, the real check of shutil.which); a single run ignores the launcher."""
    from norm_experiments.command_line import command_line_problem

    monkeypatch.setenv("PATH", str(tmp_path))
    problem = command_line_problem(["-m", "hydra/launcher=slurm", "seed=0,1"], "train")
    assert problem is not None and "SLURM's sbatch is not on PATH" in problem
    assert command_line_problem(["hydra/launcher=slurm"], "train") is None


def test_resume_of_a_missing_folder_says_so(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such folder"):
        resume_argv(["norm-exp-train", f"resume={tmp_path / 'gone'}"])


# Checked in process (the same code the CLI runs: make_plan), quick; the CLI test below shows the exit path.
@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["data.batch_size=0"], "data.batch_size: must be a whole number >= 1, got 0"),
        (["data.patch_size=[18,18,18]"], "divisible by 4"),
        (["data=msd", "data.root=/nonexistent/dataset"], "data.root: dataset folder does not exist"),
        (["data=msd"], "data.root: required"),
        (["trainer.device=tpu"], "trainer.device: must be one of auto, cpu, cuda"),
        (["trainer.amp=fp16"], "trainer.amp: must be one of auto, true, false, got 'fp16'"),  # as typed
        (["data.cache_on_device=gpu"], "data.cache_on_device: must be true or false"),
        (["trainer.channels_last=yes_please"], "trainer.channels_last"),
        (["trainer.cpu_conv=fast"], "trainer.cpu_conv"),
        (["norm=group", "norm.options.num_groups=3"], "norm.options.num_groups"),
        (["data.patch_size=16"], "data.patch_size: must be a list of 3 whole numbers >= 1, got 16"),
        (["data.patch_size=null"], "data.patch_size: must be a list of 3"),
        (["optim.lr=abc"], "optim.lr: must be a number > 0, got 'abc'"),
        (["data.val_fraction=abc"], "data.val_fraction: must be a number in (0, 1)"),
        (["seed=abc"], "seed: must be a whole number in [0, 4294967295], got 'abc'"),
        (["seed=-1"], "seed: must be a whole number in [0, 4294967295], got -1"),  # used to crash
        (["seed=4294967296"], "seed: must be a whole number in [0, 4294967295]"),
        (["trainer.sw_overlap=abc"], "trainer.sw_overlap: must be a number in [0, 1)"),
        (["trainer.accumulate_steps=0"], "trainer.accumulate_steps: must be a whole number >= 1, got 0"),
        (["trainer.accumulate_steps=1.5"], "trainer.accumulate_steps: must be a whole number >= 1, got 1.5"),
        (
            ["trainer.batch_stats_windows=0"],
            "trainer.batch_stats_windows: must be a whole number >= 1, or null",
        ),
        (["model.depth=-1"], "model.depth: must be a whole number >= 1, got -1"),
        (
            ["+trainer.sampels=10"],
            "trainer.sampels: not a key this project reads; did you mean trainer.samples?",
        ),
        (["+norm.name2=x"], "norm.name2: not a key this project reads"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], needle: str) -> None:
    with pytest.raises(UserError) as err:
        make_plan(compose_config(["experiment=smoke", *overrides]))
    assert needle in str(err.value)


def test_every_key_of_every_config_option_has_a_check() -> None:
    """The schema covers every key the configs define: a key it lacks would be refused as unknown."""
    for group in ("data", "model", "norm", "optim", "trainer", "experiment"):
        for option in sorted((CONFIG_DIR / group).glob("*.yaml")):
            overrides = [f"{group}={option.stem}"]
            if group == "data" and option.stem != "synthetic":
                overrides.append(f"data.root={CONFIG_DIR}")
            config_schema.validate(compose_config(overrides))


@pytest.mark.slow  # a subprocess of the real CLI
def test_a_bad_value_through_the_cli_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run_cli(["experiment=smoke", "data.patch_size=16"], cwd=tmp_path)
    assert_clean_failure(result, "error: data.patch_size: must be a list of 3 whole numbers")
    assert len(result.stderr.strip().splitlines()) == 1
    assert no_result_left(tmp_path)


@pytest.mark.slow  # a subprocess of the real CLI
def test_dataset_without_cases(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "name": "empty",
                "labels": {"0": "background", "1": "x"},
                "modality": {"0": "MRI"},
                "training": [],
            }
        )
    )
    result = run_cli(["experiment=smoke", "data=msd", f"data.root={root}"], cwd=tmp_path)
    assert_clean_failure(result, "error:", "no training cases")
    assert no_result_left(tmp_path)


@pytest.mark.slow  # a subprocess of the real CLI
def test_dataset_layout_without_data_root_through_the_cli(tmp_path: Path) -> None:
    result = run_cli(["experiment=smoke", "data=msd"], cwd=tmp_path)
    assert_clean_failure(result, "error: data.root: required")
    assert len(result.stderr.strip().splitlines()) == 1
    assert no_result_left(tmp_path)


@pytest.mark.slow  # a subprocess of the real CLI
@pytest.mark.parametrize("key", ["hydra.run.dir", "hydra.sweep.dir"])
def test_empty_output_folder_is_refused(tmp_path: Path, key: str) -> None:
    """An empty hydra.run.dir used to put the run's files into the current folder, whatever it held."""
    result = run_cli(["experiment=smoke", f"{key}="], cwd=tmp_path)
    assert_clean_failure(result, f"error: {key}=: names no folder")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a subprocess of the real CLI
@pytest.mark.parametrize(
    ("blocker", "args"),
    [("outputs/runs", ["experiment=smoke"]), ("outputs/sweeps", ["-m", "experiment=smoke", "seed=0,1"])],
)
def test_default_output_folder_that_is_a_file(tmp_path: Path, blocker: str, args: list[str]) -> None:
    """outputs/runs or outputs/sweeps existing as a file (Hydra used to fail with NotADirectoryError)."""
    (tmp_path / "outputs").mkdir()
    (tmp_path / blocker).write_text("not a folder")
    result = run_cli(args, cwd=tmp_path)
    assert_clean_failure(
        result, f"error: {blocker}: cannot create the folder, {tmp_path / blocker} is a file"
    )
    assert (tmp_path / blocker).read_text() == "not a folder"


# Values Hydra's override grammar refuses unquoted, and the run folders the README names (with '=' and ',').
UNQUOTED = [
    ("hydra.run.dir", "outputs/runs/data.batch_size=2,norm=group", "'=', ','"),
    ("hydra.run.dir", "outputs/runs/a,b", "','"),  # read as a sweep of Hydra's own setting
    ("data.root", "/data/Müller/Task09", "'ü'"),
    ("data.root", "~/data/Task09", "'~'"),
    ("data.root", "/data/it's here", '"\'"'),
    ("data.root", "C:\\data\\a=b\\", "'='"),
]


@pytest.mark.parametrize(("key", "value", "named"), UNQUOTED)
def test_unquoted_value_gets_the_quoting_hint_that_works(key: str, value: str, named: str) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    problem = quoting_problem(["experiment=smoke", f"{key}={value}"])
    assert problem is not None and problem.startswith(f"{key}={value}: ") and f"reads {named} only" in problem
    hinted = shlex.split(problem.split(" quote it as ", 1)[1].split(" (the outer", 1)[0])
    assert len(hinted) == 1  # one shell word, which Hydra reads back as the value typed
    assert OverridesParser.create().parse_override(hinted[0]).value() == value


def test_values_hydra_reads_get_no_hint() -> None:
    args = [
        "experiment=smoke",
        "-m",
        "seed=0,1",
        "data.root=/data/a b",
        "name=x",
        "data.patch_size=[16,16,16]",
    ]
    assert quoting_problem([*args, "hydra.run.dir='outputs/runs/a=b'", "+trainer.x=1"]) is None


@pytest.mark.slow  # a subprocess of the real CLI
def test_unquoted_run_folder_through_the_cli(tmp_path: Path) -> None:
    result = run_cli(
        ["experiment=smoke", "hydra.run.dir=outputs/runs/data.batch_size=2,norm=group"], tmp_path
    )
    assert_clean_failure(result, "\"hydra.run.dir='outputs/runs/data.batch_size=2,norm=group'\"")
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "outputs").exists()


def test_resume_replays_neither_overwrite_nor_trust(tmp_path: Path) -> None:
    """`resume=RUN_DIR` continues the run: replaying trainer.overwrite=true would discard its checkpoint."""
    run_dir = tmp_path / "outputs" / "runs" / "it's a=b,c"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(
        "- experiment=smoke\n- trainer.overwrite=true\n- trainer.trust_checkpoint=true\n"
    )
    argv = resume_argv(["prog", f"resume={run_dir}"])
    assert argv[1:-2] == ["experiment=smoke"] and argv[-2] == "hydra.mode=RUN"
    from hydra.core.override_parser.overrides_parser import OverridesParser

    assert OverridesParser.create().parse_override(argv[-1]).value() == str(run_dir)


def test_run_folder_arguments_may_be_quoted_as_hydra_reads_them(tmp_path: Path) -> None:
    """Our quoting advice for a sweep run's path ("weights='.../norm=batch/seed=0/model.pt'") was followed for
    its folder too, and resume=, trained= and weights= took the quotes as part of the path ('no such folder')."""
    from norm_experiments.check import run_folder_argv
    from norm_experiments.config import hydra_quote, path_argument
    from norm_experiments.explain import trained_argv

    run_dir = tmp_path / "sweep" / "norm=batch" / "data.batch_size=1,seed=0"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("- experiment=smoke\n- norm=batch\n")
    (run_dir / "model.pt").write_bytes(b"")
    for typed in (str(run_dir), hydra_quote(str(run_dir)), f'"{run_dir}"'):
        assert path_argument(f"resume={typed}") == run_dir, typed
        assert resume_argv(["prog", f"resume={typed}"])[1:3] == ["experiment=smoke", "norm=batch"]
        assert trained_argv(["prog", f"trained={typed}"])[1:3] == ["experiment=smoke", "norm=batch"]
        checked = run_folder_argv(["prog", f"weights={typed}"])
        assert checked[1:3] == ["experiment=smoke", "norm=batch"]
        assert checked[-1] == f"weights={hydra_quote(str(run_dir / 'model.pt'))}"
    assert path_argument("trained=~/x") == Path.home() / "x"
    for empty in ("resume=", "resume=''"):  # Path("") is ".": the line named the current folder
        with pytest.raises(UserError, match=f"^{empty}: empty; give a path$"):
            path_argument(empty)


def test_a_sweep_subdir_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    """Hydra used to fail with a traceback creating the run folder over a file."""
    from norm_experiments.config import output_dir_problem

    (tmp_path / "f").write_text("mine")
    argv = ["-m", f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=f"]
    assert (
        output_dir_problem(argv)
        == f"hydra.sweep.subdir: cannot create the run folder, {tmp_path / 'f'} is a file"
    )
    assert output_dir_problem(["-m", f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=g"]) is None


def test_a_sweep_into_a_folder_of_someone_elses_files_is_refused(tmp_path: Path) -> None:
    """hydra.sweep.dir= a paper's folder used to exit 0 with its report.md, results.csv and runs.csv replaced
    by the sweep's; a sweep folder of ours (multirun.yaml) is resumed as before."""
    from norm_experiments.command_line import command_line_problem

    folder = tmp_path / "paper"
    folder.mkdir()
    (folder / "report.md").write_text("my paper's table")
    argv = ["-m", "experiment=smoke", "seed=0,1", f"hydra.sweep.dir={folder}"]
    problem = command_line_problem(argv, "train")
    assert problem is not None and "holds files but no multirun.yaml" in problem
    (folder / "multirun.yaml").write_text("hydra: {}\n")
    assert command_line_problem(argv, "train") is None
    assert command_line_problem(argv[1:], "train") is None  # one run: no sweep folder is written


def test_a_sweep_run_again_with_another_fixed_key_is_refused_before_hydra(tmp_path: Path) -> None:
    """Run again with trainer.samples changed, a finished sweep printed "failed" for every run, then "skipped
    (already completed)" with the old scores and exit 0, under a multirun.yaml rewritten to the new command."""
    from norm_experiments.command_line import command_line_problem

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    before = ["experiment=smoke", "norm=batch,group", "seed=0", "trainer.samples=16", "name=p"]
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": before}}}))
    where = f"hydra.sweep.dir={sweep}"
    problem = lambda *args: command_line_problem(["-m", *args, where], "train")  # noqa: E731
    changed = [*before[:3], "trainer.samples=24", "name=p"]
    assert problem(*changed) is None  # no run has a result yet: nothing to mix with (a fix after a crash)
    (sweep / "norm=batch").mkdir()
    (sweep / "norm=batch" / "checkpoint.pt").write_bytes(b"")
    assert problem(*changed) == (
        f"{where}: its runs were made with trainer.samples=16 and this command gives trainer.samples=24; a "
        "sweep's runs share every key but the swept ones: give the keys as before (a swept key may take more "
        "values), run in a new folder (name=NEW), or retrain its runs in place (trainer.overwrite=true)"
    )
    assert "made with no data.batch_size= and this command gives data.batch_size=1" in problem(
        *before, "data.batch_size=1"
    )
    assert "made with trainer.samples=16 and this command gives no trainer.samples=" in problem(*before[:3])
    # The same keys, more seeds and another norm on a swept key, an execution key, another name, the same
    # value typed otherwise, and retraining in place: go on.
    assert (
        problem("experiment=smoke", "norm=batch,group,instance", "seed=0,1,2", "trainer.samples=16") is None
    )
    assert problem(*before, "trainer.progress=none", "name=q") is None
    assert problem(*before[:3], "trainer.samples=16.0") is None
    assert problem(*changed, "trainer.overwrite=true") is None
    # A key the preset sweeps (hydra.sweeper.params: norm_sweep's seeds and datasets) is swept whatever is typed.
    preset = {
        "hydra": {"overrides": {"task": ["experiment=norm_sweep"]}, "sweeper": {"params": {"seed": "0,1,2"}}}
    }
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(preset))
    assert problem("experiment=norm_sweep", "seed=3") is None


def test_a_study_question_names_a_norm_option_and_a_mode_that_norm_has(tmp_path: Path) -> None:
    """A misspelt norm in a question ended in Hydra's multi-line error (exit 1) after multirun.yaml and
    study.json were written; BatchNorm's eval=batch asked of InstanceNorm ran the whole study to an
    "untestable" question. Both are one line before Hydra starts."""
    from norm_experiments.command_line import command_line_problem

    question = "hydra.sweeper.study.questions.batch_vs_instance_bs1.b"
    problem = lambda *args: command_line_problem(  # noqa: E731
        ["experiment=norm_sweep_quick", f"hydra.sweep.dir={tmp_path / 'sweep'}", *args], "train"
    )
    assert problem(f"{question}.norm=instanse").startswith(
        f"{question}.norm=instanse: no such norm; did you mean instance"
    )
    assert problem(f"+{question}.eval=batch") == (
        f"{question}.eval=batch: instance keeps no running statistics, so it has only eval=model (as "
        "model.eval() scores it) or model_lcc; the others are BatchNorm's"
    )
    assert problem(f"+{question}.eval=model_lcc") is None
    # A remedy mode the runs score only with trainer.remedy_modes=true ran to the seed cap, "untestable".
    gap = "hydra.sweeper.study.questions.eval_gap_bs1.a"
    assert problem(f"{gap}.eval=precise_more", "trainer.remedy_modes=false") == (
        f"{gap}.eval=precise_more: the runs score it only with trainer.remedy_modes=true (it is false here)"
    )
    assert problem(f"{gap}.eval=precise_more") is None  # the preset scores the remedies
    # With one window per forward, eval=batch is each window alone and batch_alone is never scored apart: the
    # study ran all its looks to an "untestable" question.
    assert problem(f"{gap}.eval=batch_alone", "trainer.batch_stats_windows=1") == (
        f"{gap}.eval=batch_alone: with one window per forward (trainer.batch_stats_windows=1) eval=batch already "
        "is each window alone, and the runs do not score batch_alone apart: ask for eval=batch"
    )
    assert problem(f"{gap}.eval=batch_alone") is None
    # A question's cell missing from the preset's params: the fix is params, not hydra.mode=RUN.
    params = "hydra.sweeper.params={norm: 'batch,instance', data.batch_size: '1,8'}"
    assert problem(params).endswith(
        "add it to hydra.sweeper.params, or leave norm and data.batch_size out of params (the sweep then runs "
        "the cells the questions compare)"
    )
    assert problem("norm=batch,instance").endswith(
        "to train one cell of this study alone, add hydra.mode=RUN"
    )
    assert not (tmp_path / "sweep").exists()


def test_a_generated_datasets_parameters_are_checked_before_any_folder(tmp_path: Path) -> None:
    """data.synthetic.* and data.brain.* were checked only after Hydra made the run folder (a failed
    metrics.json left behind); data.brain.translation_mm=1e9 generated an empty brain, blamed on its foreground."""
    from norm_experiments.command_line import command_line_problem
    from norm_experiments.config import validate_config
    from norm_experiments.train import _plan

    problem = lambda *args: command_line_problem(list(args), "train", validate_config, _plan)  # noqa: E731
    assert problem("data.synthetic.spacing=[inf,1,1]") == (
        "synthetic data: spacing=(inf, 1.0, 1.0) must be 3 positive numbers (mm, below 1000)"
    )
    assert problem("data=brain", "data.brain.translation_mm=1e9") == (
        "brain data: translation_mm=1000000000.0 must be in [0, 30] mm"
    )


@pytest.mark.slow  # a subprocess of the real CLI
def test_a_config_dir_sweep_gets_the_sweep_folder_checks_from_its_first_callback(tmp_path: Path) -> None:
    """With --config-dir the command line is Hydra's to check; the sweep folder's checks ran nowhere, and a
    rerun with another fixed key rewrote multirun.yaml."""
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - smoke\n")
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    before = ["experiment=mine", "norm=batch,group", "trainer.samples=16"]
    saved = yaml.safe_dump({"hydra": {"overrides": {"task": before}}})
    (sweep / "multirun.yaml").write_text(saved)
    (sweep / "model.pt").write_bytes(b"")  # a result the changed key would leave beside new runs
    args = ["--config-dir", str(tmp_path / "conf"), "-m", *before[:2], "trainer.samples=24"]
    result = run_cli([*args, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert_clean_failure(
        result, f"error: hydra.sweep.dir={sweep}: its runs were made with trainer.samples=16"
    )
    assert (sweep / "multirun.yaml").read_text() == saved and sorted(p.name for p in sweep.iterdir()) == [
        "model.pt",
        "multirun.yaml",
    ]


def test_a_config_dir_experiment_is_checked_with_its_folder(tmp_path: Path) -> None:
    """--config-dir DIR: Hydra's three-line refusal and exit 1 before, for a misspelt or misplaced preset."""
    from norm_experiments.command_line import command_line_problem
    from norm_experiments.config import validate_config

    preset = "# @package _global_\nname: mine\ntrainer:\n  samples: 8\n"
    (tmp_path / "mine.yaml").write_text(preset)
    problem = command_line_problem(
        ["--config-dir", str(tmp_path), "experiment=mine"], "train", validate_config
    )
    assert problem == (
        f"experiment=mine: {tmp_path / 'mine.yaml'} lies in the --config-dir folder itself, where Hydra does not "
        f"look for experiment options: move it to {tmp_path / 'experiment' / 'mine.yaml'}"
    )
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(preset.replace("8", "-1"))
    assert command_line_problem(
        [f"--config-dir={tmp_path}", "experiment=mine"], "train", validate_config
    ) == ("trainer.samples: must be a whole number >= 1, got -1")
    (tmp_path / "experiment" / "mine.yaml").write_text(preset)
    assert command_line_problem(["-cd", str(tmp_path), "experiment=mine"], "train", validate_config) is None
    problem = command_line_problem(
        ["--config-dir", str(tmp_path), "experiment=mien"], "train", validate_config
    )
    assert problem is not None and problem.startswith("experiment=mien: no such option; did you mean mine")


def test_a_run_folder_under_sys_is_no_full_disk() -> None:
    """/sys and /proc report 0 bytes free: they store nothing; "the disk is full" sent users to free space."""
    from norm_experiments.config import output_dir_problem

    assert output_dir_problem(["hydra.run.dir=/sys/x"]) == (
        "hydra.run.dir=/sys/x: /sys: a filesystem that stores no files (like /sys or /proc); choose a folder on "
        "a disk"
    )
