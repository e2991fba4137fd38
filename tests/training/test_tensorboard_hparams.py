"""The HParams declaration, the panel legend and the scalars of a validation and of a training step, read
back from a real event file (no training). The study's axes are the only differing hparams, also when the
learning rate follows the batch size (TensorBoard ticks the first five differing columns, so a sixth hid the
seed, seen in a browser on an 18-run sweep)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.utils.tensorboard import SummaryWriter

from norm_experiments.training.evaluate import ValResult
from norm_experiments.training.tensorboard import (
    METRICS,
    STUDY_AXES,
    class_legend,
    log_hparams,
    log_scores,
    log_training,
)

RECORD = {
    "norm": "batch",
    "batch_size": 2,
    "seed": 1,
    "intensity": "zscore",
    "dataset": "brain",
    "lr": 0.003,
    "lr_scaling": "sqrt",  # the quick study's: lr differs between runs
    "model": "unet",
}


def declared_experiment(tmp_path: Path):
    writer = SummaryWriter(str(tmp_path))
    log_hparams(writer, RECORD)
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/experiment"]
    return plugin_data_pb2.HParamsPluginData.FromString(content).experiment


def test_only_the_study_axes_differ_when_the_lr_follows_the_batch_size(tmp_path: Path) -> None:
    experiment = declared_experiment(tmp_path)
    differing = [info.name for info in experiment.hparam_infos if info.differs]
    assert sorted(differing) == sorted(STUDY_AXES) and len(differing) == 5 and "seed" in differing
    assert {info.name for info in experiment.hparam_infos} >= {"lr", "model"}  # still listed, unticked


def test_mode_metrics_say_what_other_norms_show(tmp_path: Path) -> None:
    notes = {m.name.tag: m.description for m in declared_experiment(tmp_path).metric_infos}
    assert list(notes) == list(METRICS)
    assert "model.eval()" in notes["Validation/dice_mean_batch"] and notes["Validation/dice_mean"] == ""


def test_legend_names_each_class_with_its_colour() -> None:
    assert class_legend(["grey_matter", "white_matter"]) == "grey matter blue, white matter orange"


def scalars_written(tmp_path: Path, log) -> dict[str, list[tuple[int, float]]]:
    writer = SummaryWriter(str(tmp_path))
    log(writer)
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scores_per_class_leave_out_absent_classes_and_modes_get_the_means_only(tmp_path: Path) -> None:
    result = ValResult(0.5, [0.75, None], 3.0, [2.0, None], absent=[2], example=None)
    scalars = scalars_written(
        tmp_path,
        lambda w: (
            log_scores(w, result, ["liver", "tumour"], 40),
            log_scores(w, result, ["liver", "tumour"], 40, suffix="_batch"),
        ),
    )
    assert scalars == {
        "Validation/dice_mean": [(40, 0.5)],
        "Validation/hd95_mean": [(40, 3.0)],
        "Validation/dice_liver": [(40, 0.75)],
        "Validation/hd95_liver": [(40, 2.0)],
        "Validation/dice_mean_batch": [(40, 0.5)],
        "Validation/hd95_mean_batch": [(40, 3.0)],
    }


def test_training_scalars_and_diagnostics_go_to_their_groups(tmp_path: Path) -> None:
    scalars = scalars_written(
        tmp_path,
        lambda w: log_training(
            w, 8, {"loss": 0.25, "lr": 0.001}, {"encoder.0.mean_gap": 0.5}, {"encoder.0.r_max": 1.5}
        ),
    )
    assert scalars == {
        "Training/loss": [(8, 0.25)],
        "Training/lr": [(8, pytest.approx(0.001))],
        "bn_stats/encoder.0.mean_gap": [(8, 0.5)],
        "batchrenorm/encoder.0.r_max": [(8, 1.5)],
    }


@pytest.mark.slow
def test_tensorboard_holds_the_final_scores_before_the_record_says_completed(
    tmp_path: Path, monkeypatch
) -> None:
    """Killed just after metrics.json said completed, a run lost its Final/ scalars and the HParams end for good:
    they were written after the record, and the same command finds a completed run and does nothing. Here the
    process dies as the completed record is written: TensorBoard's copy is already on disk."""
    from norm_experiments.training import record as records
    from norm_experiments.training.loop import train
    from tests.helpers import compose_config

    written = records.write_record

    def die_at_completed(run, record: dict) -> dict:
        if record["status"] == "completed":
            raise RuntimeError("killed while writing the completed record")
        return written(run, record)

    monkeypatch.setattr(records, "write_record", die_at_completed)
    cfg = compose_config(
        ["experiment=smoke", "trainer.samples=4", "trainer.validations=1", "trainer.num_threads=1"]
    )
    with pytest.raises(RuntimeError, match="killed while writing"):
        train(cfg, tmp_path)
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert {"Final/dice_mean", "Final/hd95_mean"} <= set(acc.Tags()["scalars"])
    ends = [tag for tag in acc.summary_metadata if "session_end_info" in str(plugin_data(acc, tag))]
    assert ends, "the HParams session end is written before the record"


def plugin_data(acc: EventAccumulator, tag: str) -> plugin_data_pb2.HParamsPluginData:
    data = plugin_data_pb2.HParamsPluginData()
    data.ParseFromString(acc.SummaryMetadata(tag).plugin_data.content)
    return data
