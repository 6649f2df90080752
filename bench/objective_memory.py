"""Peak memory of one training step (compute_loss + backward) under the pipelines' SFT and DPO
trainers, on a small-but-wide-vocabulary Mixtral (32000 tokens, hidden 64) and a long batch, where
full (B, T, V) logits would dominate.

Prints one JSON line: the peak resident memory (VmHWM) the step adds above the resident memory
before it, in MiB. `--path unfused` runs the model's own forward(labels=...) instead, which builds
the full logits: what the fused head saves. Run each measurement in a fresh process; to compare
with another checkout, point PYTHONPATH at it:

    PYTHONPATH=. python bench/objective_memory.py --stage sft
    PYTHONPATH=/path/to/other/checkout python bench/objective_memory.py --stage sft
    PYTHONPATH=. python bench/objective_memory.py --stage sft --path unfused
"""

import argparse
import json
import tempfile

import torch
from datasets import Dataset

from mixtral_model import MixtralConfig, MixtralForCausalLM, load_tokenizer


def status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1])


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident size


def tiny_wide_model(z_coef: float) -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        router_aux_loss_coef=0.02,
        router_z_loss_coef=z_coef,
    )
    return MixtralForCausalLM(config)


def sft_trainer(model, tokenizer, output_dir):
    from trl import SFTConfig

    from mixtral_tune.sft import MixtralSFTTrainer

    args = SFTConfig(output_dir=output_dir, report_to=[], use_cpu=True, max_length=None)
    data = Dataset.from_dict({"input_ids": [[1, 5, 6, 7, 2]] * 4})
    return MixtralSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)


def dpo_trainer(model, tokenizer, output_dir):
    from trl import DPOConfig

    from mixtral_tune.dpo import MixtralDPOTrainer

    args = DPOConfig(output_dir=output_dir, report_to=[], use_cpu=True, max_length=None)
    data = Dataset.from_dict({"prompt": ["abc"] * 4, "chosen": [" cba"] * 4, "rejected": [" abc"] * 4})
    reference = tiny_wide_model(model.config.router_z_loss_coef).requires_grad_(False).eval()
    return MixtralDPOTrainer(
        model=model, ref_model=reference, args=args, train_dataset=data, processing_class=tokenizer
    )


def batch(stage: str, rows: int, tokens: int) -> dict:
    g = torch.Generator().manual_seed(0)
    rows = 2 * rows if stage == "dpo" else rows  # DPO: chosen and rejected rows
    input_ids = torch.randint(3, 32000, (rows, tokens), generator=g)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if stage == "sft":
        inputs["labels"] = input_ids.clone()
    else:
        completion_mask = torch.zeros_like(input_ids)
        completion_mask[:, tokens // 4 :] = 1
        inputs["completion_mask"] = completion_mask
    return inputs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", choices=["sft", "dpo"], default="sft")
    parser.add_argument("--path", choices=["trainer", "unfused"], default="trainer")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--z", type=float, default=0.1, help="router_z_loss_coef")
    opts = parser.parse_args()
    if opts.stage == "dpo" and opts.path == "unfused":
        parser.error("--path unfused is for --stage sft (the model's forward has no DPO loss)")
    torch.set_num_threads(1)
    model = tiny_wide_model(opts.z)
    with tempfile.TemporaryDirectory() as output_dir:
        build = sft_trainer if opts.stage == "sft" else dpo_trainer
        trainer = build(model, load_tokenizer(), output_dir)
        trainer.model.train()
        inputs = batch(opts.stage, opts.rows, opts.tokens)

        def step() -> float:
            if opts.path == "trainer":
                loss = trainer.compute_loss(trainer.model, dict(inputs))
            else:
                loss = model(**inputs, output_router_logits=True).loss
            loss.backward()
            return loss.item()

        step()  # gradients and lazily created buffers exist before the measured step
        reset_peak()
        before_kib = status_kib("VmRSS")
        loss = step()
        peak_kib = status_kib("VmHWM")
    print(
        json.dumps(
            {
                "stage": opts.stage,
                "path": opts.path,
                "rows_x_tokens": f"{opts.rows}x{opts.tokens}",
                "loss": round(loss, 6),
                "step_peak_mib": round((peak_kib - before_kib) / 1024, 1),
                "full_logits_mib": round(
                    (2 if opts.stage == "dpo" else 1) * opts.rows * opts.tokens * 32000 * 4 / 2**20, 1
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
