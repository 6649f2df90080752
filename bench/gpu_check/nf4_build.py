"""Section `nf4_build`: the in-memory NF4 quantization the QLoRA sections use gives the same 4-bit
weights and logits as the factory's `from_pretrained(quantization_config=...)` path."""

import tempfile

import torch

from bench.gpu_check.common import (
    TINY,
    Run,
    Section,
    bnb_config,
    build_ours,
    our_config,
    peft_cfg,
    quantize_nf4_,
    rel_diff,
)


def nf4_build(run: Run, sec: Section) -> None:
    """In-memory NF4 quantization (used by the QLoRA sections) == the factory's from_pretrained path."""
    from mixtral_compat.bitsandbytes import keep_4bit_training_layout
    from mixtral_model import MixtralForCausalLM

    quant = bnb_config(peft_cfg("qlora"))
    config = our_config(TINY, 2)
    ours = build_ours(config, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        device_map = {"": torch.cuda.current_device()} if run.device.type == "cuda" else None
        loaded = MixtralForCausalLM.from_pretrained(
            tmp, dtype=torch.bfloat16, quantization_config=quant, device_map=device_map
        )
    ours = ours.to(run.device)
    quantize_nf4_(ours, quant, run.device)
    keep_4bit_training_layout(loaded)
    theirs_modules = dict(loaded.named_modules())
    mismatched = total = 0
    for name, module in ours.named_modules():
        if type(module).__name__ == "Linear4bit":
            other = theirs_modules[name]
            assert type(other).__name__ == "Linear4bit", (
                f"{name} is {type(other).__name__} after from_pretrained"
            )
            a, b = module.weight.data.view(torch.uint8), other.weight.data.view(torch.uint8)
            mismatched += int((a != b).sum())
            total += a.numel()
    ids = torch.randint(0, config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0)).to(
        run.device
    )
    with torch.no_grad():
        diff = rel_diff(ours.eval()(input_ids=ids).logits, loaded.eval()(input_ids=ids).logits)
    sec.say(f"{total} packed NF4 bytes compared, {mismatched} differ; logits max rel diff {diff:.2e}")
    sec.check("packed NF4 bytes differing (fraction)", mismatched / total, 0.0)
    sec.check("logits rel diff, in-memory vs from_pretrained NF4", diff, 1e-3)
