"""Cross entropy over a large vocabulary, in fp32, a few rows at a time.

    loss = sum over labelled rows n of (logsumexp(z_n) - z_n[label_n]) / divisor      (z in fp32)
    dloss/dz_n = (softmax(z_n) - onehot(label_n)) * grad / divisor, 0 on ignored rows

The same numbers as `F.cross_entropy(logits.float(), labels, ignore_index=..., reduction="sum") / divisor`
(to fp32 rounding), and the same gradient, returned in the logits' dtype as autograd's `.float()`
backward returns it. What differs is the memory traffic: the fp32 copy of the (N, V) logits, its
log-softmax and their fp32 gradients are never made whole; each chunk of rows is upcast, reduced and
(in backward) turned into its gradient while it sits in cache. Only the per-row logsumexp (N floats) is kept for backward, beside the logits autograd already
holds. Measured: bench/results/cpu_*.md ("output head + loss").
"""

import torch

CHUNK_ELEMENTS = {"cpu": 1 << 18}  # fp32 elements per chunk: 1 MiB on CPU (a core's L2 on recent x86)
DEFAULT_CHUNK_ELEMENTS = 1 << 24  # accelerators: few, large kernels


class ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_NV: torch.Tensor, labels_N: torch.Tensor, ignore_index: int, divisor):
        kept_N = labels_N != ignore_index
        targets_N = labels_N.masked_fill(~kept_N, 0)
        lse_N = torch.empty(labels_N.shape[0], dtype=torch.float32, device=logits_NV.device)
        for rows in _row_chunks(logits_NV):
            torch.logsumexp(logits_NV[rows].float(), dim=1, out=lse_N[rows])
        target_logits_N = logits_NV.gather(1, targets_N[:, None]).squeeze(1).float()
        loss = torch.where(kept_N, lse_N - target_logits_N, 0.0).sum() / divisor
        ctx.save_for_backward(logits_NV, kept_N, targets_N, lse_N)
        ctx.divisor = divisor
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits_NV, kept_N, targets_N, lse_N = ctx.saved_tensors
        grad_NV = torch.empty_like(logits_NV)
        scale = (grad_loss.float() / ctx.divisor).reshape(())
        for rows in _row_chunks(logits_NV):
            probs = logits_NV[rows].to(torch.float32, copy=True).sub_(lse_N[rows, None]).exp_()
            probs.scatter_add_(1, targets_N[rows, None], torch.full_like(probs[:, :1], -1.0))
            probs.masked_fill_(~kept_N[rows, None], 0.0)
            grad_NV[rows] = probs.mul_(scale)
        return grad_NV, None, None, None


def _row_chunks(x_NV: torch.Tensor):
    elements = CHUNK_ELEMENTS.get(x_NV.device.type, DEFAULT_CHUNK_ELEMENTS)
    step = max(1, elements // max(1, x_NV.shape[1]))
    return [slice(start, start + step) for start in range(0, x_NV.shape[0], step)]


def cross_entropy_sum(logits_NV: torch.Tensor, labels_N: torch.Tensor, ignore_index: int, divisor):
    """sum of the fp32 cross entropy over rows whose label is not ignore_index, divided by divisor
    (a number or a 0-d tensor)."""
    if isinstance(divisor, torch.Tensor):
        divisor = divisor.to(device=logits_NV.device, dtype=torch.float32)
    return ChunkedCrossEntropy.apply(logits_NV, labels_N.to(logits_NV.device), ignore_index, divisor)
