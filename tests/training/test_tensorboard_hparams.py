"""The HParams declaration and the panel legend, read back from a real event file (no training): the study's
axes are the only differing hparams, also when the learning rate follows the batch size (TensorBoard ticks
the first five differing columns, so a sixth hid the seed, seen in a browser on an 18-run sweep)."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.utils.tensorboard import SummaryWriter

from norm_experiments.training.tensorboard import METRICS, STUDY_AXES, class_legend, log_hparams

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
