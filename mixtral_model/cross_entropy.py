"""Cross entropy over a large vocabulary, in fp32, a few rows at a time.

    loss = sum over labelled rows n of (logsumexp(z_n) - z_n[label_n]) / divisor      (z in fp32)
    dloss/dz_n = (softmax(z_n) - onehot(label_n)) * grad / divisor, 0 on ignored rows

The same numbers as `F.cross_entropy(logits.float(), labels, ignore_index=..., reduction="sum") / divisor`
(to fp32 rounding), and the same gradient, returned in the logits' dtype as autograd's `.float()`
backward returns it. What differs is the memory traffic: the fp32 copy of the (N, V) logits, its
log-softmax and their fp32 gradients are never made whole; each chunk of rows is upcast into one reused
fp32 buffer, reduced and (in backward) turned into its gradient while it sits in cache. Only each row's
max and log-sum (logsumexp = max + log-sum; 2N floats) are kept for backward, beside the logits autograd
already holds. On CPU, chunks whose rows are all ignored (masked prompts) are not computed: their
gradient is 0.

exp(x) is computed as exp2(x * log2(e)): torch's CPU exp2 is much faster than its exp (measured:
bench/cross_entropy.py). x = z - max is taken in fp32 first (exact near the max, as in torch's log_softmax), so the
product's rounding costs ~1e-7 * |z - max| relative to each probability, not ~1e-7 * |z|; backward
subtracts log-sum * log2(e) in the same fused multiply-add, keeping the largest probabilities at fp32
rounding when the logits themselves are large.
Measured (time, chunk size, accuracy against float64): bench/cross_entropy.py.
"""

import math

import torch

CHUNK_ELEMENTS = {
    "cpu": 1 << 19
}  # fp32 elements per chunk on CPU (2 MiB), chosen by bench/cross_entropy.py --chunk-kib
DEFAULT_CHUNK_ELEMENTS = 1 << 24  # accelerators: few, large kernels
LOG2_E = math.log2(math.e)


class ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_NV: torch.Tensor, labels_N: torch.Tensor, ignore_index: int, divisor):
        kept_N = labels_N != ignore_index
        targets_N = labels_N.masked_fill(~kept_N, 0)
        max_N = torch.zeros(labels_N.shape[0], dtype=torch.float32, device=logits_NV.device)
        sum_N = torch.ones_like(max_N)  # log_sum 0 on rows skipped below (all ignored)
        chunks, _, buffer_RV = _row_chunks(logits_NV, kept_N)
        for rows in chunks:
            z_RV = _fp32(logits_NV[rows], buffer_RV)
            torch.amax(z_RV, dim=1, out=max_N[rows])
            shifted_RV = torch.sub(z_RV, max_N[rows, None], out=buffer_RV[: z_RV.shape[0]])
            torch.sum(shifted_RV.mul_(LOG2_E).exp2_(), dim=1, out=sum_N[rows])
        log_sum_N = sum_N.log_()
        target_logits_N = logits_NV.gather(1, targets_N[:, None]).squeeze(1).float()
        loss = torch.where(kept_N, (max_N - target_logits_N) + log_sum_N, 0.0).sum() / divisor
        ctx.save_for_backward(logits_NV, kept_N, targets_N, max_N, log_sum_N)
        ctx.divisor = divisor
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits_NV, kept_N, targets_N, max_N, log_sum_N = ctx.saved_tensors
        grad_NV = torch.empty_like(logits_NV)
        scale_N1 = torch.where(kept_N, grad_loss.float() / ctx.divisor, 0.0)[:, None]  # 0 on ignored rows
        minus_log2_sum_N1 = (log_sum_N * -LOG2_E)[:, None]
        chunks, skipped, buffer_RV = _row_chunks(logits_NV, kept_N)
        for rows in skipped:
            grad_NV[rows] = 0.0
        minus_one_R1 = torch.full_like(buffer_RV[:, :1], -1.0)
        for rows in chunks:
            grad_RV = grad_NV[rows]
            # fp32 logits: softmax - onehot is built in the gradient itself; else in the buffer, then cast
            probs_RV = grad_RV if grad_RV.dtype == torch.float32 else buffer_RV[: grad_RV.shape[0]]
            torch.sub(_fp32(logits_NV[rows], buffer_RV), max_N[rows, None], out=probs_RV)
            # exp(z - max - log_sum) = exp2((z - max) * log2(e) - log_sum * log2(e)), one fused multiply-add
            torch.add(minus_log2_sum_N1[rows], probs_RV, alpha=LOG2_E, out=probs_RV).exp2_()
            probs_RV.scatter_add_(1, targets_N[rows, None], minus_one_R1[: probs_RV.shape[0]])
            probs_RV.mul_(scale_N1[rows])
            if probs_RV is not grad_RV:
                grad_RV.copy_(probs_RV)
        return grad_NV, None, None, None


def _fp32(x_RV: torch.Tensor, buffer_RV: torch.Tensor) -> torch.Tensor:
    """x itself if it is fp32, else x upcast into the buffer."""
    return x_RV if x_RV.dtype == torch.float32 else buffer_RV[: x_RV.shape[0]].copy_(x_RV)


def _row_chunks(x_NV: torch.Tensor, kept_N: torch.Tensor):
    """Row slices of about CHUNK_ELEMENTS elements each, split into those to compute and those whose
    rows are all ignored (their loss and gradient are 0; told apart on CPU only, where reading kept_N
    costs no wait for a device), and one fp32 buffer of a chunk's shape."""
    elements = CHUNK_ELEMENTS.get(x_NV.device.type, DEFAULT_CHUNK_ELEMENTS)
    rows, columns = x_NV.shape
    step = max(1, min(rows, elements // max(1, columns)))
    chunks = [slice(start, min(start + step, rows)) for start in range(0, rows, step)]
    buffer = torch.empty((step, columns), dtype=torch.float32, device=x_NV.device)
    if kept_N.device.type != "cpu":
        return chunks, [], buffer
    padding = kept_N.new_zeros(len(chunks) * step - rows)
    labelled = torch.cat([kept_N, padding]).view(len(chunks), step).any(dim=1).tolist()
    return (
        [rows for rows, keep in zip(chunks, labelled, strict=True) if keep],
        [rows for rows, keep in zip(chunks, labelled, strict=True) if not keep],
        buffer,
    )


def cross_entropy_sum(logits_NV: torch.Tensor, labels_N: torch.Tensor, ignore_index: int, divisor):
    """sum of the fp32 cross entropy over rows whose label is not ignore_index, divided by divisor
    (a number or a 0-d tensor)."""
    if isinstance(divisor, torch.Tensor):
        divisor = divisor.to(device=logits_NV.device, dtype=torch.float32)
    return ChunkedCrossEntropy.apply(logits_NV, labels_N.to(logits_NV.device), ignore_index, divisor)
