"""Learnability of the bundled demo task by the tiny recipe's model, in a plain torch loop on CPU.

Composes `+recipe=tiny/sft`, prepares its data with `mixtral_tune.data`, builds transformers'
`MixtralForCausalLM` (the reference architecture of our native model) from the recipe's
`model.architecture`, trains with the recipe's batch size, learning rate, warmup and cosine
schedule, and reports held-out exact match (greedy decoding) before and after, with wall and
process CPU time.

`--init native` starts instead from the pipeline's own random init (`write_random_init`, seeded with
`trainer.seed`), loaded into the same transformers model: the loop, the model code and the data
order stay the same, only the initial weights change.

    python bench/tiny_sft_learnability.py [--init transformers|native] [overrides, e.g. trainer.seed=3]
"""

import argparse
import math
import random
import resource
import tempfile
import time
from pathlib import Path

import torch
import transformers

from mixtral_model import encode_chat, load_tokenizer
from mixtral_tune.config import load_config
from mixtral_tune.data import prepare_sft_data
from mixtral_tune.evaluate import read_jsonl
from mixtral_tune.training.model_factory import random_init_config, write_random_init


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def build_reference_model(cfg, tokenizer) -> transformers.MixtralForCausalLM:
    """transformers' Mixtral with the shape the pipeline's random init would have."""
    config = transformers.MixtralConfig.from_dict(
        random_init_config(cfg, tokenizer).to_dict(),
        router_aux_loss_coef=cfg.model.router_aux_loss_coef,
        output_router_logits=True,
    )
    config._attn_implementation = cfg.model.attn_implementation
    return transformers.MixtralForCausalLM(config)


def load_native_init(cfg, tokenizer) -> transformers.MixtralForCausalLM:
    """The pipeline's seeded random-init checkpoint, loaded into transformers' Mixtral."""
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch) / "base"
        write_random_init(cfg, tokenizer, base, cfg.trainer.seed)
        return transformers.MixtralForCausalLM.from_pretrained(
            base,
            router_aux_loss_coef=cfg.model.router_aux_loss_coef,
            output_router_logits=True,
            attn_implementation=cfg.model.attn_implementation,
        )


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        length = len(row["input_ids"])
        input_ids[i, :length] = torch.tensor(row["input_ids"])
        labels[i, :length] = torch.tensor(row["labels"])
        attention_mask[i, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


@torch.no_grad()
def exact_match(model, tokenizer, conversations: list[list[dict]]) -> float:
    """Greedy answers to held-out prompts, compared whole with the reference answers."""
    model.eval()
    by_length: dict[int, list[tuple[list[int], str]]] = {}
    for messages in conversations:
        prompt_ids = encode_chat(tokenizer, messages[:-1], add_generation_prompt=True)["input_ids"]
        by_length.setdefault(len(prompt_ids), []).append((prompt_ids, messages[-1]["content"]))
    hits = 0
    for length, items in by_length.items():
        generated = model.generate(
            torch.tensor([ids for ids, _ in items]),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        answers = tokenizer.batch_decode(generated[:, length:], skip_special_tokens=True)
        hits += sum(answer.strip() == expected for answer, (_, expected) in zip(answers, items, strict=True))
    model.train()
    return hits / len(conversations)


def learning_rate_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 0 (the HF `cosine` schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", choices=["transformers", "native"], default="transformers")
    parser.add_argument("--threads", type=int, default=2)
    args, overrides = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    cfg = load_config("sft", ["+recipe=tiny/sft", *overrides])
    torch.manual_seed(cfg.trainer.seed)
    tokenizer = load_tokenizer()
    data = prepare_sft_data(cfg.data, tokenizer, seed=cfg.trainer.seed)
    held_out = [row["messages"] for row in read_jsonl(cfg.data.eval_path)]
    model = (
        build_reference_model(cfg, tokenizer)
        if args.init == "transformers"
        else load_native_init(cfg, tokenizer)
    )
    trainer = cfg.trainer
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=trainer.learning_rate, weight_decay=trainer.weight_decay
    )
    warmup = math.ceil(trainer.warmup_steps * cfg.max_steps)  # a ratio below 1 (the tiny recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, warmup, cfg.max_steps)
    )
    print(f"init: {args.init}, seed {trainer.seed}")
    print(
        f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; train rows {len(data.train)}"
    )
    print(f"held-out exact match before: {exact_match(model, tokenizer, held_out):.3f}")

    rows = data.train.to_list()
    order = random.Random(trainer.seed)
    started, started_cpu = time.perf_counter(), cpu_seconds()
    for step in range(cfg.max_steps):
        batch = collate(order.sample(rows, trainer.per_device_train_batch_size), tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if (step + 1) % trainer.logging_steps == 0:
            print(
                f"step {step + 1}: loss {loss.item():.3f} ({time.perf_counter() - started:.0f}s)", flush=True
            )
    wall, cpu = time.perf_counter() - started, cpu_seconds() - started_cpu
    print(
        f"trained {cfg.max_steps} steps in {wall:.0f}s wall, {cpu:.0f}s process CPU ({cpu / 2:.0f}s on 2 idle cores)"
    )
    print(f"held-out exact match after: {exact_match(model, tokenizer, held_out):.3f}")


if __name__ == "__main__":
    main()
