"""The demo: SFT then DPO of a tiny Mixtral on CPU, with held-out evaluation before and after each
stage, a wandb offline run, the outputs saved, and one sample generation.

    ./launch.sh demo            (or: mixtral-tune demo [--output-dir outputs/demo] [--seed 42])

Task (data/make_demo_data.py): reverse a short letter string, e.g. "Reverse: c a f e" -> "e f a c".
SFT teaches the format and the task (exact match on 150 held-out prompts); DPO then prefers correct
reversals over plausible mistakes (held-out preference accuracy and reward margin vs the SFT model).
The demo owns its output directory and starts it afresh on every run.
"""

import argparse
import os
import shutil
import time
from pathlib import Path

import torch
import transformers

from mixtral_model import MixtralForCausalLM, load_tokenizer
from mixtral_tune import dpo, sft
from mixtral_tune.config import load_config
from mixtral_tune.evaluate import exact_match, preference_metrics, read_jsonl
from mixtral_tune.run_dir import require_complete_final
from mixtral_tune.shipped import DATA_DIR

SFT_EVAL = DATA_DIR / "sft_eval.jsonl"
DPO_EVAL = DATA_DIR / "dpo_eval.jsonl"


def evaluate(model_dir: Path, reference_dir: Path | None, tokenizer, beta: float) -> dict[str, float]:
    for key, directory in (("model", model_dir), ("reference", reference_dir)):
        if directory is not None:
            require_complete_final(key, directory)  # a run cut short while saving it: say so, read nothing
    model = MixtralForCausalLM.from_pretrained(model_dir).eval()
    reference = MixtralForCausalLM.from_pretrained(reference_dir).eval() if reference_dir else None
    accuracy, samples = exact_match(model, tokenizer, read_jsonl(SFT_EVAL))
    metrics = {"exact_match": accuracy, "sample": samples[0]}
    metrics.update(preference_metrics(model, reference, tokenizer, read_jsonl(DPO_EVAL), beta))
    return metrics


def transformers_agreement(model_dir: Path, tokenizer) -> float:
    """Max |logits| difference between our model and transformers' Mixtral on the same checkpoint."""
    ids = tokenizer("Reverse: c a f e", return_tensors="pt").input_ids
    with torch.no_grad():
        ours = MixtralForCausalLM.from_pretrained(model_dir)(ids).logits
        theirs = transformers.MixtralForCausalLM.from_pretrained(model_dir)(ids).logits
    return (ours - theirs).abs().max().item()


def print_table(rows: list[tuple[str, dict]]) -> None:
    def cell(metrics, key):
        return f"{metrics[key]:.3f}" if key in metrics else "-"

    print(
        "\n| stage | exact match (150 held-out prompts) | prefers chosen (150 held-out pairs) "
        "| DPO reward accuracy | DPO reward margin |"
    )
    print("|---|---|---|---|---|")
    for name, m in rows:
        print(
            f"| {name} | {cell(m, 'exact_match')} | {cell(m, 'prefers_chosen')} "
            f"| {cell(m, 'reward_accuracy')} | {cell(m, 'reward_margin')} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mixtral-tune demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--seed", type=int, default=None, help="trainer.seed of both stages (default: the recipes')")
    args = parser.parse_args(argv)
    seed = [] if args.seed is None else [f"trainer.seed={args.seed}"]
    root = args.output_dir
    shutil.rmtree(root, ignore_errors=True)
    os.environ.setdefault("WANDB_MODE", "offline")
    started = time.perf_counter()
    tokenizer = load_tokenizer()
    beta = load_config("dpo", ["+recipe=tiny/dpo"]).trainer.beta

    print("== stage 1: SFT (recipes/tiny/sft.yaml) ==", flush=True)
    # Evaluation runs after each stage (below), so the trainers' periodic evaluation is off.
    sft.main(
        [
            "+recipe=tiny/sft",
            f"output_dir={root / 'sft'}",
            "trainer.report_to=wandb",
            "trainer.eval_steps=null",
            *seed,
        ]
    )
    print("== stage 2: DPO (recipes/tiny/dpo.yaml) from the SFT model ==", flush=True)
    dpo.main([
        "+recipe=tiny/dpo", f"model.name_or_path={root / 'sft' / 'final'}",
        f"output_dir={root / 'dpo'}", "trainer.report_to=wandb", "trainer.eval_steps=null", *seed,
    ])  # fmt: skip
    training_seconds = time.perf_counter() - started

    print("== held-out evaluation ==", flush=True)
    base, sft_final, dpo_final = root / "sft" / "base", root / "sft" / "final", root / "dpo" / "final"
    results = [
        ("random init (before SFT)", evaluate(base, None, tokenizer, beta)),
        ("after SFT (before DPO)", evaluate(sft_final, None, tokenizer, beta)),
        ("after DPO (reference: SFT model)", evaluate(dpo_final, sft_final, tokenizer, beta)),
    ]
    print_table(results)
    prompt, answer, reference = results[-1][1]["sample"]
    print(f"\nsample generation after DPO: {prompt!r} -> {answer!r} (expected {reference!r})")
    print(
        f"native model vs transformers on the DPO checkpoint: max |Δlogits| = "
        f"{transformers_agreement(dpo_final, tokenizer):.1e}"
    )
    print(f"training wall time: {training_seconds:.0f}s; total: {time.perf_counter() - started:.0f}s")
    print(f"outputs: {sft_final}, {dpo_final}; wandb offline runs under {root}/*/wandb")


if __name__ == "__main__":
    main()
