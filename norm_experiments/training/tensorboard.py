"""TensorBoard output of a run: scalars, captioned validation slices, a chart layout and the HParams view,
all in the run dir.

Events go straight into the run dir (not a sub-folder), so `tensorboard --logdir SWEEP_DIR` names each run
after its folder. Every point is logged at x = training patches seen (optimizer steps x patches per step, all
ranks), so that runs at different batch sizes line up on the same data. The HParams summary is written into
the same event file instead of SummaryWriter.add_hparams, which would create an extra, time-stamped run;
every run writes the same experiment declaration (TensorBoard shows the first one it finds), which names the
study's axes as differing and lists every metric, BatchNorm's evaluation modes included.

Tag groups: `Final/`, `Training/`, `Validation/`, then the diagnostics `bn_stats/` and `batchrenorm/`. The
first three are capitalised because TensorBoard's Time Series tab orders groups by name with upper case first:
a user who opens it sees the scores before the per-layer statistics. `Final/` holds each final score as a
single point: TensorBoard's default smoothing (0.6) bends the end of a curve of a few validations away from
the run's score, and a single point it leaves as it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from torch.utils.tensorboard import SummaryWriter

from norm_experiments.norms.registry import EVAL_MODES

if TYPE_CHECKING:
    from norm_experiments.training.evaluate import ValResult

# HParams columns: (record key, column title). The study's axes are declared as differing, so TensorBoard
# shows them (and only them) by default and draws them in the parallel-coordinates view.
STUDY_AXES = {
    "norm": "norm",
    "batch_size": "batch size",
    "seed": "seed",
    "intensity": "intensity",
    "dataset": "dataset",
}
OTHER_HPARAMS = {
    "lr": "learning rate",
    "model": "model",
    "patches_per_volume": "patches per volume",
    "effective_batch": "patches per step",
    "world_size": "GPUs",
    "global_batch": "patches per step, all GPUs",
    "budget_unit": "budget unit",
    "lr_scaling": "lr scaling",
}
# Metrics: the run's own Validation/ scalars (their last value is the final score).
METRICS = {
    "Validation/dice_mean": "Dice (model.eval())",
    "Validation/hd95_mean": "HD95 mm (model.eval())",
    **{f"Validation/dice_mean_{mode}": f"Dice, {mode} statistics" for mode in EVAL_MODES},
    **{f"Validation/hd95_mean_{mode}": f"HD95 mm, {mode} statistics" for mode in EVAL_MODES},
}
MODE_NOTE = (
    "BatchNorm-family runs: scored with {mode} statistics. A run of any other norm has no batch statistics, so "
    "every mode is its model.eval() score; runs with trainer.eval_modes=false have none."
)
METRIC_NOTES = {
    f"Validation/{kind}_mean_{mode}": MODE_NOTE.format(mode=mode)
    for kind in ("dice", "hd95")
    for mode in EVAL_MODES
}
# The Custom Scalars tab: validation first, BatchNorm's evaluation modes on one chart.
LAYOUT = {
    "final scores (one point each: what metrics.json says)": {
        "Dice": ["Multiline", [r"^Final/dice_mean"]],
        "HD95 mm": ["Multiline", [r"^Final/hd95_mean"]],
    },
    "validation (x: training patches seen)": {
        "Dice, model.eval()": ["Multiline", [r"^Validation/dice_mean$"]],
        "Dice per class": ["Multiline", [r"^Validation/dice_(?!mean)"]],
        "HD95 mm (final)": ["Multiline", [r"^Validation/hd95_mean"]],
    },
    "BatchNorm evaluation modes (x: training patches seen)": {
        "Dice: model.eval() curve, final running / precise / batch statistics": [
            "Multiline",
            [r"^Validation/dice_mean(_running|_precise|_batch)?$"],
        ],
    },
    "training (x: training patches seen)": {
        "loss": ["Multiline", [r"^Training/loss$"]],
        "learning rate": ["Multiline", [r"^Training/lr$"]],
    },
}


COLOUR_NAMES = ("blue", "orange", "green", "red", "purple", "brown", "pink", "gray", "olive", "cyan")  # tab10


class PatchStepWriter(SummaryWriter):
    """A SummaryWriter whose global_step arguments are optimizer steps and whose points land at x = training
    patches seen (step x patches_per_step): the training loop counts steps, the charts count data."""

    def __init__(self, log_dir: str, purge_step: int | None, patches_per_step: int) -> None:
        self.patches_per_step = patches_per_step
        # Steps up to the checkpoint's are kept (that step's validation was logged before it was saved); a
        # resumed run logs from the next step on: whatever lies beyond the checkpoint is discarded.
        purge = None if purge_step is None else purge_step * patches_per_step + 1
        super().__init__(log_dir=log_dir, purge_step=purge)

    def _x(self, step: int | None) -> int | None:
        return None if step is None else step * self.patches_per_step

    def add_scalar(self, tag, scalar_value, global_step=None, *args, **kwargs):  # type: ignore[override]
        super().add_scalar(tag, scalar_value, self._x(global_step), *args, **kwargs)

    def add_image(self, tag, img_tensor, global_step=None, *args, **kwargs):  # type: ignore[override]
        super().add_image(tag, img_tensor, self._x(global_step), *args, **kwargs)


def open_writer(run_dir: Path, resume_step: int | None = None, patches_per_step: int = 1) -> SummaryWriter:
    """A writer into run_dir, x in training patches (see PatchStepWriter), with the chart layout; on resume
    (resume_step: the checkpoint's step), what the interrupted attempt logged after it is discarded."""
    writer = PatchStepWriter(str(run_dir), resume_step, patches_per_step)
    if resume_step is None:
        writer.add_custom_scalars(LAYOUT)
    return writer


def remove_events(run_dir: Path) -> None:
    """Delete the event files of an earlier attempt at this run that is starting over (killed before its
    first checkpoint, or trainer.overwrite): TensorBoard would draw both attempts' curves over each other."""
    for path in run_dir.glob("events.out.tfevents.*"):
        path.unlink(missing_ok=True)


def log_hparams(writer: SummaryWriter, record: Mapping, completed: bool = True) -> None:
    """The HParams view: this run's hyperparameters from its record and the experiment declaration shared by
    every run (study axes differing; every metric, whether or not this run logs it); with `completed`, its end.
    Written when the run starts too (completed=False), so that an unfinished or interrupted run has its row,
    with the metrics it has logged so far; the copy at the end holds the same values."""
    # Exactly the study's axes differ: TensorBoard shows the first five differing columns by default, so a
    # sixth (the learning rate, which follows the batch size) would hide the seed.
    varied = STUDY_AXES
    start = plugin_data_pb2.SessionStartInfo()
    infos = []
    for key, title in {**STUDY_AXES, **OTHER_HPARAMS}.items():
        value = record.get(key)
        # Whole numbers (batch size, seed, GPUs) as text: TensorBoard prints a number as 1.0000.
        if isinstance(value, (bool, int)) or not isinstance(value, float):
            start.hparams[key].string_value = str(value)
            kind = api_pb2.DATA_TYPE_STRING
        else:
            start.hparams[key].number_value = float(value)
            kind = api_pb2.DATA_TYPE_FLOAT64
        infos.append(api_pb2.HParamInfo(name=key, display_name=title, type=kind, differs=key in varied))
    metrics = [
        api_pb2.MetricInfo(
            name=api_pb2.MetricName(tag=tag), display_name=title, description=METRIC_NOTES.get(tag, "")
        )
        for tag, title in METRICS.items()
    ]
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics)
    parts = [
        (metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment)),
        (metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=start)),
    ]
    if completed:
        end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS)
        parts.append((metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end)))
    for tag, data in parts:
        data.version = metadata.PLUGIN_DATA_VERSION
        plugin = SummaryMetadata.PluginData(
            plugin_name=metadata.PLUGIN_NAME, content=data.SerializeToString()
        )
        summary = Summary(value=[Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin))])
        writer.file_writer.add_summary(summary)


def log_scores(
    writer: SummaryWriter, result: ValResult, class_names: Sequence[str], step: int, suffix: str = ""
) -> None:
    """Validation/dice_mean{suffix}, per class, and HD95 when computed; absent classes are not logged. A suffix
    (an evaluation mode) gets the means only."""
    writer.add_scalar(f"Validation/dice_mean{suffix}", result.dice_mean, step)
    if result.hd95_mean is not None:
        writer.add_scalar(f"Validation/hd95_mean{suffix}", result.hd95_mean, step)
    if suffix:
        return
    for name, dice in zip(class_names, result.dice_per_class):
        if dice is not None:
            writer.add_scalar(f"Validation/dice_{name}", dice, step)
    for name, hd95 in zip(class_names, result.hd95_per_class or []):
        if hd95 is not None:
            writer.add_scalar(f"Validation/hd95_{name}", hd95, step)
    if result.example is not None:
        writer.add_image(
            "Validation/slice_input_truth_prediction", slice_panel(*result.example, class_names), step
        )


def log_training(
    writer: SummaryWriter,
    step: int,
    training: Mapping[str, float | None],
    bn_stats: Mapping[str, float],
    renorm: Mapping[str, float],
) -> None:
    """Training/ scalars (loss, its window mean, lr, samples per s) and the diagnostics bn_stats/ (BatchNorm's
    batch against running statistics) and batchrenorm/ (its r and d)."""
    for group, scalars in (("Training", training), ("bn_stats", bn_stats), ("batchrenorm", renorm)):
        for name, value in scalars.items():
            writer.add_scalar(f"{group}/{name}", value, step)


def log_final_scores(writer: SummaryWriter, record: Mapping, step: int) -> None:
    """`Final/` scalars: the record's final scores (metrics.json), one point each at the last step."""
    scores = {"Final/dice_mean": record.get("val_dice"), "Final/hd95_mean": record.get("val_hd95")}
    for mode, value in (record.get("eval_modes") or {}).items():
        scores[f"Final/dice_mean_{mode}"] = value
    for tag, value in scores.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(tag, value, step)


# ------------------------------------------------------------------------------------ the image panels


def slice_panel(
    image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor, class_names: Sequence[str]
) -> torch.Tensor:
    """Image | truth | prediction of one axial slice, captioned, classes as a colour overlay: (3, H, W)."""
    return captioned_panel(image, label, {"prediction (model.eval())": pred}, class_names)


def log_mode_panel(
    writer: SummaryWriter, examples: Mapping[str, tuple | None], class_names: Sequence[str], step: int
) -> None:
    """Validation/slice_eval_modes: the same slice predicted in each BatchNorm evaluation mode, side by side."""
    first = next((e for e in examples.values() if e is not None), None)
    if first is None:
        return
    image, label, _ = first
    ordered = [mode for mode in EVAL_MODES if examples.get(mode) is not None]
    predictions = {f"{mode} statistics": examples[mode][2] for mode in ordered}  # type: ignore[index]
    writer.add_image(
        "Validation/slice_eval_modes", captioned_panel(image, label, predictions, class_names), step
    )


def radiological(slice_xy: torch.Tensor) -> np.ndarray:
    """An axial slice of a RAS volume (the pipeline reorients every case to RAS), (x, y) -> (rows, columns)
    as radiologists view it: the patient's right on the left of the screen, anterior at the top."""
    return slice_xy.flip(0).flip(1).T.cpu().numpy()


def class_legend(class_names: Sequence[str]) -> str:
    """Each foreground class by name with its overlay colour (tab10 order, as captioned_panel draws them)."""
    return ", ".join(f"{name.replace('_', ' ')} {COLOUR_NAMES[i % 10]}" for i, name in enumerate(class_names))


def captioned_panel(
    image: torch.Tensor,
    label: torch.Tensor,
    predictions: Mapping[str, torch.Tensor],
    class_names: Sequence[str],
) -> torch.Tensor:
    """One axial slice (the one with the most foreground in the truth): the image, then the truth and each
    prediction as colours over it, each with its caption; the title names each foreground class (label 1,
    2, ...: `class_names`) with its colour. Returns a (3, H, W) uint8 image."""
    num_classes = len(class_names) + 1
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colormaps
    from matplotlib import pyplot as plt
    from matplotlib.colors import ListedColormap

    foreground = (label > 0).flatten(0, 1).sum(0)
    index = int(foreground.argmax()) if foreground.sum() > 0 else label.shape[-1] // 2
    gray = radiological(image[..., index].float())
    colours = [(0, 0, 0, 0)] + [(*colormaps["tab10"](c % 10)[:3], 0.55) for c in range(num_classes - 1)]
    overlay = ListedColormap(colours)
    maps = {"truth": label, **predictions}
    fig, axes = plt.subplots(1, 1 + len(maps), figsize=(2.4 * (1 + len(maps)), 2.9), dpi=80)
    for ax, (title, labels) in zip(axes, [("image", None), *maps.items()]):
        ax.imshow(gray, cmap="gray", interpolation="nearest")
        if labels is not None:
            values = radiological(labels[..., index])
            ax.imshow(values, cmap=overlay, vmin=0, vmax=num_classes - 1, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.02, 0.5, "R", transform=ax.transAxes, color="yellow", fontsize=8, va="center")
    fig.suptitle(
        f"axial slice {index}, radiological view (patient's right on the left); {class_legend(class_names)}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return torch.from_numpy(pixels).permute(2, 0, 1)


class NoWriter:
    """Stands in for the TensorBoard writer on ranks other than 0: every call does nothing."""

    def __getattr__(self, name: str) -> NoWriter:
        return self

    def __call__(self, *args, **kwargs) -> None:
        return None
