"""ESFT vs full fine-tuning vs LoRA on a task the base model never saw, on CPU, over seeds.

A tiny Mixtral (recipes/tiny/sft.yaml) is first trained on task A (reverse a letter string, the demo's
task); that is the base. Each method then fine-tunes the base on task B (sort the letters) for the same
steps: full fine-tuning (peft=none), ESFT (`mixtral-tune esft-select` on task B's rows, then peft=esft)
and LoRA (peft=lora). Reported per seed and method: held-out exact match on B (learned) and on A (kept),
trained parameters, wall time of the fine-tune.

    python bench/esft_tasks.py --seeds 1 2 3 --out bench/results/esft_tasks_cpu.md
"""

import argparse
import json
import os
import random
import string
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TASKS = {
    "reverse": ("Reverse", lambda letters: list(reversed(letters))),
    "sort": ("Sort", sorted),
}
METHODS = {  # the learning rate of each method (LoRA's adapters start at zero and need a larger one)
    "full": (["peft=none"], 2e-3),
    "esft": (["peft=esft"], 2e-3),
    "lora": (["peft=lora"], 1e-2),
}


def write_task(path: Path, task: str, rows: int, rng: random.Random, exclude: set) -> set:
    word, answer = TASKS[task]
    seen, lines = set(exclude), []
    while len(lines) < rows:
        letters = tuple(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5)))
        if letters in seen:
            continue
        seen.add(letters)
        messages = [
            {"role": "user", "content": f"{word}: {' '.join(letters)}"},
            {"role": "assistant", "content": " ".join(answer(list(letters)))},
        ]
        lines.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(lines) + "\n")
    return seen


def run(command: list[str]) -> float:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def sft(output: Path, data: Path, seed: int, steps: int, extra: list[str]) -> list[str]:
    return [
        sys.executable, str(REPO / "train" / "sft.py"), "+recipe=tiny/sft", f"output_dir={output}",
        f"data.path={data}", "data.eval_path=null", "trainer.eval_steps=null", f"trainer.seed={seed}",
        f"max_steps={steps}", "trainer.save_steps=100000", *extra,
    ]  # fmt: skip


def evaluate(model_dir: Path, rows_by_task: dict[str, list[dict]]) -> dict[str, float]:
    from mixtral_model import MixtralForCausalLM, load_tokenizer
    from mixtral_tune.evaluate import exact_match

    tokenizer = load_tokenizer()
    if (model_dir / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(model_dir).merge_and_unload()
    else:
        model = MixtralForCausalLM.from_pretrained(model_dir)
    model.eval()
    return {task: exact_match(model, tokenizer, rows)[0] for task, rows in rows_by_task.items()}


def trained_parameters(final: Path, method: str) -> int:
    from safetensors import safe_open

    if method == "lora":
        files = [final / "adapter_model.safetensors"]
        keep = lambda key: True  # noqa: E731
    else:
        files = [final / "model.safetensors"]
        if method == "esft":
            experts = json.loads((final / "esft_selection.json").read_text())["experts"]
            names = {
                f"layers.{la}.block_sparse_moe.experts.{e}." for la, kept in enumerate(experts) for e in kept
            }
            keep = lambda key: any(n in key for n in names)  # noqa: E731
        else:
            keep = lambda key: True  # noqa: E731
    total = 0
    for file in files:
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                if keep(key):
                    total += _numel(handle, key)
    return total


def _numel(handle, key) -> int:
    shape = handle.get_slice(key).get_shape()
    count = 1
    for size in shape:
        count *= size
    return count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--base-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--work", type=Path, default=Path("outputs/esft_tasks"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rng = random.Random(1234)
    data = args.work / "data"
    data.mkdir(parents=True, exist_ok=True)
    seen: set = set()
    for task in TASKS:
        seen = write_task(data / f"{task}_train.jsonl", task, 3000, rng, seen)
        seen = write_task(data / f"{task}_eval.jsonl", task, 150, rng, seen)
    from mixtral_tune.evaluate import read_jsonl

    held_out = {task: read_jsonl(data / f"{task}_eval.jsonl") for task in TASKS}
    rows = []
    for seed in args.seeds:
        root = args.work / f"seed{seed}"
        base = root / "base"
        if not (base / "final").exists():
            run(sft(base, data / "reverse_train.jsonl", seed, args.base_steps, []))
        scores = evaluate(base / "final", held_out)
        rows.append((seed, "base (task A only)", scores, 0, 0.0, "-"))
        selection = root / "esft_selection.json"
        run([
            sys.executable, "-m", "mixtral_tune", "esft-select", "+recipe=tiny/sft",
            f"model.name_or_path={base / 'final'}", f"data.path={data / 'sort_train.jsonl'}", "data.eval_path=null",
            f"output_dir={root / 'select'}", "--threshold", str(args.threshold), "--out", str(selection),
        ])  # fmt: skip
        experts = json.loads(selection.read_text())["experts"]
        for method, (overrides, lr) in METHODS.items():
            extra = [f"model.name_or_path={base / 'final'}", *overrides, f"trainer.learning_rate={lr}"]
            if method == "esft":
                extra.append(f"peft.esft_selection={selection}")
            output = root / method
            seconds = run(sft(output, data / "sort_train.jsonl", seed, args.steps, extra))
            scores = evaluate(output / "final", held_out)
            kept = "/".join(",".join(map(str, layer)) for layer in experts) if method == "esft" else "-"
            rows.append((seed, method, scores, trained_parameters(output / "final", method), seconds, kept))
            print(rows[-1], flush=True)
    lines = [
        f"Base: tiny recipe on task A (reverse) for {args.base_steps} steps; each method then {args.steps} "
        f"steps on task B (sort), lr full/esft {METHODS['full'][1]}, lora {METHODS['lora'][1]}; ESFT by gate "
        f"score, threshold {args.threshold}. Exact match on 150 held-out prompts per task.",
        "",
        "| seed | method | B: sort (learned) | A: reverse (kept) | trained parameters | fine-tune wall s | ESFT experts per layer |",
        "|---|---|---|---|---|---|---|",
    ]
    for seed, method, scores, params, seconds, kept in rows:
        lines.append(
            f"| {seed} | {method} | {scores['sort']:.3f} | {scores['reverse']:.3f} | {params:,} | "
            f"{seconds:.0f} | {kept} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
