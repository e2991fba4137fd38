"""own_statistics: InstanceNorm layers with running statistics normalize each input by itself, exactly as the same
layer without running statistics does, and their running buffers come back unchanged."""

from __future__ import annotations

import torch
from torch import nn

from norm_experiments.diagnose.scoring import instance_running_layers, own_statistics


def test_own_statistics_leave_running_buffers_untouched_and_match_an_untracked_layer() -> None:
    torch.manual_seed(0)
    tracked = nn.Sequential(nn.Conv3d(1, 4, 3), nn.InstanceNorm3d(4, affine=True, track_running_stats=True))
    tracked.train()
    for _ in range(3):  # running statistics away from their initial 0 / 1
        tracked(torch.randn(2, 1, 8, 8, 8) * 3 + 1)
    tracked.eval()
    norm = tracked[1]
    mean, var, count = norm.running_mean.clone(), norm.running_var.clone(), norm.num_batches_tracked.clone()
    untracked = nn.Sequential(nn.Conv3d(1, 4, 3), nn.InstanceNorm3d(4, affine=True)).eval()
    untracked.load_state_dict(tracked.state_dict(), strict=False)  # the same weights, no running buffers
    x = torch.randn(1, 1, 8, 8, 8) * 5 - 2

    assert instance_running_layers(tracked) == ["1"]
    assert instance_running_layers(untracked) == []
    with own_statistics(tracked, ["1"]):
        own = tracked(x)
    torch.testing.assert_close(own, untracked(x), rtol=0, atol=0)
    assert not torch.allclose(tracked(x), own)  # model.eval() itself uses the running statistics
    assert norm.running_mean is not None and norm.track_running_stats
    assert torch.equal(norm.running_mean, mean) and torch.equal(norm.running_var, var)
    assert torch.equal(norm.num_batches_tracked, count)
