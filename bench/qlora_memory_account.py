"""Mixtral-8x7B QLoRA memory account, on CPU: persistent bytes from the config (mixtral_tune/estimate.py's
qlora_account, held to real tensors by tests/test_qlora_memory.py), and the bytes one decoder layer
saves for backward while it is recomputed, measured with saved-tensor hooks on a model whose shapes are
8x7B's scaled down in proportion (hidden 4096/16, intermediate 14336/16, vocab 32000/16, 4096/16 tokens,
the same 32/8 heads, 8 experts top-2) and scaled back up by 16 x 16 = 256 (every saved tensor is
tokens x a width). Built as bench/gpu_check/mixtral_8x7b_qlora.py builds it (the factory's QLoRA
preparation and LoRA, gradient checkpointing, TRL's fused LM head).

    python bench/qlora_memory_account.py
"""

import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench.gpu_check.common as g  # noqa: E402
from bench.gpu_check.mixtral_8x7b_qlora import fused_lm_head, one_layer_saved_bytes  # noqa: E402
from mixtral_tune.estimate import GIB as GB  # noqa: E402
from mixtral_tune.estimate import Shape, layer_work, qlora_account  # noqa: E402

SCALE = 16
SHAPE = dict(g.MIXTRAL_8X7B, vocab_size=32000 // SCALE, hidden_size=4096 // SCALE,
             intermediate_size=14336 // SCALE)  # fmt: skip
TOKENS = 4096 // SCALE


def peft_upcast(model, gradient_checkpointing: bool) -> None:
    """The preparation the factory used before: PEFT's, which casts unquantized weights to fp32."""
    import peft

    peft.prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )  # fmt: skip


def one_layer_saved(backend: str, autocast: bool, upcast: bool = False) -> dict[str, float]:
    import mixtral_tune.training.model_factory as factory

    if upcast:
        original, factory.prepare_4bit_for_training = factory.prepare_4bit_for_training, peft_upcast
    try:
        return _one_layer_saved(backend, autocast)
    finally:
        if upcast:
            factory.prepare_4bit_for_training = original


def _one_layer_saved(backend: str, autocast: bool) -> dict[str, float]:
    config = g.our_config(SHAPE, 1)
    cfg = g.peft_cfg("qlora")
    model = g.build_ours(config, torch.device("cpu"))
    g.quantize_nf4_(model, g.bnb_config(cfg), torch.device("cpu"))
    fused_lm_head(model)
    model = g.apply_peft_ours(model, cfg, True)
    g.set_expert_backend(model, backend)
    ids = torch.randint(0, config.vocab_size, (1, TOKENS), generator=torch.Generator().manual_seed(0))
    context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    saved = one_layer_saved_bytes(
        model, lambda m: m(input_ids=ids, labels=ids, fused_lm_head=True).loss, context
    )
    return {k: v * SCALE * SCALE / GB for k, v in saved.items()}


def main() -> None:
    torch.set_num_threads(1)
    config = g.our_config(g.MIXTRAL_8X7B, 32)
    print("Persistent, GiB (LoRA r=16 on attention and experts, unquantized weights bf16):")
    for optimizer in ("adamw", "adamw_8bit"):
        account = qlora_account(config, 16, "both", 2, optimizer)
        parts = ", ".join(f"{k} {v / GB:.3f}" for k, v in account.items())
        print(f"  {optimizer}: {parts}; total {sum(account.values()) / GB:.2f}")
    print(f"Checkpointed layer inputs: 32 x 4096 x 4096 x 2 B = {32 * 4096 * 4096 * 2 / GB:.2f} GiB")
    print("One layer recomputed in backward, bytes saved for backward (GiB at 8x7B scale):")
    for backend in ("per_expert", "grouped_loop"):
        for autocast, upcast in ((False, True), (False, False), (True, False)):
            saved = one_layer_saved(backend, autocast, upcast)
            parts = ", ".join(f"{k} {v:.3f}" for k, v in saved.items())
            label = f"{'bf16 autocast' if autocast else 'no autocast'}, {'PEFT fp32 upcast' if upcast else 'factory'}"
            print(f"  {backend}, {label}: {parts}; sum {sum(saved.values()):.2f}")
    cfg = g.peft_cfg("qlora")
    print(f"mixtral_tune/estimate.py's layer_work (bf16 autocast, dropout {cfg.peft.dropout}):")
    for backend in ("per_expert", "grouped_loop"):
        for device in ("cpu", "cuda"):
            work = layer_work(
                Shape.of(config), 4096, peft="qlora", lora_r=cfg.peft.r, lora_targets=cfg.peft.targets,
                lora_dropout=cfg.peft.dropout, device=device, expert_backend=backend,
            )  # fmt: skip
            parts = ", ".join(f"{k} {v / GB:.3f}" for k, v in work.items())
            print(f"  {backend}, {device} rules: {parts}; sum {sum(work.values()) / GB:.2f}")


if __name__ == "__main__":
    main()
