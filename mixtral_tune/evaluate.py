"""Held-out evaluation for the demo and recipes: exact match of greedy answers (SFT rows) and
preferences between chosen and rejected answers (DPO rows), from summed answer log-probs.

DPO's implicit reward of an answer y to prompt x is beta * (log pi(y|x) - log pi_ref(y|x));
preference accuracy is the share of pairs whose chosen answer gets the higher reward, and the
margin is the mean reward difference. `prefers_chosen` is the model's own preference,
log pi(chosen|x) > log pi(rejected|x), which needs no reference.
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from mixtral_model import encode_chat


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file: UTF-8, one object per "\n"-ended line, blank lines skipped."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def left_padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    input_ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in sequences])
    attention_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
    return input_ids, attention_mask


@torch.no_grad()
def greedy_answers(
    model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 16, batch_size: int = 64
):
    answers = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        ids = [
            encode_chat(tokenizer, messages, add_generation_prompt=True)["input_ids"] for messages in batch
        ]
        input_ids, attention_mask = left_padded(ids, tokenizer.pad_token_id)
        generated = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = generated[:, input_ids.shape[1] :]
        answers += [tokenizer.decode(t, skip_special_tokens=True).strip() for t in new_tokens]
    return answers


def exact_match(model, tokenizer, sft_rows: list[dict]) -> tuple[float, list[tuple[str, str, str]]]:
    """Share of rows whose greedy answer equals the reference answer; and (prompt, answer, reference)."""
    prompts = [row["messages"][:-1] for row in sft_rows]
    references = [row["messages"][-1]["content"].strip() for row in sft_rows]
    answers = greedy_answers(model, tokenizer, prompts)
    hits = sum(a == r for a, r in zip(answers, references, strict=True))
    samples = [(p[-1]["content"], a, r) for p, a, r in zip(prompts, answers, references, strict=True)]
    return hits / len(sft_rows), samples


@torch.no_grad()
def answer_log_probs(model, tokenizer, prompt: list[dict], answer: list[dict]) -> float:
    """Summed log-probability of the answer tokens (assistant text and its </s>) given the prompt."""
    encoded = encode_chat(tokenizer, prompt + answer)
    input_ids = torch.tensor([encoded["input_ids"]], device=model.device)
    mask = torch.tensor(encoded["assistant_mask"][1:], device=model.device, dtype=torch.bool)
    log_probs = F.log_softmax(model(input_ids=input_ids).logits[0, :-1].float(), dim=-1)
    token_log_probs = log_probs.gather(-1, input_ids[0, 1:, None]).squeeze(-1)
    return token_log_probs[mask].sum().item()


def pair_log_probs(model, tokenizer, rows: list[dict]) -> torch.Tensor:
    """(pairs, 2) summed log-probs of the chosen and the rejected answer."""
    return torch.tensor(
        [
            [answer_log_probs(model, tokenizer, row["prompt"], row[key]) for key in ("chosen", "rejected")]
            for row in rows
        ]
    )


def preference_metrics(policy, reference, tokenizer, dpo_rows: list[dict], beta: float) -> dict[str, float]:
    policy_lp = pair_log_probs(policy, tokenizer, dpo_rows)
    metrics = {"prefers_chosen": (policy_lp[:, 0] > policy_lp[:, 1]).float().mean().item()}
    if reference is not None:
        rewards = beta * (policy_lp - pair_log_probs(reference, tokenizer, dpo_rows))
        metrics["reward_accuracy"] = (rewards[:, 0] > rewards[:, 1]).float().mean().item()
        metrics["reward_margin"] = (rewards[:, 0] - rewards[:, 1]).mean().item()
    return metrics
