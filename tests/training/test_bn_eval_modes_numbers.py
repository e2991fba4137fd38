"""BatchNorm's evaluation modes measured on real training runs, not just present as keys.

- Trained at batch size 1 on cases whose intensity gain differs 100-fold, BatchNorm's running statistics fit
  no case: evaluating with batch statistics beats the running statistics by a wide margin. On a control
  dataset without per-case intensity differences the running statistics are fine.
- PreciseBN's statistics are exactly the population statistics of the training patches it was given.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from norm_experiments.norms import recompute_bn_statistics
from norm_experiments.norms.bn_common import reduce_dims, tracks_running_stats
from norm_experiments.training.loop import Run, train
from tests.helpers import compose_config

# 150 steps at batch size 1 on 6 training and 2 validation cases of 24^3 (about 20 s on one thread).
BN_AT_BATCH_1 = [
    "experiment=smoke",
    "norm=batch",
    "data.batch_size=1",
    "trainer.samples=150",
    "trainer.num_threads=1",
    "data.synthetic.num_cases=8",
    "data.val_fraction=0.25",
]
NO_SCANNER_DIFFERENCES = [
    "data.synthetic.intensity_scale_range=[1,1]",
    "data.synthetic.intensity_offset_range=[0,0]",
    "data.synthetic.contrast_range=[1,1]",
    "data.synthetic.gamma_range=[1,1]",
]


def test_batch_statistics_beat_running_statistics_when_cases_differ(tmp_path: Path) -> None:
    cfg = compose_config([*BN_AT_BATCH_1, "data.synthetic.intensity_scale_range=[0.1,10]"])
    modes = train(cfg, tmp_path / "gains")["eval_modes"]
    assert modes["batch"] - modes["running"] > 0.2, modes


def test_running_statistics_are_fine_when_cases_do_not_differ(tmp_path: Path) -> None:
    modes = train(compose_config([*BN_AT_BATCH_1, *NO_SCANNER_DIFFERENCES]), tmp_path / "control")[
        "eval_modes"
    ]
    assert modes["running"] > 0.5 and modes["running"] > modes["batch"] - 0.05, modes


def test_precise_bn_statistics_are_the_population_statistics_of_its_patches(tmp_path: Path) -> None:
    run = Run(compose_config(["experiment=smoke", "norm=batch", "trainer.precise_bn_samples=6"]), tmp_path)
    run.build()
    for step in range(3):  # some training, so that layers differ from their initialisation
        run.train_step(*run.sampler.batch(step))
    batches = list(run.precise_bn_batches())
    assert sum(b.shape[0] for b in batches) == 6  # 3 batches of 2 patches

    # Every BN layer's input over those patches, normalizing with batch statistics as PreciseBN does.
    reference = copy.deepcopy(run.model)
    layers = {name: m for name, m in reference.named_modules() if tracks_running_stats(m)}
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    hooks = [
        m.register_forward_pre_hook(lambda _m, a, n=n: inputs[n].append(a[0])) for n, m in layers.items()
    ]
    with torch.no_grad():
        reference.train()
        for layer in layers.values():
            layer.track_running_stats = False  # batch statistics, running ones untouched
        for batch in batches:
            reference(batch)
    for hook in hooks:
        hook.remove()

    precise = copy.deepcopy(run.model)
    assert recompute_bn_statistics(precise, batches, run.device) == 3
    recomputed = dict(precise.named_modules())
    for name, seen in inputs.items():
        values = torch.cat(seen).double()
        var, mean = torch.var_mean(values, dim=reduce_dims(values), correction=1)
        torch.testing.assert_close(recomputed[name].running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(recomputed[name].running_var.double(), var, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("samples", [1, 5])
def test_precise_bn_uses_at_least_the_configured_number_of_patches(tmp_path: Path, samples: int) -> None:
    run = Run(compose_config(["experiment=smoke", f"trainer.precise_bn_samples={samples}"]), tmp_path)
    run.build()
    patches = sum(b.shape[0] for b in run.precise_bn_batches())
    assert samples <= patches < samples + run.effective_batch
