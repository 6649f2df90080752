"""flash-attn (>= 2.3) backend: dense causal kernel, or the variable-length kernel when rows carry
padding or packed sequences. Sliding windows map to flash-attn's `window_size=(window - 1, 0)`;
causal masks are bottom-right aligned, which is what a KV cache needs.
"""

import importlib.metadata
import importlib.util

import torch
import torch.nn.functional as F

from .masks import AttentionLayout

FLASH_ATTN_MIN_VERSION = (2, 3)
FLASH_ATTN_HELP = (
    "install it on a CUDA machine with `pip install -e '.[gpu]'` (flash-attn>=2.3, builds against your CUDA "
    "torch), or choose attn_implementation='sdpa'"
)


def check_flash_attention_available() -> None:
    """Raise a one-line ImportError unless flash-attn >= 2.3 and a CUDA device are present."""
    if importlib.util.find_spec("flash_attn") is None:
        raise ImportError(
            f"attn_implementation='flash_attention_2' needs the flash-attn package: {FLASH_ATTN_HELP}"
        )
    version = importlib.metadata.version("flash_attn")
    if tuple(int(p) for p in version.split(".")[:2]) < FLASH_ATTN_MIN_VERSION:
        raise ImportError(
            f"flash-attn {version} is too old for sliding windows (needs >=2.3): {FLASH_ATTN_HELP}"
        )
    if not torch.cuda.is_available():
        raise ImportError(f"attn_implementation='flash_attention_2' needs a CUDA GPU: {FLASH_ATTN_HELP}")


def _real_token_runs(real_BL: torch.Tensor, sequence_ids_BL: torch.Tensor | None):
    """Flat indices of the real tokens and the cumulative lengths of their (row, sequence) runs."""
    b, length = real_BL.shape
    indices = real_BL.reshape(-1).nonzero().squeeze(-1)
    row_BL = torch.arange(b, device=real_BL.device)[:, None].expand(b, length)
    run_id_BL = row_BL * (length + 1) + (sequence_ids_BL if sequence_ids_BL is not None else 0)
    run_of_token = run_id_BL.reshape(-1)[indices]
    _, lengths = torch.unique_consecutive(run_of_token, return_counts=True)
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return indices, cu_seqlens, int(lengths.max())


def _per_row_runs(real_BL: torch.Tensor):
    """Like _real_token_runs with one run per row, keeping rows that have no real token."""
    indices = real_BL.reshape(-1).nonzero().squeeze(-1)
    lengths = real_BL.sum(-1)
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return indices, cu_seqlens, int(lengths.max())


def flash_attention(
    q_BNTH, k_BKSH, v_BKSH, layout: AttentionLayout, scale: float, dropout: float, training: bool
):
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    if q_BNTH.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(
            f"flash_attention_2 runs in fp16/bf16, got {q_BNTH.dtype}: load the model with dtype=torch.bfloat16"
        )
    q_BTNH, k_BSKH, v_BSKH = q_BNTH.transpose(1, 2), k_BKSH.transpose(1, 2), v_BKSH.transpose(1, 2)
    b, t, n, h = q_BTNH.shape
    s = k_BSKH.shape[1]
    window = (layout.sliding_window - 1, 0) if layout.sliding_window is not None else (-1, -1)
    dropout_p = dropout if training else 0.0
    if layout.padding_mask_BS is None and layout.sequence_ids_BT is None:
        return flash_attn_func(
            q_BTNH, k_BSKH, v_BSKH, dropout_p, softmax_scale=scale, causal=True, window_size=window
        )
    padding_BS = layout.padding_mask_BS
    real_q_BT = (
        padding_BS[:, -t:].bool() if padding_BS is not None else q_BTNH.new_ones(b, t, dtype=torch.bool)
    )
    if layout.sequence_ids_BT is not None:
        q_idx, cu_q, max_q = _real_token_runs(real_q_BT, layout.sequence_ids_BT)
        k_idx, cu_k, max_k = q_idx, cu_q, max_q
    else:
        q_idx, cu_q, max_q = _per_row_runs(real_q_BT)
        k_idx, cu_k, max_k = _per_row_runs(padding_BS[:, -s:].bool())
    out_MNH = flash_attn_varlen_func(
        q_BTNH.reshape(b * t, n, h)[q_idx],
        k_BSKH.reshape(b * s, *k_BSKH.shape[2:])[k_idx],
        v_BSKH.reshape(b * s, *v_BSKH.shape[2:])[k_idx],
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=max_q,
        max_seqlen_k=max_k,
        dropout_p=dropout_p,
        softmax_scale=scale,
        causal=True,
        window_size=window,
    )
    out_flat = out_MNH.new_zeros(b * t, n, h)
    out_flat[q_idx] = out_MNH
    return out_flat.view(b, t, n, h)
