"""Router statistics and the lean console's MoE line, held to an independent computation: the
definitions in mixtral_model/router_stats.py's docstring, written out token by token in plain Python
(math.exp/log, sorted) from the router logits, with no tensor code shared with the implementation."""

import math

import pytest
import torch

from mixtral_model.router_stats import router_statistics
from mixtral_tune.training.reporting import ConsoleLogCallback


def reference_statistics(logits, top_k, mask=None, capacity_factor=None) -> dict[str, float]:
    """router_stats' documented keys, one token at a time: softmax, top-k by sorting, entropy
    -sum p ln p, fractions of the real tokens' (token, k) assignments, means over real tokens and layers."""
    num_tokens, num_experts = logits[0].shape
    real = [True] * num_tokens if mask is None else [bool(m) for m in mask.reshape(-1).tolist()]
    num_real = sum(real)
    stats, entropies, dropped_per_layer, z_losses = {}, [], [], []
    tokens_sum, probs_sum = [0.0] * num_experts, [0.0] * num_experts
    busiest = 0.0
    for layer, layer_logits in enumerate(logits):
        rows = layer_logits.tolist()
        counts, prob_means, entropy, z_loss = [0] * num_experts, [0.0] * num_experts, 0.0, 0.0
        chosen_per_token = []
        for row, is_real in zip(rows, real, strict=True):
            top = max(row)
            exps = [math.exp(x - top) for x in row]
            probs = [e / sum(exps) for e in exps]
            chosen = sorted(range(num_experts), key=lambda e, p=probs: -p[e])[:top_k]
            chosen_per_token.append(chosen)
            if not is_real:
                continue
            for e in chosen:
                counts[e] += 1
            for e in range(num_experts):
                prob_means[e] += probs[e] / num_real
            entropy -= sum(p * math.log(p) for p in probs if p > 0) / num_real
            z_loss += (top + math.log(sum(exps))) ** 2 / num_real
        fractions = [c / (num_real * top_k) for c in counts]
        for e in range(num_experts):
            stats[f"router/layer_{layer}/expert_{e}_fraction"] = fractions[e]
            tokens_sum[e] += counts[e] / num_real / len(logits)
            probs_sum[e] += prob_means[e] / len(logits)
        stats[f"router/layer_{layer}/entropy"] = entropy
        stats[f"router/layer_{layer}/aux_loss"] = num_experts * sum(
            counts[e] / num_real * prob_means[e] for e in range(num_experts)
        )
        stats[f"router/layer_{layer}/z_loss"] = z_loss
        entropies.append(entropy)
        z_losses.append(z_loss)
        busiest = max(busiest, max(fractions) * num_experts)
        if capacity_factor is not None:
            # every token competes for capacity, padding too, in (token, k) order within an expert
            capacity = math.ceil(capacity_factor * num_tokens * top_k / num_experts)
            taken, dropped = [0] * num_experts, 0
            for token, chosen in enumerate(chosen_per_token):
                for e in chosen:
                    taken[e] += 1
                    dropped += taken[e] > capacity and real[token]
            stats[f"router/layer_{layer}/dropped_fraction"] = dropped / (num_real * top_k)
            dropped_per_layer.append(dropped / (num_real * top_k))
    stats["router/entropy"] = sum(entropies) / len(entropies)
    stats["router/aux_loss"] = num_experts * sum(t * p for t, p in zip(tokens_sum, probs_sum, strict=True))
    stats["router/z_loss"] = sum(z_losses) / len(z_losses)
    stats["router/max_expert_load"] = busiest
    if capacity_factor is not None:
        stats["router/dropped_fraction"] = sum(dropped_per_layer) / len(dropped_per_layer)
    return stats


def layered_logits(num_tokens=64, num_experts=4, num_layers=3):
    """Layers that differ (a confident layer, a skewed one, a flat one) and tokens that differ within a
    layer, so a mean and a max over tokens or over layers give different numbers."""
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(num_tokens, num_experts, generator=generator) * scale for scale in (4.0, 1.0, 0.3)]
    logits[1][:, 0] += 3.0  # layer 1 prefers expert 0: the busiest load comes from there
    return tuple(logits[:num_layers])


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_router_statistics_match_an_independent_computation(capacity_factor):
    logits = layered_logits()
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[0, :5] = 0
    mask[3, 10:] = 0
    stats = router_statistics(logits, top_k=2, attention_mask_BT=mask, capacity_factor=capacity_factor)
    expected = reference_statistics(logits, 2, mask, capacity_factor)
    assert sorted(stats) == sorted(expected)
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    if capacity_factor is not None:
        assert expected["router/dropped_fraction"] > 0
    # the test data tell aggregations apart: entropy differs by layer and by token
    entropies = [expected[f"router/layer_{layer}/entropy"] for layer in range(3)]
    assert max(entropies) - min(entropies) > 0.3


def test_moe_line_shows_the_independently_computed_entropy_and_load():
    logits = layered_logits()
    expected = reference_statistics(logits, 2)
    line = ConsoleLogCallback.moe_line(router_statistics(logits, top_k=2))
    assert line == (
        f"  moe: router entropy {expected['router/entropy']:.3g}/1.39 | "  # ln 4 = 1.386
        f"busiest expert {expected['router/max_expert_load']:.3g}x balanced"
    )


def test_moe_line_hand_case():
    """Uniform logits in both layers: entropy ln 4; topk breaks every token's tie the same way, so two
    experts take every assignment: the busiest at half of them, 2x its balanced quarter."""
    logits = (torch.zeros(8, 4), torch.zeros(8, 4))
    assert ConsoleLogCallback.moe_line(router_statistics(logits, top_k=2)) == (
        "  moe: router entropy 1.39/1.39 | busiest expert 2x balanced"
    )


def test_moe_line_shows_drops_only_when_there_are_some():
    logits = layered_logits()
    dropping = router_statistics(logits, top_k=2, capacity_factor=1.0)
    expected = reference_statistics(logits, 2, capacity_factor=1.0)["router/dropped_fraction"]
    assert expected > 0
    assert ConsoleLogCallback.moe_line(dropping).endswith(f" | dropped {expected:.1%}")
    assert " dropped" not in ConsoleLogCallback.moe_line(
        router_statistics(logits, top_k=2, capacity_factor=8.0)
    )
    assert ConsoleLogCallback.moe_line({"loss": 1.0}) is None  # no router statistics, no MoE line
