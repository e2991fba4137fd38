"""a. Overhead ratio: Run.train_step against a bare PyTorch step on the same model, batch and device, with
paired blocks added until the ratio's 95 % interval is narrow enough (or a time cap)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks.common import (
    Context,
    Prepared,
    Ratio,
    Times,
    describe_cfg,
    fmt,
    interval_verdict,
    loss_function,
    median,
    paired_ratio,
    prepare,
    table,
    timeit,
    twin_model,
)
from norm_experiments.norms import BNStatMonitor
from norm_experiments.norms.bn_common import tracks_running_stats

TARGET = 1.05  # ours / bare at the upper end of the interval
HALF_WIDTH = 0.02  # the interval is narrow enough when its half-width is at most this


def bare_step(prep: Prepared) -> Callable[[], None]:
    """The bare PyTorch step, at the Run's precision (bf16 autocast on CUDA, fp32 on CPU)."""
    model, optimizer = twin_model(prep.run)
    model.train()
    loss_fn = loss_function()

    def step() -> None:
        optimizer.zero_grad()
        with prep.run.autocast():
            loss = loss_fn(model(prep.images), prep.labels)
        loss.backward()
        optimizer.step()

    return step


def monitored_step(prep: Prepared, monitor: BNStatMonitor) -> Callable[[], None]:
    """Run.train_step with the BN statistics hooks on, as Run.loop runs it on the steps it logs."""

    def step() -> None:
        monitor.enabled = True
        prep.trainer.train_step(prep.images, prep.labels)
        monitor.enabled = False

    return step


def precise_enough(times: Times) -> bool:
    return paired_ratio(times["ours"], times["bare"]).half_width <= HALF_WIDTH


def ratio_row(
    norm: str, label: str, times: list[float], bare: list[float], target: bool
) -> tuple[list, Ratio]:
    ratio = paired_ratio(times, bare)
    paired = [a / b for a, b in zip(times, bare, strict=True)]
    row = [
        norm,
        label,
        fmt(median(times) * 1e3),
        f"**{ratio.text()}**" if target else ratio.text(),
        fmt(ratio.half_width, 3),
        ratio.rounds,
        f"{min(paired):.3f}-{max(paired):.3f}",
        interval_verdict(ratio, TARGET, at_most=True) if target else "(logged steps only)",
    ]
    return row, ratio


def overhead_rows(ctx: Context, norm: str) -> tuple[str, list[list[object]]]:
    p = ctx.profile
    prep = prepare(ctx, [f"norm={norm}"])
    bare = bare_step(prep)
    ctx.log(
        f"overhead: norm={norm}, paired blocks until the 95 % interval's half-width <= {HALF_WIDTH} "
        f"(at most {p.overhead_cap_s:.0f} s)"
    )
    times = timeit(
        {"bare": bare, "ours": prep.step()},
        p.warmup,
        p.steps,
        p.overhead_min_rounds,
        prep.sync,
        until=precise_enough,
        cap_s=p.overhead_cap_s,
    )
    rows = [[norm, "bare PyTorch", fmt(median(times["bare"]) * 1e3), "1", "", "", "", ""]]
    row, ratio = ratio_row(norm, "Run.train_step", times["ours"], times["bare"], target=True)
    rows.append(row)
    precise = "met" if ratio.half_width <= HALF_WIDTH else "MISSED (time cap)"
    ctx.summary.append(
        (
            f"overhead ratio ({norm}), 95 % interval over {ratio.rounds} paired blocks",
            ratio.text(),
            f"upper end <= {TARGET}; half-width <= {HALF_WIDTH} ({precise})",
            interval_verdict(ratio, TARGET, at_most=True),
        )
    )
    monitor = BNStatMonitor(prep.run.model)
    monitor.enabled = False
    if any(tracks_running_stats(m) for m in prep.run.model.modules()):
        # The hooks run on 1 step in trainer.log_every_steps: a fixed number of rounds, no target.
        hooked = timeit(
            {"bare": bare, "hooks": monitored_step(prep, monitor)}, p.warmup, p.steps, p.repeats, prep.sync
        )
        label = "Run.train_step + BNStatMonitor hooks"
        rows.append(ratio_row(norm, label, hooked["hooks"], hooked["bare"], target=False)[0])
    monitor.close()
    return describe_cfg(prep.run.cfg), rows


def measure(ctx: Context, device: torch.device) -> str:
    """Run.train_step vs the bare PyTorch step on the same model (same init), the same batch and device."""
    rows, setups = [], []
    for norm in ctx.profile.overhead_norms:
        setup, norm_rows = overhead_rows(ctx, norm)
        setups.append(setup.split(", norm")[0])
        rows += norm_rows
    head = [
        "norm",
        "step",
        "ms/step (median block)",
        "ratio to bare [95 % interval]",
        "half-width",
        "paired blocks",
        "per-pair ratios min-max",
        f"upper end <= {TARGET}",
    ]
    p = ctx.profile
    return "\n".join(
        [
            "## a. Overhead ratio: our training step vs a bare PyTorch loop",
            "",
            f"{'; '.join(sorted(set(setups)))}. Same initial weights, the same pre-drawn batch on the "
            "device, the same optimizer; bare = "
            "`opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()`. "
            f"Blocks of {p.steps} steps after {p.warmup} warm-up steps, bare and ours side by side in "
            "rounds whose order alternates (bare ours, ours bare, ...); rounds are added until the 95 % "
            f"interval of the ratio has a half-width <= {HALF_WIDTH} (at least {p.overhead_min_rounds}, "
            f"at most {p.overhead_cap_s:.0f} s). Ratio: geometric mean of the per-round ratios; interval: "
            "Student's t on their logarithms. For BatchNorm-family norms a last row adds the BN statistics "
            f"hooks (`BNStatMonitor`, {p.repeats} rounds), which `Run.loop` enables only on the steps it "
            "logs (1 in trainer.log_every_steps).",
            "",
            table(head, rows),
        ]
    )
