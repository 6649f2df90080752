"""Generate the bundled demo datasets: letter-string tasks whose answers can be checked exactly.

Each prompt asks for one of three transformations of a short space-separated lowercase string
(every letter is one token of the Mixtral tokenizer), e.g. ``Reverse: c a f e`` -> ``e f a c``.
A tiny 2-layer MoE learns them in a few hundred CPU steps, so recipes can be checked end to end
by exact match on held-out prompts.

Writes, next to this script (deterministic, seed below):
  sft_train.jsonl, sft_eval.jsonl   {"messages": [user, assistant]}
  dpo_train.jsonl, dpo_eval.jsonl   {"prompt": [user], "chosen": [assistant], "rejected": [assistant]}
Held-out strings never appear in any training file.

Run: python data/make_demo_data.py
"""

import json
import random
import string
from collections.abc import Callable
from pathlib import Path

SEED = 1234
ALPHABET = string.ascii_lowercase
MIN_LETTERS, MAX_LETTERS = 3, 6
SFT_TRAIN_ROWS, SFT_EVAL_ROWS = 3000, 150
DPO_TRAIN_ROWS, DPO_EVAL_ROWS = 1000, 150

TASKS: dict[str, Callable[[list[str]], list[str]]] = {
    "Copy": lambda letters: letters,
    "Reverse": lambda letters: letters[::-1],
    "Uppercase": lambda letters: [letter.upper() for letter in letters],
}


def random_letters(rng: random.Random) -> tuple[str, ...]:
    return tuple(rng.choice(ALPHABET) for _ in range(rng.randint(MIN_LETTERS, MAX_LETTERS)))


def unique_letter_strings(rng: random.Random, count: int, exclude: set) -> list[tuple[str, ...]]:
    strings: list[tuple[str, ...]] = []
    seen = set(exclude)
    while len(strings) < count:
        letters = random_letters(rng)
        if letters not in seen:
            seen.add(letters)
            strings.append(letters)
    return strings


def make_problem(rng: random.Random, letters: tuple[str, ...]) -> tuple[str, str, str]:
    task = rng.choice(sorted(TASKS))
    answer = " ".join(TASKS[task](list(letters)))
    return task, f"{task}: {' '.join(letters)}", answer


def wrong_answer(rng: random.Random, task: str, letters: tuple[str, ...], answer: str) -> str:
    """A plausible mistake: another task's output, or the right output with one letter changed."""
    for other in rng.sample(sorted(TASKS), len(TASKS)):
        candidate = " ".join(TASKS[other](list(letters)))
        if other != task and candidate != answer:
            return candidate
    tokens = answer.split()
    position = rng.randrange(len(tokens))
    replacement = rng.choice([c for c in ALPHABET if c != tokens[position].lower()])
    tokens[position] = replacement.upper() if tokens[position].isupper() else replacement
    return " ".join(tokens)


def sft_row(rng: random.Random, letters: tuple[str, ...]) -> dict:
    _, prompt, answer = make_problem(rng, letters)
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def dpo_row(rng: random.Random, letters: tuple[str, ...]) -> dict:
    task, prompt, answer = make_problem(rng, letters)
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": answer}],
        "rejected": [{"role": "assistant", "content": wrong_answer(rng, task, letters, answer)}],
    }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def main() -> None:
    rng = random.Random(SEED)
    held_out = unique_letter_strings(rng, SFT_EVAL_ROWS + DPO_EVAL_ROWS, exclude=set())
    training = unique_letter_strings(rng, SFT_TRAIN_ROWS + DPO_TRAIN_ROWS, exclude=set(held_out))
    out = Path(__file__).parent
    write_jsonl(out / "sft_train.jsonl", [sft_row(rng, s) for s in training[:SFT_TRAIN_ROWS]])
    write_jsonl(out / "sft_eval.jsonl", [sft_row(rng, s) for s in held_out[:SFT_EVAL_ROWS]])
    write_jsonl(out / "dpo_train.jsonl", [dpo_row(rng, s) for s in training[SFT_TRAIN_ROWS:]])
    write_jsonl(out / "dpo_eval.jsonl", [dpo_row(rng, s) for s in held_out[SFT_EVAL_ROWS:]])


if __name__ == "__main__":
    main()
