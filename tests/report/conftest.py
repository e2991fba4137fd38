"""Fixtures that write hand-made metrics.json files the way the training code does."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from norm_experiments.norms import registry
from norm_experiments.run_record import RunRecord, Status

BN_FAMILY = registry.bn_family()
BATCH_DEPENDENT = frozenset(n for n, r in registry.records().items() if r.batch_dependent)


def per_case(scores: dict[str, dict[str, float]], hd95: float = 4.0) -> dict:
    """The metrics.json `per_case` block: {mode: {case: score}} -> one class "fg" per case with that Dice
    (a second class "absent" is null everywhere: a class missing from the case, which must not count)."""
    return {
        mode: {
            case: {"dice": {"fg": value, "absent": None}, "hd95": {"fg": hd95, "absent": None}}
            for case, value in cases.items()
        }
        for mode, cases in scores.items()
    }


def make_metrics(norm: str, batch_size: int, seed: int, val_dice: float | None = 0.7, **overrides) -> dict:
    """A complete metrics.json dict, built as training builds it (RunRecord); overrides replace any field
    (they may break it on purpose)."""
    run_id = hashlib.sha1(f"{norm}-{batch_size}-{seed}".encode()).hexdigest()[:12]
    data = RunRecord(
        status=Status.COMPLETED,
        run_id=run_id,
        run_name=f"norm={norm},bs={batch_size},seed={seed}",
        norm=norm,
        bn_family=norm in BN_FAMILY,
        batch_dependent=norm in BATCH_DEPENDENT,
        model="unet",
        seed=seed,
        batch_size=batch_size,
        patches_per_volume=1,
        accumulate_steps=1,
        effective_batch=batch_size,
        samples_seen=1200,
        steps=1200 // batch_size,
        val_dice=val_dice,
        best_val_dice=None if val_dice is None else val_dice + 0.01,
        val_dice_per_class={"class1": 0.8, "class2": 0.6},
        eval_modes={},
        wall_time_s=95.2,
        samples_per_s=10.0 * batch_size,
        data_wait_fraction=0.02,
        peak_memory_mb=100.0 * batch_size,
        device="cpu",
        versions={"torch": "2.13.0", "monai": "1.6.1"},
    ).to_json(keep_none=False)
    data["error"], data["peak_cuda_memory_mb"] = None, None
    if norm in BN_FAMILY and val_dice is not None:
        data["eval_modes"] = {"running": val_dice, "precise": val_dice + 0.05, "batch": val_dice + 0.1}
        data["batch_stats_windows"] = 4
    data.update(overrides)
    return data


@pytest.fixture
def write_run():
    """write_run(sweep_dir, norm, bs, seed, val_dice=..., subdir=None, mtime=None, **overrides) -> path."""

    def _write(
        sweep_dir: Path,
        norm: str,
        batch_size: int,
        seed: int,
        val_dice: float | None = 0.7,
        subdir: str | None = None,
        mtime: float | None = None,
        **overrides,
    ) -> Path:
        # Runs nest at different depths, like Hydra multirun folders (sweep/<job number>/...).
        folder = sweep_dir / (subdir or f"{norm}/bs{batch_size}/seed{seed}")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "metrics.json"
        path.write_text(json.dumps(make_metrics(norm, batch_size, seed, val_dice, **overrides)))
        if mtime is not None:
            os.utime(path, (mtime, mtime))
        return path

    return _write


@pytest.fixture
def small_sweep(tmp_path, write_run):
    """2 norms x 2 batch sizes x 3 seeds. Means: batch bs1 0.5, bs2 0.7; group bs1 0.8, bs2 0.81."""
    sweep = tmp_path / "sweep"
    values = {
        ("batch", 1): [0.4, 0.5, 0.6],
        ("batch", 2): [0.6, 0.7, 0.8],
        ("group", 1): [0.79, 0.80, 0.81],
        ("group", 2): [0.80, 0.81, 0.82],
    }
    for (norm, bs), dice in values.items():
        for seed, value in enumerate(dice):
            write_run(sweep, norm, bs, seed, value)
    return sweep


# A reference design for per-case tests: 3 seeds x 4 validation cases; seed and case effects, no interaction.
SEED_EFFECT = (0.0, 0.02, -0.02)
CASE_EFFECT = (0.0, 0.05, -0.05, 0.1)
CASES = ("case_a", "case_b", "case_c", "case_d")


def grid(base: float, shift=lambda s, c: 0.0, seeds: int = 3) -> list[list[float]]:
    """Scores [seed][case] = base + seed effect + case effect + shift(seed, case)."""
    return [
        [base + SEED_EFFECT[s] + CASE_EFFECT[c] + shift(s, c) for c in range(len(CASES))]
        for s in range(seeds)
    ]


@pytest.fixture
def write_cases(write_run):
    """write_cases(sweep, norm, bs, running, batch=None, precise=None, **fields): one run per seed (row of the
    grid), with per-case scores for each given evaluation mode and val_dice = the mean of its running row."""

    def _write(sweep: Path, norm: str, batch_size: int, running, batch=None, precise=None, **fields) -> None:
        for seed, row in enumerate(running):
            modes = {"running": dict(zip(CASES, row))}
            for mode, rows in (("batch", batch), ("precise", precise)):
                if rows is not None:
                    modes[mode] = dict(zip(CASES, rows[seed]))
            means = {mode: sum(v.values()) / len(v) for mode, v in modes.items()}
            extra = {"eval_modes": means} if norm in BN_FAMILY else {}
            tag = ",".join(f"{k}={v}" for k, v in sorted(fields.items()) if isinstance(v, str | int))
            name = f"{tag or 'runs'}/{norm}/{batch_size}/{seed}"
            write_run(
                sweep,
                norm,
                batch_size,
                seed,
                means["running"],
                subdir=name,
                run_id=name,
                per_case=per_case(modes),
                **(extra | fields),
            )

    return _write
