"""Worker: the tiny MoE model trained through `transformers.Trainer`'s DeepSpeed integration on 2 gloo
ranks, with `prepare_for_deepspeed` and `DeepSpeedMoETrainerMixin`, held against a single-process
reference that steps on the same global batch.

The dataset is one global batch (4 sequences, 2 per rank), so every optimizer step sees all of it
whatever order the sampler picks; the Trainer's token-count normalisation makes the loss the mean over
the global batch's tokens. The Trainer builds the optimizer (SGD, no `optimizer` block in the DeepSpeed
config), so the mixin's MoE parameter groups are what DeepSpeed gets. Rank 0 writes --out as JSON.

    torchrun --nproc_per_node 2 tests/distributed/ds_trainer_parity.py --zero-stage 2 --expert-parallel-size 2 --out r.json
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import distributed as dist
from transformers import Trainer, TrainingArguments, default_data_collator

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parent)]

from ds_train_parity import CLIP_NORM, build_models, compare, local_parameters, merge_ranks  # noqa: E402

from mixtral_parallel.deepspeed_moe import gathered_state_dict, prepare_for_deepspeed  # noqa: E402
from mixtral_tune.training.trainers import DeepSpeedMoETrainerMixin  # noqa: E402

GLOBAL_BATCH, SEQ, LR, LR_ADAMW = 4, 16, 0.5, 1e-2


class MoETrainer(DeepSpeedMoETrainerMixin, Trainer):
    pass


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--zero-stage", type=int, required=True)
    parser.add_argument("--expert-parallel-size", type=int, default=1)
    parser.add_argument(
        "--optimizer",
        choices=["trainer-sgd", "deepspeed-adamw"],
        default="trainer-sgd",
        help="built by the Trainer (through the mixin), or by DeepSpeed from an `optimizer` config block",
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", required=True)
    return parser.parse_args()


def global_batch(vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(7)
    input_ids = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ), generator=g)
    labels = input_ids.clone()
    labels[:, 0] = -100  # the Trainer and the loss then count the same predicted tokens
    return [{"input_ids": i, "labels": lab} for i, lab in zip(input_ids, labels, strict=True)]


def training_arguments(args, output_dir: str) -> TrainingArguments:
    ds_config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": args.zero_stage, "stage3_param_persistence_threshold": 0},
    }
    if args.optimizer == "deepspeed-adamw":
        ds_config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True},
        }
    return TrainingArguments(
        output_dir=output_dir,
        deepspeed=ds_config,
        per_device_train_batch_size=GLOBAL_BATCH // 2,
        max_steps=args.steps,
        optim="sgd",
        learning_rate=LR if args.optimizer == "trainer-sgd" else LR_ADAMW,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=CLIP_NORM,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=0,
    )


def reference_optimizer(args, model):
    if args.optimizer == "deepspeed-adamw":
        return torch.optim.AdamW(model.parameters(), lr=LR_ADAMW, weight_decay=0.0)
    return torch.optim.SGD(model.parameters(), lr=LR)


def train_reference(optimizer, model, batch: list[dict], steps: int):
    collated = default_data_collator(batch)
    for _ in range(steps):
        optimizer.zero_grad()
        model(**collated, use_cache=False).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        optimizer.step()


def compare_saved(saved: dict, trained: dict) -> dict:
    """The checkpoint written through `gathered_state_dict` against the trained parameters."""
    shared = saved.keys() & trained.keys()
    return {
        "missing": sorted(trained.keys() - saved.keys()),
        "max_abs_diff": max((saved[k] - trained[k]).abs().max().item() for k in shared),
    }


def main():
    args = parse_args()
    training_args = training_arguments(
        args, str(Path(args.out).parent / "trainer")
    )  # initialises torch.distributed
    model, reference = build_models(args.expert_parallel_size)
    model, _ = prepare_for_deepspeed(model, training_args.hf_deepspeed_config.config, model.expert_parallel)
    batch = global_batch(model.config.vocab_size)
    trainer = MoETrainer(
        model=model, args=training_args, train_dataset=batch, data_collator=default_data_collator
    )
    trainer.train()
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, local_parameters(trainer.model_wrapped))
    save_dir = Path(args.out).parent / "saved"
    trainer.model.save_pretrained(save_dir, state_dict=gathered_state_dict(trainer.model))  # every rank
    if dist.get_rank() == 0:
        trained, spread = merge_ranks(per_rank)
        train_reference(reference_optimizer(args, reference), reference, batch, args.steps)
        result = compare(trained, reference)
        saved = load_file(save_dir / "model.safetensors")
        result.update(
            saved_vs_trained=compare_saved(saved, trained),
            replica_spread=spread,
            optimizer_groups=[
                {"name": g.get("name"), "moe": g.get("moe", False), "params": len(g["params"])}
                for g in trainer.optimizer.optimizer.param_groups
            ],
            losses=[entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        )
        Path(args.out).write_text(json.dumps(result, indent=1))
    dist.barrier()


if __name__ == "__main__":
    main()
