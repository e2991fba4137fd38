"""TensorBoard output of a run: scalars, a validation slice, and the HParams view, all in the run dir.

Events go straight into the run dir (not a sub-folder), so `tensorboard --logdir SWEEP_DIR` names each run
after its folder (norm, batch size, seed). The HParams summary is written into the same event file instead of
SummaryWriter.add_hparams, which would create an extra, time-stamped run.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams


def open_writer(run_dir: Path, resume_step: int | None = None) -> SummaryWriter:
    """A writer into run_dir; on resume, events after the checkpoint's step are discarded (purge_step)."""
    return SummaryWriter(log_dir=str(run_dir), purge_step=resume_step)


def remove_events(run_dir: Path) -> None:
    """Delete the event files of an earlier attempt at this run that is starting over (killed before its
    first checkpoint, or trainer.overwrite): TensorBoard would draw both attempts' curves over each other."""
    for path in run_dir.glob("events.out.tfevents.*"):
        path.unlink(missing_ok=True)


def log_hparams(writer: SummaryWriter, params: dict, metrics: dict[str, float]) -> None:
    """Hyperparameters with final metrics, shown in TensorBoard's HParams view."""
    clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
    for summary in hparams(clean, metrics):
        writer.file_writer.add_summary(summary)
    for name, value in metrics.items():
        writer.add_scalar(name, value)


def slice_panel(
    image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """One axial slice as a (3, H, 3W) image: input | ground truth | prediction (classes as gray levels).

    The slice is the one with the most foreground, so the panel shows the structures being segmented.
    """
    depth_axis = -1
    fg = (label > 0).flatten(0, -2).sum(0) if label.dim() == 3 else None
    index = int(fg.argmax()) if fg is not None and fg.sum() > 0 else label.shape[depth_axis] // 2
    img = image[..., index].float()
    img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-8)
    scale = max(num_classes - 1, 1)
    panel = torch.cat([img, label[..., index].float() / scale, pred[..., index].float() / scale], dim=1)
    return panel.unsqueeze(0).repeat(3, 1, 1)


class NoWriter:
    """Stands in for the TensorBoard writer on ranks other than 0: every call does nothing."""

    def __getattr__(self, name: str) -> NoWriter:
        return self

    def __call__(self, *args, **kwargs) -> None:
        return None
