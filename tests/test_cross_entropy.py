"""The chunked fp32 cross entropy of the LM loss against torch's `F.cross_entropy` on fp32-upcast
logits (what transformers' `ForCausalLMLoss` computes): loss and logits gradient, fp32 and bf16,
ignored labels, `num_items_in_batch`, and logits left untouched."""

import pytest
import torch
import torch.nn.functional as F

from mixtral_model import cross_entropy
from mixtral_model.model import causal_lm_loss
from mixtral_model.testing import max_relative_diff


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_items", [None, 29])
def test_causal_lm_loss_equals_torch_cross_entropy(dtype, num_items, monkeypatch):
    monkeypatch.setitem(cross_entropy.CHUNK_ELEMENTS, "cpu", 3 * 50)  # 3 rows a chunk: several chunks
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 11, 50, generator=g) * 4).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (2, 11), generator=g)
    labels[0, :4] = -100
    labels[1, 7] = -100
    upstream = 2.5
    before = logits.detach().clone()

    loss = causal_lm_loss(logits, labels, num_items)
    (grad,) = torch.autograd.grad(loss * upstream, logits)

    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    reference = F.cross_entropy(logits.float().reshape(-1, 50), shifted, reduction="sum")
    reference = reference / (num_items if num_items is not None else (shifted != -100).sum())
    (reference_grad,) = torch.autograd.grad(reference * upstream, logits)

    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert max_relative_diff(loss.detach(), reference.detach()) <= 1e-6
    assert max_relative_diff(grad.float(), reference_grad.float()) <= (
        1e-6 if dtype == torch.float32 else 4e-3
    )
    assert grad[0, :3].abs().max() == 0 and grad[1, 6].abs().max() == 0 and grad[:, -1].abs().max() == 0
    assert torch.equal(logits.detach(), before)


def test_no_labelled_token_gives_nan_as_torch():
    logits = torch.randn(1, 3, 5, requires_grad=True)
    labels = torch.full((1, 3), -100)
    reference = F.cross_entropy(logits.reshape(-1, 5), labels.reshape(-1))
    assert torch.isnan(causal_lm_loss(logits, labels)) and torch.isnan(reference)


def test_large_logits_keep_fp32_accuracy(monkeypatch):
    """Logits far from 0 (a 200 offset, a few rows peaked on their label): the gradient's largest entries
    come from exp(z - logsumexp(z)), which loses |logsumexp| * 2^-24 if that difference is taken in fp32
    (5e-6 of the largest here); taken as (z - max) - log_sum, as torch's log_softmax does, it stays at fp32 rounding."""
    monkeypatch.setitem(cross_entropy.CHUNK_ELEMENTS, "cpu", 3 * 1000)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(24, 1000, generator=g) * 4 + 200
    labels = torch.randint(0, 1000, (24,), generator=g)
    logits[::3][torch.arange(8), labels[::3]] += 15
    logits.requires_grad_()

    loss = cross_entropy.cross_entropy_sum(logits, labels, -100, 24)
    (grad,) = torch.autograd.grad(loss, logits)
    reference = F.cross_entropy(logits, labels, reduction="sum") / 24
    (reference_grad,) = torch.autograd.grad(reference, logits)

    assert max_relative_diff(loss.detach(), reference.detach()) <= 1e-6
    assert max_relative_diff(grad, reference_grad) <= 1e-6
