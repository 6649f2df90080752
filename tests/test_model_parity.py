"""Forward and backward parity with transformers' MixtralForCausalLM on identical weights.

Max relative difference <= 1e-5 (fp32, CPU) for logits, loss, aux_loss, router logits and the
gradient of every parameter, across GQA ratios, top-k, sliding windows, padding and backends.
"""

import pytest
import torch
from mixtral_reference import model_pair, reference_grad

from mixtral_model.testing import max_relative_diff

TOL = 1e-5
SEQ = 12


def batch_with_padding(vocab: int, pad: bool, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (3, SEQ), generator=g)
    attention_mask = torch.ones(3, SEQ, dtype=torch.long)
    if pad:
        attention_mask[1, -4:] = 0  # right padding
        attention_mask[2, :3] = 0  # left padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return input_ids, attention_mask, labels


def forward_backward(model, input_ids, attention_mask, labels):
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_router_logits=True)
    out.loss.backward()
    return out


def assert_close(name, actual, expected, mask=None):
    if mask is not None:
        actual, expected = actual[mask], expected[mask]
    diff = max_relative_diff(actual.detach().float(), expected.detach().float())
    assert diff <= TOL, f"{name}: max relative diff {diff:.3e} > {TOL}"
    return diff


CASES = [
    pytest.param(dict(num_attention_heads=4, num_key_value_heads=4), id="gqa1"),
    pytest.param(dict(num_attention_heads=4, num_key_value_heads=2), id="gqa2"),
    pytest.param(dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64), id="gqa4"),
    pytest.param(dict(num_experts_per_tok=1), id="top1"),
    pytest.param(dict(num_experts_per_tok=3), id="top3"),
    pytest.param(dict(sliding_window=5), id="window5"),
]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("pad", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("overrides", CASES)
def test_forward_backward_parity(tmp_path, overrides, pad, attn):
    ours, ref = model_pair(tmp_path, attn_implementation=attn, **overrides)
    input_ids, attention_mask, labels = batch_with_padding(ours.config.vocab_size, pad)
    out = forward_backward(ours, input_ids, attention_mask, labels)
    expected = forward_backward(ref, input_ids, attention_mask, labels)

    real_tokens = attention_mask.bool()
    assert_close("logits", out.logits, expected.logits, real_tokens)
    assert_close("loss", out.loss, expected.loss)
    assert_close("aux_loss", out.aux_loss, expected.aux_loss)
    for layer, (ours_logits, ref_logits) in enumerate(
        zip(out.router_logits, expected.router_logits, strict=True)
    ):
        assert_close(f"router_logits[{layer}]", ours_logits, ref_logits, real_tokens.reshape(-1))
    for name, param in ours.named_parameters():
        ref_grad = reference_grad(ref, name, ours.config.intermediate_size)
        assert param.grad is not None, name
        assert_close(f"grad {name}", param.grad, ref_grad)


def test_padding_positions_stay_finite(tmp_path):
    ours, _ = model_pair(tmp_path, attn_implementation="sdpa")
    input_ids, attention_mask, labels = batch_with_padding(ours.config.vocab_size, pad=True)
    out = forward_backward(ours, input_ids, attention_mask, labels)
    assert torch.isfinite(out.logits).all()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters())


def test_jitter_noise_matches_reference_in_training(tmp_path):
    ours, ref = model_pair(tmp_path, router_jitter_noise=0.1)
    ours.train(), ref.train()
    input_ids, attention_mask, labels = batch_with_padding(ours.config.vocab_size, pad=False)
    torch.manual_seed(123)
    out = forward_backward(ours, input_ids, attention_mask, labels)
    torch.manual_seed(123)
    expected = forward_backward(ref, input_ids, attention_mask, labels)
    assert_close("logits", out.logits, expected.logits)
    assert_close("loss", out.loss, expected.loss)
    ours.eval()
    with torch.no_grad():
        noisy_off_a = ours(input_ids).logits
        noisy_off_b = ours(input_ids).logits
    assert torch.equal(noisy_off_a, noisy_off_b), "jitter noise must be off in eval mode"


def test_jitter_noise_changes_training_forward(tmp_path):
    ours, _ = model_pair(tmp_path, router_jitter_noise=0.1)
    ours.train()
    input_ids, _, _ = batch_with_padding(ours.config.vocab_size, pad=False)
    assert not torch.equal(ours(input_ids).logits, ours(input_ids).logits)


def test_loss_is_ce_plus_scaled_aux(tmp_path):
    ours, _ = model_pair(tmp_path)
    input_ids, attention_mask, labels = batch_with_padding(ours.config.vocab_size, pad=True)
    with torch.no_grad():
        with_router = ours(input_ids, attention_mask=attention_mask, labels=labels, output_router_logits=True)
        ce_only = ours(input_ids, attention_mask=attention_mask, labels=labels, output_router_logits=False)
    assert ce_only.aux_loss is None
    expected = ce_only.loss + ours.config.router_aux_loss_coef * with_router.aux_loss
    torch.testing.assert_close(with_router.loss, expected)


def test_z_loss_added_when_enabled(tmp_path):
    ours, _ = model_pair(tmp_path, router_z_loss_coef=0.01)
    input_ids, attention_mask, labels = batch_with_padding(ours.config.vocab_size, pad=True)
    with torch.no_grad():
        out = ours(input_ids, attention_mask=attention_mask, labels=labels, output_router_logits=True)
        ce_only = ours(input_ids, attention_mask=attention_mask, labels=labels, output_router_logits=False)
    real = attention_mask.reshape(-1).bool()
    z_by_hand = torch.stack([torch.logsumexp(r[real], -1).pow(2).mean() for r in out.router_logits]).mean()
    torch.testing.assert_close(out.z_loss, z_by_hand)
    expected = ce_only.loss + 0.02 * out.aux_loss + 0.01 * out.z_loss
    torch.testing.assert_close(out.loss, expected)


def test_packed_sequences_are_isolated(tmp_path):
    """Position ids that restart inside a row isolate the packed sequences, as separate rows would."""
    ours, _ = model_pair(tmp_path, attn_implementation="sdpa")
    g = torch.Generator().manual_seed(3)
    first, second = torch.randint(0, 97, (1, 5), generator=g), torch.randint(0, 97, (1, 7), generator=g)
    packed = torch.cat([first, second], dim=1)
    position_ids = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        packed_logits = ours(packed, position_ids=position_ids).logits
        separate = torch.cat([ours(first).logits, ours(second).logits], dim=1)
    torch.testing.assert_close(packed_logits, separate, rtol=1e-5, atol=1e-5)
