"""The pure helpers behind a run's plan: budget, validation points, learning-rate schedule and scaling,
config differences, run identity and folder names."""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from norm_experiments.config import CONFIG_DIR
from norm_experiments.run_names import EXECUTION_KEYS, run_dirname, run_identity
from norm_experiments.training.build import budget_steps, lr_factor, make_plan, scaled_lr, validation_steps
from norm_experiments.training.run_folder import config_diff
from tests.helpers import compose_config


@pytest.mark.parametrize(
    ("unit", "samples", "steps", "global_batch", "expected"),
    [
        ("patches", 800, 999, 1, 800),
        ("patches", 800, 999, 8, 100),
        ("patches", 801, 999, 8, 101),  # a last, partial step still counts
        ("steps", 800, 100, 1, 100),
        ("steps", 800, 100, 8, 100),  # the same steps at every batch size
    ],
)
def test_budget_in_patches_or_steps(unit, samples, steps, global_batch, expected) -> None:
    trainer = OmegaConf.create({"budget_unit": unit, "samples": samples, "steps": steps})
    assert budget_steps(trainer, global_batch) == expected


def test_validations_are_evenly_spaced_and_end_at_the_last_step() -> None:
    assert validation_steps(800, 4) == {200, 400, 600, 800}
    assert validation_steps(100, 3) == {33, 67, 100}
    assert validation_steps(3, 8) == {1, 2, 3}  # more validations than steps: once per step
    assert validation_steps(16, 1) == {16}


def test_lr_warms_up_linearly_then_decays() -> None:
    assert [lr_factor(s, 100, 4, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 100, 4, "cosine") == 1.0
    assert lr_factor(52, 100, 4, "cosine") == pytest.approx(0.5)  # half way through the decay
    assert lr_factor(100, 100, 4, "cosine") == pytest.approx(0.0)
    assert lr_factor(52, 100, 4, "poly") == pytest.approx(0.5**0.9)
    assert lr_factor(80, 100, 0, "constant") == 1.0


@pytest.mark.parametrize(("rule", "factor"), [("none", 1.0), ("linear", 4.0), ("sqrt", 2.0)])
def test_lr_scaling_rules(rule: str, factor: float) -> None:
    optim = OmegaConf.create({"lr": 1e-3, "lr_scaling": rule, "reference_batch": 2})
    assert scaled_lr(optim, 8) == pytest.approx(1e-3 * factor)


def test_config_diff_lists_changed_added_and_removed_keys() -> None:
    old = {"norm": {"name": "batch", "options": {"eps": 1e-5}}, "seed": 0}
    new = {"norm": {"name": "group", "options": {"num_groups": 8}}, "seed": 0}
    assert config_diff(old, new) == [
        "norm.name: batch -> group",
        "norm.options.eps: 1e-05 -> <absent>",
        "norm.options.num_groups: <absent> -> 8",
    ]
    assert config_diff(old, old) == []


def test_config_diff_spells_values_as_typed_and_leaves_out_execution_keys() -> None:
    """The refusal of a run folder listed 'trainer.force_resume: False -> True' first: the flag the user had
    just added to continue, which changes no run."""
    old = {
        "trainer": {"force_resume": False, "amp": True, "num_threads": None},
        "data": {"patch_size": [16, 16]},
    }
    new = {
        "trainer": {"force_resume": True, "amp": False, "num_threads": 2},
        "data": {"patch_size": [32, 32]},
    }
    assert config_diff(old, new) == ["data.patch_size: [16, 16] -> [32, 32]", "trainer.amp: true -> false"]


def test_execution_keys_change_neither_identity_nor_folder_name() -> None:
    base = compose_config(["experiment=smoke"])
    for key in EXECUTION_KEYS:
        changed = compose_config(["experiment=smoke", f"{key}={_other_value(OmegaConf.select(base, key))}"])
        assert run_identity(changed) == run_identity(base), key
    assert run_identity(compose_config(["experiment=smoke", "seed=1"])) != run_identity(base)
    hydra = OmegaConf.load(CONFIG_DIR / "hydra" / "default.yaml")
    assert OmegaConf.to_container(hydra.job.config.override_dirname)["exclude_keys"] == "${execution_keys:}"


def _other_value(value: object) -> object:
    if isinstance(value, bool):
        return str(not value).lower()
    if isinstance(value, int):
        return value + 1
    return "elsewhere" if value != "elsewhere" else "here"


def test_run_dirname_is_readable_safe_and_unique() -> None:
    assert run_dirname("data.batch_size=2,norm=group") == "data.batch_size=2,norm=group"
    assert run_dirname("") == "default"
    assert run_dirname("data.root=/a b/ü") == "data.root=_a_b__"
    long_a, long_b = "x=" + "a" * 200, "x=" + "a" * 199 + "b"
    assert len(run_dirname(long_a)) == 120 and run_dirname(long_a) != run_dirname(long_b)


def test_plan_sizes_for_batch_dependent_and_independent_norms() -> None:
    for norm, bn_batch in (("batch", 2), ("group", None), ("ghostbatch", 1)):
        overrides = ["experiment=smoke", f"norm={norm}", "data.batch_size=2"]
        if norm == "ghostbatch":
            overrides.append("norm.options.virtual_batch=1")
        plan = make_plan(compose_config(overrides))
        assert (plan.effective_batch, plan.global_batch, plan.bn_batch) == (2, 2, bn_batch)
        assert plan.total_steps == math.ceil(16 / 2) and plan.val_steps == {4, 8}


def test_plan_sizes_with_gradient_accumulation() -> None:
    """accumulate_steps=4 at batch 1: 4 patches per optimizer step (the budget's and the LR scaling's batch),
    BatchNorm's statistics over 1 patch, the same 16 patches in a quarter of the steps."""
    overrides = ["experiment=smoke", "norm=batch", "data.batch_size=1", "optim.lr_scaling=linear"]
    plan = make_plan(compose_config([*overrides, "trainer.accumulate_steps=4"]))
    assert (plan.effective_batch, plan.accumulate_steps, plan.global_batch, plan.bn_batch) == (1, 4, 4, 1)
    assert plan.total_steps == 4 and plan.val_steps == {2, 4} and plan.ckpt_every == 2  # 8 patches
    assert make_plan(compose_config(overrides)).total_steps == 16
    optim = compose_config(overrides).optim
    assert scaled_lr(optim, plan.global_batch) == pytest.approx(float(optim.lr) * 4 / 2)  # reference_batch 2
