"""norm-exp-check, run as a user would on a network "trained elsewhere": a MONAI UNet with BatchNorm trained at
batch size 1 by a plain torch loop in this file, saved as a state dict, then checked through the real CLI
on real NIfTI files. Also: a full checkpoint of ours, and each bad input (one `error:` line, exit 2)."""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from omegaconf import OmegaConf

from norm_experiments.check import TRUST_FLAG, check
from norm_experiments.config import CONFIG_DIR
from norm_experiments.data.pipeline import BatchSampler, load_data
from norm_experiments.data.synthetic import SynthConfig, generate_dataset
from norm_experiments.diagnose.network import channel_count_mismatch, unwrap_keys
from norm_experiments.models import build_model
from norm_experiments.norms import make_norm_spec
from norm_experiments.training.checkpoint import load_weights
from tests.helpers import compose_config, metrics_of, run_cli
from tests.test_explain import section

# Subprocess runs of the real CLI or trainings: the full suite runs them, `pytest -m "not slow"` does not.
pytestmark = pytest.mark.slow

MODULE = "norm_experiments.check"
UNET = {
    "_target_": "monai.networks.nets.UNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 3,  # background + 2 classes
    "channels": [8, 16, 32],
    "strides": [2, 2],
    "num_res_units": 0,
    "norm": "batch",
}


def data_args(root: Path) -> list[str]:
    # Raw intensities (a z-score would remove the per-case gain this data is about); one thread: shared CPU.
    return [
        "data=msd",
        f"data.root={root}",
        "data.intensity=none",
        "data.patch_size=[16,16,16]",
        "data.val_fraction=0.5",
        "data.batch_size=1",
        "trainer.num_threads=1",
    ]


def run_check(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_cli(args, cwd=cwd, module=MODULE, timeout=180)


def make_dataset(root: Path, gain: tuple[float, float], offset: tuple[float, float]) -> Path:
    """12 small cases (6 training, 6 validation: 3 give intervals too wide for any verdict) with per-case
    scanner gain and offset in these ranges."""
    cfg = SynthConfig(
        num_cases=12,
        shape=(24, 24, 24),
        radius_range=(3.0, 6.0),
        intensity_scale_range=gain,
        intensity_offset_range=offset,
    )
    return generate_dataset(root, cfg, "msd")


def write_net(path: Path, **changes: object) -> Path:
    OmegaConf.save(OmegaConf.create({**UNET, **changes}), path)
    return path


def train_elsewhere(root: Path, out: Path, momentum: float, seed: int = 0, steps: int = 40) -> UNet:
    """A plain torch loop: MONAI UNet, BatchNorm, batch size 1 (one 16³ patch per step), Adam."""
    torch.manual_seed(seed)
    net = UNet(
        **{k: v for k, v in UNET.items() if k != "_target_"} | {"norm": ("batch", {"momentum": momentum})}
    )
    cfg = compose_config(data_args(root)[:-1])
    sampler = BatchSampler(load_data(cfg.data).train, cfg.data, seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    net.train()
    for step in range(steps):
        images, labels = sampler.batch(step)
        optimizer.zero_grad()
        loss_fn(net(images), labels).backward()
        optimizer.step()
    torch.save(net.state_dict(), out)
    return net


def scores(output: str) -> dict[str, list[str]]:
    """Table 1 as mode -> cells (Dice mean, Dice per class, HD95 mean, HD95 per class)."""
    modes = {
        "running": "running statistics",
        "precise": "PreciseBN",
        "batch": "batch statistics",
        "plain": "eval mode",
        "own": "each window's own statistics",
    }
    rows = section(output, "1. Validation scores")
    return {m: row[1:] for row in rows for m, label in modes.items() if row[0].startswith(label)}


def one_error_line(result: subprocess.CompletedProcess) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    return errors[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ a gain of 0.1-10x


@pytest.fixture(scope="module")
def gain(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Cases whose scanner gain differs up to 100x: BatchNorm's running statistics fit none of them."""
    tmp = tmp_path_factory.mktemp("check-gain")
    root = make_dataset(tmp / "data", (0.1, 10.0), (-2.0, 2.0))
    net = train_elsewhere(root, tmp / "unet.pt", momentum=0.1)
    write_net(tmp / "unet.yaml")
    weights_before = digest(tmp / "unet.pt")
    args = ["weights=unet.pt", "net=unet.yaml", *data_args(root), "write_repaired=repaired.pt"]
    result = run_check(args, tmp)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return {"tmp": tmp, "root": root, "net": net, "out": result.stdout, "weights_before": weights_before}


def test_three_modes_batch_statistics_beat_running(gain: dict) -> None:
    table = scores(gain["out"])
    assert sorted(table) == ["batch", "precise", "running"]
    dice = {mode: float(cells[0]) for mode, cells in table.items()}
    # Measured over training seeds 0-3: running 0.050-0.057, PreciseBN 0.035-0.054, batch 0.51-0.58.
    assert dice["batch"] > dice["running"] + 0.25, gain["out"]
    assert dice["precise"] < dice["running"] + 0.05  # no single set of statistics fits a 100x gain range
    for cells in table.values():  # Dice mean, 2 classes, HD95 mean, 2 classes
        assert len(cells) == 6 and all(0 <= float(c) <= 1 for c in cells[:3])
    hd95 = {mode: float(cells[3]) for mode, cells in table.items()}
    assert hd95["batch"] < hd95["running"]


def test_running_statistics_vs_each_volume_per_layer(gain: dict) -> None:
    layers = {row[0]: row[1:] for row in section(gain["out"], "4. Running statistics")}
    bn = [name for name, m in gain["net"].named_modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert list(layers) == bn  # every BatchNorm layer, in order
    state = gain["net"].state_dict()
    first = bn[0]
    assert float(layers[first][0]) == pytest.approx(state[f"{first}.running_mean"].mean().item(), rel=1e-2)
    assert float(layers[first][1]) == pytest.approx(state[f"{first}.running_var"].mean().item(), rel=1e-2)
    # A 100x gain range moves the first layer's input statistics far from any single average.
    assert float(layers[first][4]) > 0.5  # max over volumes of |μ_v−μ|/σ
    volumes = section(gain["out"], "5. Each validation volume at")
    assert len(volumes) == 6 and all(v[0].startswith("synth_") for v in volumes)
    # The verdict quotes the variance too: the layer with the largest mean |σ²_v−σ²|/σ² (table 4), its max.
    var_layer = max(layers, key=lambda n: float(layers[n][5]))
    sentence = re.search(
        r"running variance is off from a volume's by up to (\S+) times itself \((\S+), at (\S+); (\S+) on",
        gain["out"],
    )
    assert sentence, gain["out"]
    assert sentence.group(3) == var_layer
    assert float(sentence.group(1)) == pytest.approx(float(layers[var_layer][6]), abs=0.006)
    assert float(sentence.group(4)) == pytest.approx(float(layers[var_layer][5]), abs=0.006)


def test_verdict_in_plain_words(gain: dict) -> None:
    verdict_text = gain["out"].split("Verdict:", 1)[1]
    assert "Eval mode LOSES accuracy" in verdict_text
    assert "PreciseBN is not shown to repair it" in verdict_text
    assert 'bn_eval_mode(model, "batch")' in verdict_text and "GroupNorm or InstanceNorm" in verdict_text
    # PreciseBN scored lower than the running statistics: no "repaired" file, the input untouched.
    assert "repaired.pt not written" in verdict_text
    assert not (gain["tmp"] / "repaired.pt").exists()
    assert digest(gain["tmp"] / "unet.pt") == gain["weights_before"]


# ------------------------------------------------------------------------------------------ PreciseBN repairs


def test_precise_bn_repair_is_written_and_scores_as_reported(tmp_path: Path) -> None:
    """Alike cases, but running statistics that lag behind the weights (BN momentum 0.01 over 40 steps):
    recomputing them repairs eval mode, and the written weights score the reported number in model.eval()."""
    root = make_dataset(tmp_path / "data", (1.0, 1.0), (0.0, 0.0))
    train_elsewhere(root, tmp_path / "unet.pt", momentum=0.01)
    write_net(tmp_path / "unet.yaml")
    common = ["net=unet.yaml", *data_args(root)]
    first = run_check(["weights=unet.pt", *common, "write_repaired=fixed/repaired.pt"], tmp_path)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    before = scores(first.stdout)
    # Measured over training seeds 0-3: running 0.10-0.17, PreciseBN 0.47-0.57.
    assert float(before["precise"][0]) > float(before["running"][0]) + 0.2, first.stdout
    assert "PreciseBN repairs" in first.stdout
    assert "Repaired weights written to fixed/repaired.pt" in first.stdout
    assert set(load_weights(tmp_path / "fixed/repaired.pt")) == set(torch.load(tmp_path / "unet.pt"))

    again = run_check(["weights=fixed/repaired.pt", *common], tmp_path)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert scores(again.stdout)["running"] == before["precise"]  # every Dice and HD95 cell


# ------------------------------------------------------------------------------------------ a run of ours


def test_dynunet_of_ours_at_batch_1_reproduces_its_eval_modes_with_intervals(tmp_path: Path) -> None:
    """nnU-Net's network trained here at batch size 1, checked from its full checkpoint: the same numbers as
    the run's metrics.json, each case's Dice, an interval per gap and a verdict."""
    train = [
        "experiment=smoke",
        "model=dynunet",
        "norm=batch",
        "data.batch_size=1",
        "trainer.num_threads=1",
        "hydra.run.dir=run",
    ]
    trained = run_cli(train, cwd=tmp_path, timeout=300)
    assert trained.returncode == 0, (trained.stdout + trained.stderr)[-3000:]
    run = tmp_path / "run"
    checkpoint, model = load_weights(run / "checkpoint.pt"), load_weights(run / "model.pt")
    assert all(torch.equal(checkpoint[k], model[k]) for k in model)  # model.pt: the same weights

    result = run_check(["weights=run/checkpoint.pt", *train[:-1]], tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    out = result.stdout
    assert "network: ours, model=dynunet, norm=batch" in out
    dice = {mode: float(cells[0]) for mode, cells in scores(out).items()}
    metrics = metrics_of(run)
    assert dice == pytest.approx(metrics["eval_modes"], abs=6e-4)  # the same overrides score the same numbers

    cases = {row[0]: [float(v) for v in row[1:4]] for row in section(out, "2. Each validation case's Dice")}
    per_case = metrics["per_case"]["running"]
    assert sorted(cases) == sorted(per_case)
    for case, (running, _, _) in cases.items():
        present = [v for v in per_case[case]["dice"].values() if v is not None]
        assert running == pytest.approx(sum(present) / len(present), abs=6e-4)
    gaps = {row[0]: row[1:] for row in section(out, "3. Gaps over the running statistics")}
    assert sorted(gaps) == ["PreciseBN − running", "batch stats − running"]
    for mean, interval, verdict in gaps.values():
        low, high = (float(v) for v in interval.strip("[]").split(", "))
        assert low <= float(mean) <= high
        assert verdict in {"better", "worse", "equivalent", "inconclusive"}
    # the power line: a detectable gap below 1 Dice, or (few cases, a wide spread) that none can be found
    assert re.search(
        r"What \d+ cases can show: (a true gap of 0\.\d{3} Dice|nothing; no gap a Dice can have)", out
    )

    # The run's folder alone: its model.pt, scored with the run's own overrides (dynunet, batch 1).
    by_folder = run_check(["weights=run"], tmp_path)
    assert by_folder.returncode == 0, (by_folder.stdout + by_folder.stderr)[-3000:]
    assert "Checking run/model.pt (network: ours, model=dynunet, norm=batch)" in by_folder.stdout
    assert scores(by_folder.stdout) == scores(out)
    # Its model file without the run's overrides builds another network: the line names the folder to give.
    line = one_error_line(run_check(["weights=run/model.pt", "experiment=smoke"], tmp_path))
    assert line.endswith("; one of our runs: give its folder, weights=run, to build the run's own network")


# ------------------------------------------------------------------------------------------ bad inputs


def test_mismatched_weights_name_the_keys(gain: dict) -> None:
    write_net(gain["tmp"] / "wider.yaml", channels=[8, 16, 64])
    line = one_error_line(
        run_check(["weights=unet.pt", "net=wider.yaml", *data_args(gain["root"])], gain["tmp"])
    )
    assert "unet.pt: the weights do not match the network (monai.networks.nets.UNet)" in line
    assert re.search(
        r"shape model\.1\.submodule\.1\.\S+ \(.*\) in the file vs \(.*\) in the network", line
    ), line


def test_network_without_batchnorm_is_scored_plainly(gain: dict, tmp_path: Path) -> None:
    write_net(tmp_path / "instance.yaml", norm="instance")
    torch.save(
        UNet(**{k: v for k, v in UNET.items() if k != "_target_"} | {"norm": "instance"}).state_dict(),
        tmp_path / "inst.pt",
    )
    args = ["weights=inst.pt", "net=instance.yaml", *data_args(gain["root"]), "write_repaired=out.pt"]
    result = run_check(args, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No BatchNorm layer" in result.stdout and "Verdict" not in result.stdout
    assert list(scores(result.stdout)) == ["plain"]
    assert "out.pt not written" in result.stdout and not (tmp_path / "out.pt").exists()


def test_instance_norm_with_running_statistics_is_checked_against_its_own_statistics(
    gain: dict, tmp_path: Path
) -> None:
    """InstanceNorm with track_running_stats=true normalizes with running averages in model.eval(): the check
    scores it both ways, and its "own statistics" row is exactly the same weights without running statistics."""
    norm = ["instance", {"affine": True, "track_running_stats": True}]
    torch.manual_seed(0)
    net = UNet(**{k: v for k, v in UNET.items() if k != "_target_"} | {"norm": tuple(norm)})
    cfg = compose_config(data_args(gain["root"])[:-1])
    sampler = BatchSampler(load_data(cfg.data).train, cfg.data, 0)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    for step in range(40):
        images, labels = sampler.batch(step)
        optimizer.zero_grad()
        loss_fn(net(images), labels).backward()
        optimizer.step()
    state = net.state_dict()
    torch.save(state, tmp_path / "tracked.pt")
    running = {k for k in state if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert running, "the network keeps no running statistics"
    torch.save({k: v for k, v in state.items() if k not in running}, tmp_path / "untracked.pt")
    write_net(tmp_path / "tracked.yaml", norm=norm)
    write_net(tmp_path / "untracked.yaml", norm=["instance", {"affine": True}])

    tracked = run_check(["weights=tracked.pt", "net=tracked.yaml", *data_args(gain["root"])], tmp_path)
    untracked = run_check(["weights=untracked.pt", "net=untracked.yaml", *data_args(gain["root"])], tmp_path)
    assert tracked.returncode == 0 and untracked.returncode == 0, tracked.stdout + tracked.stderr
    table = scores(tracked.stdout)
    assert list(table) == ["running", "own"]
    assert table["own"] == scores(untracked.stdout)["plain"]  # the same numbers, cell for cell
    assert table["running"] != table["own"]
    layers = sum(isinstance(m, torch.nn.InstanceNorm3d) for m in net.modules())
    assert f"but {layers} InstanceNorm layer(s) keep running statistics" in tracked.stdout
    line = next(x for x in tracked.stdout.splitlines() if "own minus eval mode" in x)
    difference = re.search(
        r"own minus eval mode ([+-]\d\.\d{3}) \[([+-]\d\.\d{3}), ([+-]\d\.\d{3})\]: (\w+)", line
    )
    assert difference, line
    value, low, high = (float(difference.group(i)) for i in (1, 2, 3))
    assert low < value < high
    verdict = "better" if low > 0 else "worse" if high < 0 else None
    if verdict:
        assert difference.group(4) == verdict
    assert "No BatchNorm layer with running statistics in this network" not in tracked.stdout


# The same errors in process (check() behind the CLI's Hydra wrapper): each CLI start costs seconds of imports.


def compose_check(overrides: list[str]):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("check", overrides=overrides)


def check_error(overrides: list[str], cwd: Path, monkeypatch, capsys) -> str:
    """The one `error:` line check() prints, run from `cwd`, with exit status 2."""
    monkeypatch.chdir(cwd)
    cfg = compose_check(overrides)
    with pytest.raises(SystemExit) as exit_info:
        check(cfg)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in captured.err, captured.err
    return errors[0]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"in_channels": 2}, "the network takes 2 input channel(s)"),
        ({"out_channels": 2}, "the network outputs 2 classes"),
    ],
)
def test_wrong_channel_or_class_count_names_both(
    gain: dict, tmp_path: Path, monkeypatch, capsys, change: dict, expected: str
) -> None:
    write_net(tmp_path / "net.yaml", **change)
    net = UNet(**{k: v for k, v in UNET.items() if k != "_target_"} | change)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    args = ["weights=w.pt", "net=net.yaml", *data_args(gain["root"])[:-1]]
    line = check_error(args, tmp_path, monkeypatch, capsys)
    assert expected in line, line
    assert ("has 1" if "in_channels" in change else "has 3") in line, line


def test_unknown_target(gain: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    write_net(tmp_path / "net.yaml", _target_="monai.networks.nets.NoSuchNet")
    args = [f"weights={gain['tmp']}/unet.pt", "net=net.yaml", *data_args(gain["root"])[:-1]]
    line = check_error(args, tmp_path, monkeypatch, capsys)
    assert "net._target_=monai.networks.nets.NoSuchNet: no such network class" in line


def test_existing_repaired_target_is_refused_and_kept(
    gain: dict, tmp_path: Path, monkeypatch, capsys
) -> None:
    (tmp_path / "taken.pt").write_bytes(b"keep me")
    args = [f"weights={gain['tmp']}/unet.pt", "net=unet.yaml", "write_repaired=taken.pt"]
    line = check_error(args, tmp_path, monkeypatch, capsys)
    assert "write_repaired=taken.pt: already exists" in line
    assert (tmp_path / "taken.pt").read_bytes() == b"keep me"
    line = check_error(
        [f"weights={tmp_path}/taken.pt", f"write_repaired={tmp_path}/./taken.pt"],
        tmp_path,
        monkeypatch,
        capsys,
    )
    assert "that is the input weights" in line


def test_a_weights_path_of_a_sweep_run_says_how_to_quote_it(tmp_path: Path) -> None:
    """Our sweep's run folders are named norm=batch/data.batch_size=1,seed=0: Hydra reads '=' and ',' only
    in a quoted value, and the line says how to quote it (Hydra's own message does not)."""
    weights = "outputs/sweeps/s/norm=batch/data.batch_size=1,seed=0/model.pt"
    (tmp_path / weights).parent.mkdir(parents=True)
    (tmp_path / weights).write_bytes(b"")
    result = run_check([f"weights={weights}", "experiment=norm_sweep_quick"], tmp_path)
    assert result.returncode == 2, result.stderr
    assert "quote it as \"weights='" + weights + "'\"" in result.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "outputs"]


def test_an_unfinished_run_folder_as_weights_is_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- experiment=smoke\n")
    (run / "checkpoint.pt").write_bytes(b"")
    result = run_check(["weights=run"], tmp_path)
    assert one_error_line(result) == (
        "error: weights=run: the run has no model.pt (it is written when the run completes); to check its "
        "last checkpoint: weights=run/checkpoint.pt with the overrides in run/.hydra/overrides.yaml"
    )


def test_missing_keys_are_named(tmp_path: Path, monkeypatch, capsys) -> None:
    line = check_error(["data=msd"], tmp_path, monkeypatch, capsys)
    assert "data.root, weights: required" in line


def test_unsafe_weights_name_the_opt_in(tmp_path: Path, monkeypatch, capsys) -> None:
    import argparse

    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pt")
    line = check_error(["weights=pickled.pt"], tmp_path, monkeypatch, capsys)
    assert "argparse.Namespace" in line and TRUST_FLAG in line


# ------------------------------------------------------------------------------------------ in process


def test_weights_for_other_channel_or_class_counts() -> None:
    cfg = compose_config(["experiment=smoke"])
    spec = make_norm_spec("batch")
    model = build_model(cfg.model, spec, 1, 3)
    two_channels = build_model(cfg.model, spec, 2, 3).state_dict()
    four_classes = build_model(cfg.model, spec, 1, 4).state_dict()
    assert "the weights take 2 input channel(s)" in channel_count_mismatch(model, two_channels, 1, 3)
    assert "the weights output 4 classes (head.bias), the network 3" in channel_count_mismatch(
        model, four_classes, 1, 3
    )
    # a network built for 4 classes, 3-class weights, a 3-class dataset: the network is named, not "3 vs 3"
    line = channel_count_mismatch(build_model(cfg.model, spec, 1, 4), model.state_dict(), 1, 3)
    assert line == "the weights output 3 classes (head.bias), the network 4, the dataset has 3"
    assert channel_count_mismatch(model, model.state_dict(), 1, 3) is None


def test_wrapper_prefixes_are_stripped() -> None:
    net = UNet(**{k: v for k, v in UNET.items() if k != "_target_"})
    ddp = {f"module.{k}": v for k, v in net.state_dict().items()}
    assert list(unwrap_keys(ddp, net)) == list(net.state_dict())
    partly = {**net.state_dict(), "module.extra": torch.zeros(1)}  # not every key: left as it is
    assert unwrap_keys(partly, net) is partly


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.depth=2", "norm=group", "norm.options.num_groups=3"], "num_groups"),
        (["model.depth=2", "data.patch_size=[10,16,16]"], "must be divisible by"),
        (
            ["norm=batch", "data.batch_size=1", "data.patch_size=[16,16,16]", "model.depth=4"],
            "one value per channel",
        ),
    ],
)
def test_our_network_is_refused_as_training_refuses_it(overrides: list[str], expected: str) -> None:
    """norm-exp-check builds our network through training's own plan (network_plan): an impossible config is
    refused with the line norm-exp-train gives, before any weights or data are read."""
    from norm_experiments.diagnose.network import build_network
    from norm_experiments.errors import UserError
    from norm_experiments.training.build import make_plan

    with pytest.raises(UserError) as training:
        make_plan(compose_config(["experiment=smoke", *overrides]))
    with pytest.raises(UserError) as checking:
        build_network(compose_check(["model=unet", *overrides]), num_channels=1, num_classes=3)
    assert expected in str(training.value)
    assert str(checking.value) == str(training.value)


@pytest.mark.parametrize("margin", ["inf", "2", "1", "0"])
def test_a_margin_outside_0_1_is_refused(margin: str) -> None:
    """margin=inf (or 2) called a near-random model "equivalent within ±inf Dice ... fine in model.eval()"."""
    from norm_experiments.check_network import CHECK_KEYS
    from norm_experiments.config import register_resolvers, validate_config
    from norm_experiments.errors import UserError

    register_resolvers()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("check", overrides=["weights=w.pt", "data=synthetic", f"margin={margin}"])
    with pytest.raises(UserError, match=r"^margin"):
        validate_config(cfg, extra=CHECK_KEYS)


def test_write_repaired_under_a_file_is_refused_before_the_check(tmp_path: Path) -> None:
    """write_repaired=existing.pt/x.pt ran the whole check, then failed with EEXIST."""
    from omegaconf import OmegaConf

    from norm_experiments.check_network import repaired_target
    from norm_experiments.errors import UserError

    (tmp_path / "existing.pt").write_bytes(b"")
    cfg = OmegaConf.create({"write_repaired": str(tmp_path / "existing.pt" / "x.pt")})
    with pytest.raises(UserError, match=r"existing\.pt is a file, not a folder; choose another path$"):
        repaired_target(cfg, tmp_path / "w.pt")
    cfg = OmegaConf.create({"write_repaired": str(tmp_path / "new" / "x.pt")})  # a folder to be made: fine
    assert repaired_target(cfg, tmp_path / "w.pt") == tmp_path / "new" / "x.pt"
