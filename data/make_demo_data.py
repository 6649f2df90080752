"""Generate the bundled demo datasets: string reversal, whose answers can be checked exactly.

Each prompt asks to reverse a short space-separated lowercase string (every letter is one token of
the Mixtral tokenizer): ``Reverse: c a f e`` -> ``e f a c``. The tiny recipe's 2-layer MoE learns
it in about 200 CPU steps (held-out exact match ~0 -> ~1), so recipes can be checked end to end.
DPO rejected answers are plausible mistakes: the string left as is, one letter wrong, or two
neighbouring letters swapped.

Writes, next to this script (deterministic, seed below):
  sft_train.jsonl, sft_eval.jsonl   {"messages": [user, assistant]}
  dpo_train.jsonl, dpo_eval.jsonl   {"prompt": [user], "chosen": [assistant], "rejected": [assistant]}
  kto_train.jsonl, kto_eval.jsonl   {"prompt": [user], "completion": [assistant], "label": bool}: each DPO
                                    row unpaired into its chosen (true) and its rejected (false) row
Held-out strings never appear in any training file.

Run: python data/make_demo_data.py
"""

import json
import random
import string
from pathlib import Path

SEED = 1234
ALPHABET = string.ascii_lowercase
MIN_LETTERS, MAX_LETTERS = 3, 5
SFT_TRAIN_ROWS, SFT_EVAL_ROWS = 3000, 150
DPO_TRAIN_ROWS, DPO_EVAL_ROWS = 1000, 150


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


def make_problem(letters: tuple[str, ...]) -> tuple[str, str]:
    return f"Reverse: {' '.join(letters)}", " ".join(reversed(letters))


def wrong_answer(rng: random.Random, letters: tuple[str, ...]) -> str:
    """A plausible mistake that differs from the right answer."""
    right = list(reversed(letters))
    while True:
        mistake = rng.choice(["unreversed", "one letter wrong", "neighbours swapped"])
        wrong = list(letters) if mistake == "unreversed" else list(right)
        if mistake == "one letter wrong":
            position = rng.randrange(len(wrong))
            wrong[position] = rng.choice([c for c in ALPHABET if c != wrong[position]])
        elif mistake == "neighbours swapped":
            position = rng.randrange(len(wrong) - 1)
            wrong[position], wrong[position + 1] = wrong[position + 1], wrong[position]
        if wrong != right:
            return " ".join(wrong)


def sft_row(letters: tuple[str, ...]) -> dict:
    prompt, answer = make_problem(letters)
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def dpo_row(rng: random.Random, letters: tuple[str, ...]) -> dict:
    prompt, answer = make_problem(letters)
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": answer}],
        "rejected": [{"role": "assistant", "content": wrong_answer(rng, letters)}],
    }


def kto_rows(dpo: dict) -> list[dict]:
    """A preference pair as two unpaired KTO rows (TRL's `unpair_preference_dataset`): chosen first."""
    return [
        {"prompt": dpo["prompt"], "completion": dpo["chosen"], "label": True},
        {"prompt": dpo["prompt"], "completion": dpo["rejected"], "label": False},
    ]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def main() -> None:
    rng = random.Random(SEED)
    held_out = unique_letter_strings(rng, SFT_EVAL_ROWS + DPO_EVAL_ROWS, exclude=set())
    training = unique_letter_strings(rng, SFT_TRAIN_ROWS + DPO_TRAIN_ROWS, exclude=set(held_out))
    out = Path(__file__).parent
    write_jsonl(out / "sft_train.jsonl", [sft_row(s) for s in training[:SFT_TRAIN_ROWS]])
    write_jsonl(out / "sft_eval.jsonl", [sft_row(s) for s in held_out[:SFT_EVAL_ROWS]])
    dpo_train = [dpo_row(rng, s) for s in training[SFT_TRAIN_ROWS:]]
    dpo_eval = [dpo_row(rng, s) for s in held_out[SFT_EVAL_ROWS:]]
    write_jsonl(out / "dpo_train.jsonl", dpo_train)
    write_jsonl(out / "dpo_eval.jsonl", dpo_eval)
    write_jsonl(out / "kto_train.jsonl", [row for pair in dpo_train for row in kto_rows(pair)])
    write_jsonl(out / "kto_eval.jsonl", [row for pair in dpo_eval for row in kto_rows(pair)])


if __name__ == "__main__":
    main()
