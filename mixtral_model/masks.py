"""Which keys each query may attend to: causal, padding, sliding window, packed sequences.

Absolute token indices: the queries of this forward are tokens [q_start, q_start + T); a layer's
keys (after a cache update, which may have trimmed old tokens for a sliding window) are the
last kv_len tokens, [q_start + T - kv_len, q_start + T). A query at index i sees key j when
j <= i, j > i - sliding_window, key j is not padding, and both lie in the same packed sequence.
"""

from dataclasses import dataclass, field

import torch


def packed_sequence_ids(position_ids_BT: torch.Tensor) -> torch.Tensor | None:
    """(B, T) sequence index of each token when position ids restart inside a row, else None."""
    first = position_ids_BT[:, :1] - 1
    starts_new = torch.diff(position_ids_BT, prepend=first, dim=-1) != 1
    sequence_ids_BT = starts_new.cumsum(-1)
    if (sequence_ids_BT[:, -1] == 0).all():
        return None
    return sequence_ids_BT


@dataclass
class AttentionLayout:
    q_start: int
    q_len: int
    padding_mask_BS: torch.Tensor | None = None  # 1 = real token, 0 = padding; covers all S tokens so far
    sequence_ids_BT: torch.Tensor | None = None  # packed sequences (no cache)
    sliding_window: int | None = None
    _bool_masks: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.padding_mask_BS is not None and bool(self.padding_mask_BS.all()):
            self.padding_mask_BS = None

    def is_plain_causal(self, kv_len: int) -> bool:
        """True when the mask is the causal triangle of a square T x T block (sdpa's is_causal)."""
        window_covers_all = self.sliding_window is None or self.sliding_window >= kv_len
        return (
            self.padding_mask_BS is None
            and self.sequence_ids_BT is None
            and kv_len == self.q_len
            and window_covers_all
        )

    def sees_everything(self, kv_len: int) -> bool:
        """True when every query may see every key (decoding one token without padding or window cut)."""
        window_covers_all = self.sliding_window is None or self.sliding_window >= kv_len
        return self.q_len == 1 and self.padding_mask_BS is None and window_covers_all

    def bool_mask(self, kv_len: int, device: torch.device) -> torch.Tensor:
        """(B or 1, 1, T, kv_len) boolean mask, True where attention is allowed; memoised per kv_len."""
        if kv_len not in self._bool_masks:
            self._bool_masks[kv_len] = self._build_bool_mask(kv_len, device)
        return self._bool_masks[kv_len]

    def _build_bool_mask(self, kv_len: int, device: torch.device) -> torch.Tensor:
        q_end = self.q_start + self.q_len
        q_idx_T1 = torch.arange(self.q_start, q_end, device=device)[:, None]
        kv_idx_1S = torch.arange(q_end - kv_len, q_end, device=device)[None, :]
        allowed_TS = kv_idx_1S <= q_idx_T1
        if self.sliding_window is not None:
            allowed_TS = allowed_TS & (kv_idx_1S > q_idx_T1 - self.sliding_window)
        allowed_BTS = allowed_TS[None]
        if self.padding_mask_BS is not None:
            if self.padding_mask_BS.shape[-1] < kv_len:
                raise ValueError(
                    f"attention_mask covers {self.padding_mask_BS.shape[-1]} tokens but attention spans {kv_len}; "
                    "pass a mask over the cached and the new tokens"
                )
            keys_real_BS = self.padding_mask_BS[:, -kv_len:].to(device=device, dtype=torch.bool)
            allowed_BTS = allowed_BTS & keys_real_BS[:, None, :]
        if self.sequence_ids_BT is not None:
            same_sequence_BTT = self.sequence_ids_BT[:, :, None] == self.sequence_ids_BT[:, None, :]
            allowed_BTS = allowed_BTS & same_sequence_BTT.to(device)
        return allowed_BTS[:, None]
