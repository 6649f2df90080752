"""Sample generations at each evaluation: greedy completions of the first few eval prompts, on the
console and in the trackers (`evaluation.sample_prompts`, `evaluation.sample_max_new_tokens`).

TRL's `LogCompletionsCallback` does this for trainers whose eval set has a text `prompt` column, every
`eval_steps` training steps, into wandb/comet tables. This mirrors it with what ours adds: the prompts
are the token ids the run evaluates on (SFT rows are tokenized here: the tokens before a row's first
trained token; DPO rows: the prompt messages in the run's chat template with the generation prompt),
the completions come after each evaluation, and they are printed as well as logged (a wandb table named
`completions` as TRL's, tensorboard text). Every rank generates (greedy, the same prompts), so sharded
models (ZeRO-3, expert parallelism) step their collectives together; rank 0 reports.
"""

import torch
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback

from mixtral_model.tokenizer import encode_conversation

IGNORE_INDEX = -100
SHOWN_PROMPT_CHARS = 200


def sample_prompt_ids(eval_dataset, tokenizer, count: int) -> list[list[int]]:
    """Token ids of the first `count` eval prompts, as the model sees them before its answer."""
    rows = eval_dataset.select(range(min(count, len(eval_dataset))))
    if "prompt" in rows.column_names:  # DPO rows: conversational prompts, rendered with the generation prompt
        return [
            encode_conversation(tokenizer, row["prompt"], add_generation_prompt=True)["input_ids"]
            for row in rows
        ]
    prompts = []
    for row in rows:  # SFT rows (packed or not): the first sequence's tokens before its first trained token
        first_trained = next(index for index, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
        prompts.append(row["input_ids"][:first_trained])
    return prompts


@torch.no_grad()
def greedy_completions(model, prompts: list[list[int]], tokenizer, max_new_tokens: int) -> list[str]:
    """`model.generate` greedily, one prompt at a time (no padding), stopping at the tokenizer's eos."""
    was_training = model.training
    model.eval()
    synced = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    completions = []
    try:
        for ids in prompts:
            input_ids = torch.tensor([ids], device=model.device)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
                synced_gpus=synced,
            )
            completions.append(tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return completions


class SampleGenerationsCallback(TrainerCallback):
    def __init__(self, trainer, count: int, max_new_tokens: int):
        self.trainer = trainer
        self.prompts = sample_prompt_ids(trainer.eval_dataset, trainer.processing_class, count)
        self.max_new_tokens = max_new_tokens
        self.table: list[list] = []

    def on_evaluate(self, args, state, control, **kwargs):
        tokenizer = self.trainer.processing_class
        completions = greedy_completions(self.trainer.model, self.prompts, tokenizer, self.max_new_tokens)
        if not state.is_world_process_zero:
            return
        texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in self.prompts]
        rows = [
            [state.global_step, prompt, completion]
            for prompt, completion in zip(texts, completions, strict=True)
        ]
        self.table.extend(rows)
        lines = [f"samples at step {state.global_step} (greedy, {self.max_new_tokens} new tokens at most):"]
        for number, (_, prompt, completion) in enumerate(rows):
            lines.append(f"  [{number}] prompt: ...{prompt[-SHOWN_PROMPT_CHARS:]!r}")
            lines.append(f"  [{number}] completion: {completion!r}")
        print("\n".join(lines), flush=True)
        self.log_to_trackers(args, state.global_step, rows)

    def log_to_trackers(self, args, step: int, rows: list[list]) -> None:
        if "wandb" in args.report_to:
            import wandb

            if wandb.run is not None:
                table = wandb.Table(columns=["step", "prompt", "completion"], data=self.table)
                wandb.log({"completions": table}, commit=False)
        for callback in self.trainer.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                for number, (_, prompt, completion) in enumerate(rows):
                    callback.tb_writer.add_text(f"completions/{number}", f"{prompt}\n\n→ {completion}", step)
