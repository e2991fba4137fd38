"""`tensorboard --logdir SWEEP_DIR` shows every run of a sweep side by side: a real TensorBoard server on
loopback, read back through its HTTP data API."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from norm_experiments.training.loop import train
from tests.helpers import compose_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_tensorboard_serves_each_run_with_its_scalars(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    names, final_dice = [], {}
    for norm, seed in (("batch", 0), ("group", 1)):
        name = f"norm={norm},seed={seed}"
        cfg = compose_config(["experiment=smoke", "trainer.samples=4", f"norm={norm}", f"seed={seed}"])
        metrics = train(cfg, sweep / name)
        assert metrics["status"] == "completed"
        names.append(name)
        final_dice[name] = metrics["val_dice"]

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(sweep),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--load_fast",
            "false",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        runs: list = []
        deadline = time.time() + 60
        while time.time() < deadline and sorted(runs) != names:
            try:
                runs = get_json(f"{base}/data/runs")  # type: ignore[assignment]
            except OSError:
                pass
            time.sleep(0.5)
        assert sorted(runs) == names, runs
        tags = get_json(f"{base}/data/plugin/scalars/tags")
        for name in names:
            assert {"train/loss", "val/dice_mean", "hparam/val_dice"} <= set(tags[name])  # type: ignore[index]
        assert "val/dice_mean_running" in tags["norm=batch,seed=0"]  # type: ignore[index]
        points = get_json(
            f"{base}/data/plugin/scalars/scalars?run=norm%3Dgroup%2Cseed%3D1&tag=val%2Fdice_mean"
        )
        # [wall_time, step, value]: the server shows the final Dice the run recorded
        assert points[-1][1] == 2 and abs(points[-1][2] - final_dice["norm=group,seed=1"]) < 1e-6
    finally:
        server.terminate()
        server.wait(timeout=10)
