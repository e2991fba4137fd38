"""TensorBoard at a glance, read back from a real 2-run sweep through the CLI: run folders named with the swept
key first, per-mode Dice scalars at x = training patches seen, captioned colour panels, one chart layout, and
one HParams experiment (the study's axes differing, every metric listed by every run); then a real
TensorBoard server on loopback serves the same through its HTTP data API."""

from __future__ import annotations

import io
import json
import re
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from norm_experiments.training.tensorboard import METRICS, STUDY_AXES
from tests.helpers import metrics_of, run_cli

# Subprocess runs of the real CLI or trainings: the full suite runs them, `pytest -m "not slow"` does not.
pytestmark = pytest.mark.slow

SWEEP = ["-m", "experiment=smoke", "name=tb", "norm=batch,group", "seed=1", "trainer.num_threads=1"]
RUNS = ["norm=batch", "norm=group"]  # the swept key only: what every run shares is left out
MODES = ("running", "precise", "batch")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("tb")
    result = run_cli(SWEEP, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "outputs" / "sweeps" / "tb"


def events(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def hparams_data(acc: EventAccumulator, tag: str) -> plugin_data_pb2.HParamsPluginData:
    return plugin_data_pb2.HParamsPluginData.FromString(acc.PluginTagToContent("hparams")[tag])


def test_run_folders_start_with_the_swept_key(sweep: Path) -> None:
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == RUNS


def test_mode_scalars_at_patches_seen(sweep: Path) -> None:
    for name in RUNS:
        acc, record = events(sweep / name), metrics_of(sweep / name)
        dice = acc.Scalars("Validation/dice_mean")
        assert [e.step for e in dice] == [h["samples_seen"] for h in record["history"]]  # x: patches seen
        assert dice[-1].step == record["samples_seen"] == 16 and record["steps"] == 8
        assert dice[-1].value == pytest.approx(record["val_dice"], abs=1e-6)
        assert not any(tag.startswith("hparam/") for tag in acc.Tags()["scalars"])  # no duplicate points
        # Final/: each final score of metrics.json as one point at the last x
        final = {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"] if tag.startswith("Final/")}
        assert [(e.step, e.value) for e in final["Final/dice_mean"]] == [
            (16, pytest.approx(record["val_dice"]))
        ]
        for mode, value in (record.get("eval_modes") or {}).items():
            assert [e.value for e in final[f"Final/dice_mean_{mode}"]] == [pytest.approx(value)]
    acc, record = events(sweep / RUNS[0]), metrics_of(sweep / RUNS[0])
    for mode in MODES:
        points = acc.Scalars(f"Validation/dice_mean_{mode}")
        assert points[-1].step == 16
        assert points[-1].value == pytest.approx(record["eval_modes"][mode], abs=1e-6)
    # GroupNorm has no batch statistics: one point per mode, its own final score, so that the parallel-
    # coordinates view (which leaves out runs lacking a metric) keeps it beside BatchNorm's modes.
    acc, record = events(sweep / RUNS[1]), metrics_of(sweep / RUNS[1])
    assert "eval_modes" not in record
    for mode in MODES:
        points = acc.Scalars(f"Validation/dice_mean_{mode}")
        assert [(e.step, e.value) for e in points] == [(16, pytest.approx(record["val_dice"], abs=1e-6))]


def decoded(acc: EventAccumulator, tag: str) -> np.ndarray:
    return mpimg.imread(io.BytesIO(acc.Images(tag)[-1].encoded_image_string), format="png")


def test_image_panels_are_captioned_colour_overlays(sweep: Path) -> None:
    batch, group = events(sweep / RUNS[0]), events(sweep / RUNS[1])
    assert "Validation/slice_eval_modes" not in group.Tags()["images"]  # no modes to compare
    single = decoded(group, "Validation/slice_input_truth_prediction")
    modes = decoded(batch, "Validation/slice_eval_modes")
    assert modes.shape[1] > 1.5 * single.shape[1]  # image, truth and three predictions vs one
    for panel in (single, modes):
        rgb = panel[..., :3]
        coloured = (rgb.max(-1) - rgb.min(-1)) > 0.25  # the class overlay; the image itself is gray
        assert coloured.mean() > 0.01
        dark = rgb.max(-1) < 0.2  # caption text (and the darkest image voxels)
        assert dark[: panel.shape[0] // 8].any()  # the title line above the slices


def test_one_hparams_experiment_with_the_study_axes_and_every_metric(sweep: Path) -> None:
    experiments = []
    for name in RUNS:
        acc = events(sweep / name)
        experiment = hparams_data(acc, "_hparams_/experiment").experiment
        experiments.append(experiment.SerializeToString())
        differing = {info.name for info in experiment.hparam_infos if info.differs}
        assert differing == set(STUDY_AXES)  # smoke: lr_scaling none, so lr stays constant
        assert [m.name.tag for m in experiment.metric_infos] == list(METRICS)
        assert {f"Validation/dice_mean_{mode}" for mode in MODES} <= set(METRICS)
        start = hparams_data(acc, "_hparams_/session_start_info").session_start_info
        assert start.hparams["norm"].string_value == name.split(",")[0].split("=")[1]
        # whole numbers as text (TensorBoard shows a number as 2.0000), the learning rate a number
        assert start.hparams["batch_size"].string_value == "2" and start.hparams["seed"].string_value == "1"
        assert start.hparams["lr"].number_value > 0
    assert experiments[0] == experiments[1]  # whichever run TensorBoard reads first, the same declaration


def test_custom_scalars_put_the_three_modes_on_one_chart(sweep: Path) -> None:
    acc = events(sweep / RUNS[0])
    content = acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    layout = layout_pb2.Layout.FromString(content)
    assert layout.category[0].title.startswith("final scores")
    assert layout.category[1].title.startswith("validation")
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    modes_chart = next(tags for title, tags in charts.items() if "precise" in title)
    matched = {t for t in acc.Tags()["scalars"] if any(re.search(p, t) for p in modes_chart)}
    assert matched == {"Validation/dice_mean", *(f"Validation/dice_mean_{mode}" for mode in MODES)}


def get_json(url: str, body: dict | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_tensorboard_serves_runs_scalars_and_one_hparams_experiment(sweep: Path) -> None:
    with browser_views().tensorboard(sweep) as base:  # the server the tutorial's screenshots come from
        runs: list = []
        deadline = time.time() + 60
        while time.time() < deadline and sorted(runs) != RUNS:
            try:
                runs = get_json(f"{base}/data/runs")  # type: ignore[assignment]
            except OSError:
                pass
            time.sleep(0.5)
        assert sorted(runs) == RUNS, runs
        tags = get_json(f"{base}/data/plugin/scalars/tags")
        assert {"Training/loss", "Validation/dice_mean", "Validation/dice_mean_precise"} <= set(tags[RUNS[0]])  # type: ignore[index]
        points = get_json(
            f"{base}/data/plugin/scalars/scalars?run={RUNS[1]}&tag=Validation/dice_mean".replace(",", "%2C")
        )
        final = metrics_of(sweep / RUNS[1])["val_dice"]
        assert points[-1][1] == 16 and abs(points[-1][2] - final) < 1e-6  # type: ignore[index]
        experiment = get_json(f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
        infos = {h["name"]: h for h in experiment["hparamInfos"]}  # type: ignore[index]
        assert {name for name, h in infos.items() if h.get("differs")} == set(STUDY_AXES)
        metric_tags = [m["name"]["tag"] for m in experiment["metricInfos"]]  # type: ignore[index]
        assert metric_tags == list(METRICS)
        layout = get_json(f"{base}/data/plugin/custom_scalars/layout")
        assert layout["category"][0]["title"].startswith("final scores")  # type: ignore[index]
        # the final score as a point of its own: TensorBoard's smoothing leaves a single point as it is
        final_points = get_json(
            f"{base}/data/plugin/scalars/scalars?run={RUNS[1]}&tag=Final/dice_mean".replace(",", "%2C")
        )
        assert len(final_points) == 1 and abs(final_points[0][2] - final) < 1e-6  # type: ignore[index,arg-type]


def browser_views():
    """scripts/browser_views.py (a TensorBoard server, and a browser where one is installed)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    try:
        import browser_views as module
    finally:
        sys.path.pop(0)
    return module


def test_a_browser_shows_grouped_runs_and_the_scores_of_metrics_json(sweep: Path) -> None:
    """Chromium opens TensorBoard and report.html as a user would: the runs are listed by what differs
    (grouped by norm), the Final/dice_mean data table shows each run's metrics.json score, unbent by the
    default smoothing, the HParams table shows whole numbers as such and the same scores, and the HTML
    report's table shows the means of the runs' scores."""
    views_module = browser_views()
    if not views_module.browser_available():
        pytest.skip("needs Chromium and playwright (apt-get install chromium && pip install playwright)")
    views = views_module.capture(sweep)
    assert views.runs == RUNS
    for run in RUNS:
        record = metrics_of(sweep / run)
        assert views.final_dice[run] == round(record["val_dice"], 4)
        assert views.smoothed_dice[run] == views.final_dice[run]
        i = views.hparams_cells.index(
            run
        )  # Trial ID, metrics toggle, batch size, dataset, intensity, norm, seed
        row = views.hparams_cells[i : i + 8]
        assert row[2] == str(record["batch_size"]) == "2" and row[5] == record["norm"]
        assert row[6] == str(record["seed"]) and float(row[7]) == pytest.approx(record["val_dice"], rel=1e-4)
    assert views.report_text, "report.html was not written"
    for norm in ("batch", "group"):
        mean = metrics_of(sweep / f"norm={norm}")["val_dice"]  # one seed per norm in this sweep
        assert f"{norm}\t{mean:.3f}" in views.report_text
