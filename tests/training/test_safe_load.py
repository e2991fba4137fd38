"""Opening a file never runs code: checkpoints and weights load with torch's safe loader (weights_only=True),
a file that needs anything else is refused with one line, and trainer.trust_checkpoint=true is the only way
to unpickle one (a checkpoint of an earlier version)."""

from __future__ import annotations

import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from norm_experiments.errors import UserError
from norm_experiments.run_names import run_identity
from norm_experiments.train import resume_argv
from norm_experiments.training import checkpoint as ckpt
from tests.helpers import assert_clean_failure, compose_config, metrics_of, run_cli

# Subprocess runs of the real CLI or trainings: the full suite runs them, `pytest -m "not slow"` does not.
pytestmark = pytest.mark.slow

# Long enough to be stopped by SIGTERM after the first checkpoint (step 4), short enough to finish in seconds.
ARGS = [
    "experiment=smoke",
    "data.batch_size=1",
    "trainer.samples=64",
    "trainer.checkpoint_every_samples=4",
    "trainer.validations=2",
    "trainer.eval_modes=false",
    "trainer.progress=log",
    "trainer.num_threads=1",
]


class TouchOnLoad:
    """Unpickling this object creates `marker`: what a crafted checkpoint could do with any other call."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def old_format(saved: dict) -> dict:
    """The checkpoint as versions before the safe format wrote it: the RNG tuples of random.getstate() and
    np.random.get_state(), an ndarray inside."""
    python, numpy = saved["rng"]["python"], saved["rng"]["numpy"]
    rng = {
        **saved["rng"],
        "python": (python["version"], tuple(python["internal"]), python["gauss_next"]),
        "numpy": (
            numpy["name"],
            np.asarray(numpy["key"], dtype=np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        ),
    }
    return {**saved, "rng": rng}


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


# ----------------------------------------------------------------------------------------- unit tests


def test_rng_states_survive_the_safe_loader_bit_exactly(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in NumPy's state: that must survive too
    ckpt.save(tmp_path / "rng.pt", ckpt.rng_states())
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.restore_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected


def test_rng_states_of_an_earlier_version_still_restore() -> None:
    random.seed(4), np.random.seed(5)
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    expected = (random.random(), np.random.rand())
    random.seed(0), np.random.seed(0)
    ckpt.restore_rng_states(old)
    assert (random.random(), np.random.rand()) == expected


def test_optimizer_scheduler_and_enabled_scaler_load_safely(tmp_path: Path) -> None:
    """Every part of a checkpoint, in the state a real step leaves it (AdamW moments, LambdaLR counters, an
    enabled GradScaler's scale and tracker), loads with weights_only=True and restores equal."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)
    scaler.scale(model(torch.ones(4, 3)).sum()).backward()
    scaler.step(optimizer), scaler.update(), scheduler.step()
    history = [{"step": 1, "samples_seen": 4, "val_dice": 0.5}]
    state = {"step": 1, "best_val_dice": 0.5, "history": history}
    parts = {
        "run_id": "abc",
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "state": state,
        "rng": ckpt.rng_states(),
    }
    ckpt.save(tmp_path / "c.pt", parts)
    loaded = ckpt.load(tmp_path / "c.pt")
    assert loaded["scaler"] == scaler.state_dict() and loaded["scaler"]["scale"] == 1024.0
    assert loaded["scheduler"]["last_epoch"] == 1 and loaded["state"] == state
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)
    assert torch.equal(
        loaded["optimizer"]["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    fresh.load_state_dict(loaded["optimizer"])  # accepted as it is
    assert fresh.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]


def test_load_weights_of_a_state_dict_and_of_a_checkpoint(tmp_path: Path) -> None:
    weights = torch.nn.Conv3d(1, 2, 3).state_dict()
    ckpt.save(tmp_path / "model.pt", weights)
    ckpt.save(tmp_path / "checkpoint.pt", {"model": weights, "rng": ckpt.rng_states(), "state": {"step": 3}})
    for name in ("model.pt", "checkpoint.pt"):
        loaded = ckpt.load_weights(tmp_path / name)
        assert loaded.keys() == weights.keys()
        assert all(torch.equal(loaded[k], weights[k]) for k in weights)


def test_load_weights_refuses_what_is_not_weights(tmp_path: Path) -> None:
    ckpt.save(tmp_path / "numbers.pt", {"a": 1, "b": [2.0]})
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(
        UserError, match=r"numbers\.pt: holds no model weights \(found 'a', 'b'\); give a state"
    ):
        ckpt.load_weights(tmp_path / "numbers.pt")
    with pytest.raises(UserError, match=r"text\.pt: not a readable checkpoint"):
        ckpt.load_weights(tmp_path / "text.pt")
    with pytest.raises(UserError, match=r"missing\.pt: no such file"):
        ckpt.load_weights(tmp_path / "missing.pt")


def test_load_weights_refuses_a_malicious_file_naming_the_type(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    weights = torch.nn.Linear(2, 2).state_dict()
    torch.save({"model": weights, "extra": TouchOnLoad(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UserError) as refused:
        ckpt.load_weights(tmp_path / "evil.pt", trust_flag="--trust")
    message = str(refused.value)
    assert "\n" not in message and "evil.pt" in message and "--trust" in message
    assert "needs getattr" in message  # pathlib.Path.touch pickles as getattr(Path, "touch")
    assert not marker.exists()
    # The payload is live: the unsafe loader, which the project no longer uses, runs it.
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()
    # trust=True is that opt-in: the file is unpickled (and its weights returned).
    marker.unlink()
    loaded = ckpt.load_weights(tmp_path / "evil.pt", trust=True)
    assert marker.exists() and torch.equal(loaded["weight"], weights["weight"])


def test_load_refuses_a_checkpoint_without_its_parts(tmp_path: Path) -> None:
    ckpt.save(tmp_path / "checkpoint.pt", {"model": torch.nn.Linear(2, 2).state_dict()})
    with pytest.raises(UserError, match=r"not a checkpoint of this project \(no optimizer, scheduler"):
        ckpt.load(tmp_path / "checkpoint.pt")


def test_trust_checkpoint_is_not_part_of_a_run() -> None:
    plain = compose_config(["experiment=smoke"])
    trusted = compose_config(["experiment=smoke", "trainer.trust_checkpoint=true"])
    assert trusted.trainer.trust_checkpoint is True and plain.trainer.trust_checkpoint is False
    assert run_identity(plain) == run_identity(trusted)


def test_resume_never_replays_trust_or_hydra_settings(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    saved = run_dir / ".hydra" / "overrides.yaml"
    saved.write_text("- experiment=smoke\n- trainer.trust_checkpoint=true\n")
    argv = resume_argv(["prog", f"resume={run_dir}"])
    assert "experiment=smoke" in argv and not any("trust_checkpoint" in a for a in argv)
    saved.write_text("- experiment=smoke\n- +hydra.callbacks.x._target_=os.system\n")
    with pytest.raises(UserError, match=r"sets \+hydra\.callbacks\.x\._target_=os\.system"):
        resume_argv(["prog", f"resume={run_dir}"])


def test_a_run_folder_never_sets_check_or_explain_options_or_where_to_write(tmp_path: Path) -> None:
    """weights=RUN_DIR replayed the folder's overrides into norm-exp-check's own config: a line
    `trust_weights=true` there unpickled its model.pt (running code), and `save_predictions=/elsewhere` or
    `data.cache_dir=/elsewhere` made check, explain or resume write outside the folder."""
    from norm_experiments.check import run_folder_argv
    from norm_experiments.explain import trained_argv

    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "model.pt").write_bytes(b"")
    saved = run_dir / ".hydra" / "overrides.yaml"
    replays = {
        "weights": lambda extra: run_folder_argv(["prog", f"weights={run_dir}", *extra]),
        "trained": lambda extra: trained_argv(["prog", f"trained={run_dir}", *extra]),
        "resume": lambda extra: resume_argv(["prog", f"resume={run_dir}", *extra]),
    }
    for line in ("trust_weights=true", "save_predictions=/tmp/x", "write_repaired=/tmp/x.pt", "trained=/tmp"):
        saved.write_text(f"- experiment=smoke\n- {line}\n")
        for key, replay in replays.items():
            root = line.split("=")[0]
            with pytest.raises(
                UserError, match=rf"^{key}=.*sets {line}, .*\({root} is no key of norm-exp-train"
            ):
                replay([])
    saved.write_text("- experiment=smoke\n- data.cache_dir=/tmp/elsewhere\n")
    for key, replay in replays.items():
        with pytest.raises(
            UserError, match=rf"^{key}=.*sets data.cache_dir=/tmp/elsewhere, a folder to write in"
        ):
            replay([])
        # given again on the command line, it is the user's own choice (and theirs wins, coming last)
        argv = replay(["data.cache_dir=/tmp/mine"])
        assert argv.index("data.cache_dir=/tmp/elsewhere") < argv.index("data.cache_dir=/tmp/mine")
    once = ("trainer.trust_checkpoint=true", "trainer.overwrite=true", "trainer.force_resume=true")
    saved.write_text("".join(f"- {line}\n" for line in ("experiment=smoke", *once)))
    for key, replay in replays.items():  # force_resume replayed would silence every later refusal
        assert not any(a.startswith(once) for a in replay([])), key


# ------------------------------------------------------------------------ an interrupted run, real CLI


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory holding one run stopped by SIGTERM after its first checkpoint, in the folder
    Hydra names after its overrides (outputs/runs/...)."""
    cwd = tmp_path_factory.mktemp("interrupted")
    proc = subprocess.Popen(
        [sys.executable, "-m", "norm_experiments.train", *ARGS],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 120
    while (
        not list(cwd.glob("outputs/runs/*/checkpoint.pt")) and time.time() < deadline and proc.poll() is None
    ):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, output[-2000:]
    return cwd


def copy_of(interrupted: Path, tmp_path: Path) -> tuple[Path, Path]:
    cwd = tmp_path / "cwd"
    shutil.copytree(interrupted, cwd)
    (run_dir,) = (cwd / "outputs" / "runs").iterdir()
    return cwd, run_dir


def test_malicious_checkpoint_in_a_run_folder_never_runs(interrupted: Path, tmp_path: Path) -> None:
    cwd, run_dir = copy_of(interrupted, tmp_path)
    marker = tmp_path / "marker"
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    torch.save({**saved, "state": TouchOnLoad(marker)}, run_dir / "checkpoint.pt")
    planted = (run_dir / "checkpoint.pt").read_bytes()

    result = run_cli(ARGS, cwd=cwd)  # the same command: it would resume the interrupted run

    output = result.stdout + result.stderr
    assert not marker.exists()
    assert result.returncode == 2, output[-2000:]
    assert "Traceback" not in output, output[-3000:]
    errors = error_lines(result)
    assert len(errors) == 1, output[-2000:]
    assert "checkpoint.pt: refused: it needs getattr" in errors[0]
    assert ckpt.TRUST_FLAG in errors[0]
    assert (run_dir / "checkpoint.pt").read_bytes() == planted  # evidence kept, not overwritten
    assert metrics_of(run_dir)["status"] == "failed"
    assert not (run_dir / "model.pt").exists()


def test_old_checkpoint_is_refused_then_resumes_once_trusted(interrupted: Path, tmp_path: Path) -> None:
    cwd, run_dir = copy_of(interrupted, tmp_path)
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    torch.save(old_format(saved), run_dir / "checkpoint.pt")

    refused = run_cli(ARGS, cwd=cwd)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "Traceback" not in refused.stdout + refused.stderr
    (error,) = error_lines(refused)
    assert "needs numpy" in error and f"add {ckpt.TRUST_FLAG}" in error

    trusted = run_cli([*ARGS, ckpt.TRUST_FLAG], cwd=cwd)  # the same folder: the flag is not in its name
    output = trusted.stdout + trusted.stderr
    assert trusted.returncode == 0, output[-3000:]
    assert f"resuming {run_dir} from step {saved['state']['step']}/64" in output, output[-3000:]
    assert "unsafe loader" in output
    assert [p.name for p in (cwd / "outputs" / "runs").iterdir()] == [run_dir.name]
    metrics = metrics_of(run_dir)
    assert metrics["status"] == "completed" and metrics["steps"] == 64
    # The checkpoint it leaves is in the safe form: the opt-in was needed once.
    assert ckpt.load(run_dir / "checkpoint.pt")["state"]["step"] == 64


def test_check_weights_a_plain_folder_says_it_is_no_run_folder(tmp_path: Path) -> None:
    """weights=FOLDER without .hydra/ got a line about Hydra's quoting grammar (the same unquoted path works
    for a run folder) or about a folder where a file is expected."""
    from norm_experiments.check import run_folder_argv

    folder = tmp_path / "norm=batch" / "seed=0"
    folder.mkdir(parents=True)
    with pytest.raises(
        UserError,
        match=rf"^weights={folder}: refused, a folder where a file is expected, and not a run folder of ours \(no ",
    ):
        run_folder_argv(["prog", f"weights={folder}"])


def test_a_resume_on_other_data_is_refused_and_on_its_own_data_continues(tmp_path: Path) -> None:
    """Interrupted with a relative data.root, then resumed from another folder holding other data under the
    same name, a run continued on the other data and was recorded as completed: two datasets in one run."""
    from norm_experiments.data.synthetic import SynthConfig, generate_dataset

    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    for cwd, seed in ((here, 1), (elsewhere, 2)):
        generate_dataset(cwd / "ds", SynthConfig(num_cases=6, shape=(24, 24, 24), seed=seed), "msd")
    run_dir = tmp_path / "run"
    args = [*ARGS, "data=msd", "data.root=ds", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "norm_experiments.train", *args],
        cwd=here,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 120
    while not (run_dir / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, output[-2000:]
    checkpoint = (run_dir / "checkpoint.pt").read_bytes()

    refused = run_cli([f"resume={run_dir}"], cwd=elsewhere)
    assert_clean_failure(
        refused, f"{run_dir / 'checkpoint.pt'}: trained on other data than {elsewhere / 'ds'}"
    )
    assert "trainer.force_resume=true to continue on this data" in refused.stderr
    assert (run_dir / "checkpoint.pt").read_bytes() == checkpoint and metrics_of(run_dir)[
        "status"
    ] != "completed"

    copied = tmp_path / "copied"  # the same files copied (new modification times), as onto a node's scratch
    shutil.copytree(here / "ds", copied / "ds", copy_function=shutil.copyfile)
    resumed = run_cli([f"resume={run_dir}"], cwd=copied)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in (run_dir / "train.log").read_text() and metrics_of(run_dir)["status"] == "completed"


def test_check_weights_that_do_not_exist_say_so_before_any_quoting_advice(tmp_path: Path) -> None:
    """A missing run folder whose name holds '=' and ',' (as ours do) got Hydra's quoting advice, and quoted,
    'no such file'; norm-exp-explain's trained= said 'no such folder' at once."""
    from norm_experiments.check import run_folder_argv

    missing = tmp_path / "outputs" / "runs" / "norm=batch,data.batch_size=1"
    with pytest.raises(UserError, match=rf"^weights={missing}: no such file or folder$"):
        run_folder_argv(["prog", f"weights={missing}"])


def test_check_and_explain_take_cfg_job_before_or_after_their_overrides(tmp_path: Path) -> None:
    """`norm-exp-check weights=x --cfg job` ended in argparse's "unrecognized arguments: ... hydra.mode=RUN": the
    added override came after the flag, splitting Hydra's overrides in two."""
    from norm_experiments.command_line import single_run_argv
    from norm_experiments.explain import trained_argv

    assert single_run_argv(["prog", "weights=x", "--cfg", "job"], "c") == [
        "prog",
        "weights=x",
        "hydra.mode=RUN",
        "--cfg",
        "job",
    ]
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("- experiment=smoke\n")
    for order in (["--cfg", "job", "seed=1"], ["seed=1", "--cfg", "job"]):
        argv = trained_argv(["prog", f"trained={run_dir}", *order])
        assert argv[1:3] == ["experiment=smoke", "seed=1"] and argv[-2:] == ["--cfg", "job"], argv


def test_weights_with_a_negative_running_variance_are_refused(tmp_path: Path) -> None:
    """A negated running_var ran the whole check and printed "nanσ" in its verdict; NaN was already refused."""
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2))
    state = net.state_dict()
    state["1.running_var"] = torch.tensor([1.0, -0.5])
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(UserError, match=r"w\.pt: 1\.running_var holds 1 negative variance\(s\)"):
        ckpt.load_weights(tmp_path / "w.pt")


def test_a_torchscript_archive_is_named_as_one_and_never_loaded(tmp_path: Path, recwarn) -> None:
    net = torch.jit.script(torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2)))
    torch.jit.save(net, tmp_path / "scripted.pt")
    for trust in (False, True):  # trusting the source does not make it a state dict
        with pytest.raises(UserError) as err:
            ckpt.load_weights(tmp_path / "scripted.pt", trust=trust)
        assert str(err.value) == (
            f"{tmp_path / 'scripted.pt'}: a TorchScript archive (torch.jit.save), not a state dict; save the "
            "weights with torch.save(model.state_dict(), PATH) and give that file"
        )
    assert not [w for w in recwarn if "TorchScript" in str(w.message)]  # torch's own warning never shows
    # A state dict is a zip too: it still loads.
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    assert set(ckpt.load_weights(tmp_path / "weights.pt")) == set(net.state_dict())


def test_an_interrupted_run_has_its_hparams_row_without_an_end(interrupted: Path, tmp_path: Path) -> None:
    """TensorBoard's HParams view lists a run from its start: an interrupted one shows its hyperparameters
    (and the metrics it logged so far), with no end status until it completes."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    _, run_dir = copy_of(interrupted, tmp_path)
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    tags = acc.PluginTagToContent("hparams")
    assert set(tags) == {"_hparams_/experiment", "_hparams_/session_start_info"}
    start = plugin_data_pb2.HParamsPluginData.FromString(
        tags["_hparams_/session_start_info"]
    ).session_start_info
    record = metrics_of(run_dir)
    assert record["status"] == "interrupted"
    assert start.hparams["norm"].string_value == record["norm"]
    assert start.hparams["seed"].string_value == str(record["seed"])
    assert start.hparams["batch_size"].string_value == str(record["batch_size"])


def test_a_whole_pickled_network_is_refused_then_read_for_its_weights_once_trusted(tmp_path: Path) -> None:
    """torch.save(net): the refusal says trust_weights=true loads it; trusted, it then said "holds no model
    weights (found Sequential)"."""
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2))
    torch.save(net, tmp_path / "whole.pt")
    with pytest.raises(
        UserError, match=r"whole\.pt: refused: it needs torch\.nn\..*add trust=true to load it"
    ):
        ckpt.load_weights(tmp_path / "whole.pt", trust_flag="trust=true")
    weights = ckpt.load_weights(tmp_path / "whole.pt", trust=True)
    assert set(weights) == set(net.state_dict())
    assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items())
