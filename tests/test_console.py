"""The lean console's MoE line from real router statistics: entropy against ln E, the busiest
expert's load, and dropped tokens only when a capacity factor drops some."""

import math

import torch

from mixtral_model.router_stats import router_statistics
from mixtral_tune.training.reporting import ConsoleLogCallback


def test_moe_line_summarises_router_statistics_and_shows_drops_only_when_there_are_some():
    logits = tuple(torch.randn(64, 4, generator=torch.Generator().manual_seed(layer)) for layer in range(3))
    logits[2][:, 0] += 4.0  # layer 2 prefers expert 0: the busiest load comes from there
    stats = router_statistics(logits, top_k=2)
    line = ConsoleLogCallback.moe_line(stats)
    assert line == (
        f"  moe: router entropy {stats['router/entropy']:.3g}/{math.log(4):.3g} | "
        f"busiest expert {stats['router/max_expert_load']:.3g}x balanced"
    )
    assert (
        stats["router/max_expert_load"]
        == max(stats[f"router/layer_2/expert_{e}_fraction"] for e in range(4)) * 4
    )
    dropping = router_statistics(logits, top_k=2, capacity_factor=1.0)
    assert dropping["router/dropped_fraction"] > 0
    assert ConsoleLogCallback.moe_line(dropping).endswith(
        f" | dropped {dropping['router/dropped_fraction']:.1%}"
    )
    assert ConsoleLogCallback.moe_line({"loss": 1.0}) is None  # no router statistics, no MoE line
