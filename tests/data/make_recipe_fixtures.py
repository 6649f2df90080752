"""Writes the tiny stand-ins for the hub datasets the 8x7B recipes train on, in the same row shape:

  ultrachat_tiny(_test).jsonl      HuggingFaceH4/ultrachat_200k rows: prompt, prompt_id, messages (multi-turn,
                            user/assistant alternating, ending with the assistant).
  ultrafeedback_tiny.jsonl  HuggingFaceH4/ultrafeedback_binarized rows: prompt, prompt_id, chosen and
                            rejected as [user, assistant] conversations that repeat the prompt, messages,
                            score_chosen, score_rejected.
  kto_mix_tiny(_test).jsonl trl-lib/kto-mix-14k rows: prompt [user], completion [assistant], label (bool).

The text is seeded word salad of 20-250 tokens per row: the recipe tests need the shape, not
the meaning. Run from the repository root: python tests/data/make_recipe_fixtures.py
"""

import hashlib
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
WORDS = (
    "the a model river music window garden history energy question answer explain simple data "
    "light city mountain learn write code story market friend travel science school because while "
    "often never always quickly carefully between under through before after small large green "
    "ancient modern bright quiet, people. Why? how: 2024 3.5 % (see) 'quote' - list; item"
).split()


def sentence(rng: random.Random, low: int, high: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))
    return text[0].upper() + text[1:] + rng.choice([".", "?", "!", ".\n\n- point one\n- point two."])


def prompt_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def ultrachat_row(rng: random.Random) -> dict:
    turns = rng.randint(1, 3)
    messages = []
    for _ in range(turns):
        messages.append({"content": sentence(rng, 4, 12), "role": "user"})
        messages.append({"content": sentence(rng, 6, 24), "role": "assistant"})
    prompt = messages[0]["content"]
    return {"prompt": prompt, "prompt_id": prompt_id(prompt), "messages": messages}


def ultrafeedback_row(rng: random.Random) -> dict:
    prompt = sentence(rng, 5, 30)
    chosen = [{"content": prompt, "role": "user"}, {"content": sentence(rng, 10, 60), "role": "assistant"}]
    rejected = [{"content": prompt, "role": "user"}, {"content": sentence(rng, 10, 60), "role": "assistant"}]
    score_rejected = rng.choice([1.0, 2.0, 3.0, 4.5])
    return {
        "prompt": prompt,
        "prompt_id": prompt_id(prompt),
        "chosen": chosen,
        "rejected": rejected,
        "messages": chosen,
        "score_chosen": score_rejected + rng.choice([0.5, 1.0, 2.5]),
        "score_rejected": score_rejected,
    }


def kto_mix_row(rng: random.Random) -> dict:
    return {
        "prompt": [{"content": sentence(rng, 5, 30), "role": "user"}],
        "completion": [{"content": sentence(rng, 10, 60), "role": "assistant"}],
        "label": rng.random() < 0.5,
    }


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    rng = random.Random(0)
    write(HERE / "ultrachat_tiny.jsonl", [ultrachat_row(rng) for _ in range(180)])
    write(HERE / "ultrachat_tiny_test.jsonl", [ultrachat_row(rng) for _ in range(16)])
    write(HERE / "ultrafeedback_tiny.jsonl", [ultrafeedback_row(rng) for _ in range(32)])
    write(HERE / "ultrafeedback_tiny_test.jsonl", [ultrafeedback_row(rng) for _ in range(8)])
    write(HERE / "kto_mix_tiny.jsonl", [kto_mix_row(rng) for _ in range(32)])
    write(HERE / "kto_mix_tiny_test.jsonl", [kto_mix_row(rng) for _ in range(8)])
