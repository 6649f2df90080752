"""Max relative differences between our Mixtral and transformers' on identical weights (fp32, CPU),
for each case of tests/test_model_parity.py: logits, loss, aux_loss, router logits, gradients.

    python bench/parity_report.py
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from mixtral_reference import model_pair, reference_grad  # noqa: E402
from test_model_parity import batch_with_padding, forward_backward  # noqa: E402

from mixtral_model.testing import max_relative_diff  # noqa: E402

CASES = {
    "gqa1": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa2": dict(num_attention_heads=4, num_key_value_heads=2),
    "gqa4": dict(num_attention_heads=8, num_key_value_heads=2),
    "top1": dict(num_experts_per_tok=1),
    "top3": dict(num_experts_per_tok=3),
    "window5": dict(sliding_window=5),
}


def case_diffs(overrides: dict, pad: bool, attn: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as directory:
        ours, ref = model_pair(Path(directory), attn_implementation=attn, **overrides)
    input_ids, attention_mask, labels = batch_with_padding(ours.config.vocab_size, pad)
    out = forward_backward(ours, input_ids, attention_mask, labels)
    expected = forward_backward(ref, input_ids, attention_mask, labels)
    real = attention_mask.bool()
    router = max(
        max_relative_diff(a[real.reshape(-1)].detach(), b[real.reshape(-1)].detach())
        for a, b in zip(out.router_logits, expected.router_logits, strict=True)
    )
    grads = max(
        max_relative_diff(p.grad, reference_grad(ref, name, ours.config.intermediate_size))
        for name, p in ours.named_parameters()
    )
    return {
        "logits": max_relative_diff(out.logits[real].detach(), expected.logits[real].detach()),
        "loss": max_relative_diff(out.loss.detach(), expected.loss.detach()),
        "aux_loss": max_relative_diff(out.aux_loss.detach(), expected.aux_loss.detach()),
        "router_logits": router,
        "grads": grads,
    }


def main() -> None:
    columns = ["logits", "loss", "aux_loss", "router_logits", "grads"]
    print(f"{'case':<22}" + "".join(f"{c:>14}" for c in columns))
    worst = dict.fromkeys(columns, 0.0)
    for name, overrides in CASES.items():
        for pad in (False, True):
            for attn in ("eager", "sdpa"):
                diffs = case_diffs(overrides, pad, attn)
                label = f"{name}-{'pad' if pad else 'nopad'}-{attn}"
                print(f"{label:<22}" + "".join(f"{diffs[c]:>14.2e}" for c in columns))
                worst = {c: max(worst[c], diffs[c]) for c in columns}
    print(f"{'max':<22}" + "".join(f"{worst[c]:>14.2e}" for c in columns))


if __name__ == "__main__":
    main()
