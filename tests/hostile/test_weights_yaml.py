"""Weights, networks and YAML from places the project does not control (issue 32, items 2 and 3): YAML is
counted before it is built (aliases, depth, size), bundle references and interpolations are resolved with a
budget, every tensor of a weights file is checked before use, and no network argument may download anything.
In process, on real files; each refusal is one line naming the file or key."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from monai.networks.nets import UNet
from omegaconf import OmegaConf

from norm_experiments import safe_yaml
from norm_experiments.config import CONFIG_DIR
from norm_experiments.diagnose.network import instantiate_net, net_config, no_downloads
from norm_experiments.errors import UserError
from norm_experiments.safe_io import UnsafeFile
from norm_experiments.training import checkpoint as ckpt
from norm_experiments.training import run_folder
from tests.test_check import UNET, check_error


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (TimeoutError) instead of hanging: what the code before these checks did on each input here."""

    def stop(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def alias_bomb(target: str = "monai.networks.nets.UNet") -> str:
    """'Billion laughs': nine anchors, each a list of nine aliases to the one before; a few hundred bytes that
    expand to 9**9 (387 million) strings when built."""
    lines = [f"_target_: {target}", "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for previous, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]")
    return "\n".join(lines) + "\n"


def big_yaml(mib: float = 3.7) -> str:
    """A mapping of small values, `mib` MiB long: under the 4 MiB a YAML file may have, but each value becomes
    an OmegaConf node of about a kilobyte."""
    lines = ["_target_: monai.networks.nets.UNet", "x:"]
    lines += [f"  k{i:07d}: 0" for i in range(int(mib * 2**20) // 14)]  # 14 bytes a line
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (alias_bomb(), "expands to more than 50000 values"),
        (big_yaml(), "expands to more than 50000 values"),
        ("".join(" " * i + f"k{i}:\n" for i in range(3000)), "nested more than 64 levels deep"),
        ("x: &a [1, *a]\n", "alias *a (line 1) refers to no complete node"),
        ("a: 1\na: 2\n", "duplicate key a"),
        ("a: !!python/object/apply:os.system [ls]\n", "not valid YAML"),
        ("a: " + "9" * 5000 + "\n", "a number with too many digits"),
    ],
    ids=["alias-bomb", "3.7MiB", "deep", "self-alias", "duplicate", "python-tag", "long-int"],
)
def test_yaml_is_counted_before_it_is_built(text: str, reason: str) -> None:
    start = time.perf_counter()
    with pytest.raises(UnsafeFile) as err:
        safe_yaml.load(text, "net=n.yaml")
    assert time.perf_counter() - start < 1.0
    message = str(err.value)
    assert message.startswith("net=n.yaml: ") and reason in message and "\n" not in message, message


def test_yaml_within_bounds_reads_as_omegaconf_reads_it() -> None:
    """Every config of the project, and OmegaConf's own rules (1e-3 a float, no dates, merges), unchanged."""
    texts = [p.read_text() for p in sorted(CONFIG_DIR.rglob("*.yaml"))]
    texts.append("a: 1e-3\nb: 2020-01-01\nx: &x {k: 1}\ny: {<<: *x, j: [.inf, null, yes]}\n")
    for text in texts:
        assert safe_yaml.load(text, "t") == (OmegaConf.to_container(OmegaConf.create(text)) or None)


# ------------------------------------------------------------------------------------------ where YAML is read


def _bundle(folder: Path, name: str, text: str) -> Path:
    (folder / "configs").mkdir(parents=True)
    (folder / "configs" / name).write_text(text)
    return folder


@pytest.mark.parametrize("where", ["net-file", "bundle"])
@pytest.mark.parametrize("text", [alias_bomb(), big_yaml()], ids=["alias-bomb", "3.7MiB"])
def test_net_yaml_is_refused_before_it_is_built(where: str, text: str, tmp_path: Path) -> None:
    """A net= file or a bundle's inference.yaml: an alias bomb or 3.7 MiB of values, refused in one line."""
    if where == "net-file":
        net = tmp_path / "n.yaml"
        net.write_text(text)
    else:
        net = _bundle(tmp_path / "b", "inference.yaml", text.replace("_target_", "network_def: {}\nx"))
    with deadline(5), pytest.raises(UserError) as err:
        net_config(str(net))
    assert str(err.value).startswith(f"net={tmp_path}") and "expands to more than 50000 values" in str(
        err.value
    )


def test_bundle_references_are_resolved_within_a_budget(tmp_path: Path) -> None:
    """Four levels of 150 `@`-references (6 kB) would fill in 150**4 values."""
    config = {"l1": [0] * 150, "l2": ["@l1"] * 150, "l3": ["@l2"] * 150, "l4": ["@l3"] * 150}
    config["network_def"] = {**UNET, "_target_": "UNet", "act": "@l4"}
    folder = _bundle(tmp_path / "b", "inference.json", json.dumps(config))
    assert (folder / "configs" / "inference.json").stat().st_size < 8000
    with (
        deadline(5),
        pytest.raises(
            UserError, match=r"network_def.act.*more than 50000 values with its @-references filled in"
        ),
    ):
        net_config(str(folder))


def test_interpolations_that_refer_to_each_other_are_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    """net= keys that interpolate each other: norm-exp-check's one error line and exit 2, before the weights or
    the data are read."""
    (tmp_path / "n.yaml").write_text(
        yaml.safe_dump({**UNET, "in_channels": "${out_channels}", "out_channels": "${in_channels}"})
    )
    line = check_error(
        ["net=n.yaml", "weights=none.pt", "data=msd", "data.root=."], tmp_path, monkeypatch, capsys
    )
    assert "net.in_channels: interpolations that refer to each other" in line, line


def test_interpolations_are_expanded_within_a_budget() -> None:
    """Nine lists of nine references to the list before: the billion laughs of interpolations, inline."""
    net = {**UNET, "b0": [1] * 9} | {f"b{i}": [f"${{..b{i - 1}}}"] * 9 for i in range(1, 10)}
    with (
        deadline(5),
        pytest.raises(UserError, match="net.b4: refused, its interpolations expand to more than"),
    ):
        net_config(OmegaConf.create({"net": net}).net)
    kept = net_config(OmegaConf.create({"data": {"n": 3}, "net": {**UNET, "out_channels": "${data.n}"}}).net)
    assert kept.out_channels == 3  # a reference to the rest of the config still works


def test_saved_overrides_and_config_are_counted_before_they_are_built(tmp_path: Path) -> None:
    """resume=RUN_DIR reads .hydra/overrides.yaml; a refused resume reads run_config.yaml for its diff."""
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text(alias_bomb())
    (tmp_path / "run_config.yaml").write_text(alias_bomb())
    with deadline(5):
        with pytest.raises(UserError, match=r"resume=.*overrides.yaml: refused, it expands to more than"):
            run_folder.saved_overrides(tmp_path, CONFIG_DIR)
        assert run_folder._saved_config(tmp_path / "run_config.yaml") is None


# ------------------------------------------------------------------------------------------ weights


@pytest.fixture(scope="module")
def state_dict() -> dict:
    return UNet(**{k: v for k, v in UNET.items() if k != "_target_"}).state_dict()


def _nan(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.full_like(weight, float("nan")).to(dtype)


HOSTILE_WEIGHTS = {
    "complex64-nan": (lambda w: _nan(w, torch.complex64), "holds complex64 values"),
    "float8-nan": (lambda w: _nan(w, torch.float8_e4m3fn), "holds float8_e4m3fn values"),
    "4-bytes-as-2^20x2^20": (
        lambda w: torch.zeros(1).expand(2**20, 2**20),
        "is a 1048576x1048576 view of 4398046511104 bytes, larger than the 4 bytes of storage it views",
    ),
}


@pytest.mark.parametrize("name", HOSTILE_WEIGHTS)
def test_every_tensor_is_checked_before_use(name: str, state_dict: dict, tmp_path: Path) -> None:
    """As weights= of norm-exp-check (or trained= of explain), and as a resumable checkpoint's model."""
    make, reason = HOSTILE_WEIGHTS[name]
    key = next(k for k, v in state_dict.items() if v.is_floating_point())
    weights = {**state_dict, key: make(state_dict[key])}
    torch.save(weights, tmp_path / "w.pt")
    with deadline(5), pytest.raises(UserError) as err:
        ckpt.load_weights(tmp_path / "w.pt")
    assert str(err.value).startswith(f"{tmp_path / 'w.pt'}: {key} {reason}"), err.value
    checkpoint = {key: {} for key in ckpt.CHECKPOINT_KEYS} | {"model": weights}
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    with deadline(5), pytest.raises(UserError, match=f"checkpoint.pt: model.{key} {reason[:20]}"):
        ckpt.load(tmp_path / "checkpoint.pt")


def test_an_integer_key_is_refused(state_dict: dict, tmp_path: Path) -> None:
    torch.save({**state_dict, 0: next(iter(state_dict.values()))}, tmp_path / "w.pt")
    with pytest.raises(UserError, match=r"w.pt: the key 0 \(int\) is not a parameter name"):
        ckpt.load_weights(tmp_path / "w.pt")


def test_complex_nan_weights_are_one_line_of_norm_exp_check(
    state_dict: dict, tmp_path: Path, monkeypatch, capsys
) -> None:
    """They passed the NaN check and the check said the model "is fine in model.eval()" with Dice 0.000."""
    key = next(k for k, v in state_dict.items() if v.is_floating_point())
    torch.save({**state_dict, key: _nan(state_dict[key], torch.complex64)}, tmp_path / "w.pt")
    (tmp_path / "n.yaml").write_text(yaml.safe_dump(UNET))
    line = check_error(
        ["net=n.yaml", "weights=w.pt", "data=msd", "data.root=."], tmp_path, monkeypatch, capsys
    )
    assert f"w.pt: {key} holds complex64 values" in line, line


# ------------------------------------------------------------------------------------------ no downloads


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch) -> Path:
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if not p.is_dir()]


def test_a_network_argument_naming_a_url_downloads_nothing(
    state_dict: dict, torch_home: Path, tmp_path: Path
) -> None:
    """HoVerNet's pretrained_url: file://... fetched the file into torch hub's cache before anything refused."""
    torch.save(state_dict, tmp_path / "weights.pth")
    (tmp_path / "n.yaml").write_text(
        yaml.safe_dump(
            {
                "_target_": "monai.networks.nets.HoVerNet",
                "pretrained_url": (tmp_path / "weights.pth").as_uri(),
            }
        )
    )
    with pytest.raises(UserError, match="net.pretrained_url=file://.*names weights to download or load"):
        instantiate_net(net_config(str(tmp_path / "n.yaml")))
    assert _files(torch_home) == []


@pytest.mark.parametrize(
    ("net", "reason"),
    [
        (
            {
                "_target_": "monai.networks.nets.DenseNet121",
                "spatial_dims": 2,
                "in_channels": 1,
                "out_channels": 2,
                "pretrained": True,
            },
            "net.pretrained=True: names weights",
        ),
        (
            {"_target_": "monai.networks.nets.EfficientNetBN", "model_name": "efficientnet-b0"},
            "EfficientNetBN loads pretrained weights by default (pretrained=True)",
        ),
        ({**UNET, "act": "https://example.org/act"}, "net.act=https://example.org/act: a URL"),
    ],
    ids=["pretrained", "pretrained-by-default", "url"],
)
def test_arguments_that_would_download_are_refused_before_building(net: dict, reason: str) -> None:
    with pytest.raises(UserError) as err:
        net_config(OmegaConf.create({"net": net}).net)
    assert reason in str(err.value), err.value


def test_building_a_network_cannot_download(state_dict: dict, torch_home: Path, tmp_path: Path) -> None:
    """The backstop for a class that downloads through arguments nobody listed: while a network is built,
    every URL opened is refused (and said), even when the class catches the refusal."""
    torch.save(state_dict, tmp_path / "weights.pth")
    with pytest.raises(UserError, match=r"net: X tried to download \(urllib.Request file://"):
        with no_downloads("net: X"):
            with contextlib.suppress(Exception):  # a class that swallows the refusal
                torch.hub.load_state_dict_from_url((tmp_path / "weights.pth").as_uri())
    assert _files(torch_home) == []
    assert torch.hub.load_state_dict_from_url((tmp_path / "weights.pth").as_uri()).keys() == state_dict.keys()
