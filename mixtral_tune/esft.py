"""Expert-specialized fine-tuning (ESFT; Wang et al., arXiv 2407.01906): tune only the experts a task
routes to.

    mixtral-tune esft-select +recipe=NAME [key=value ...] [--score gate|token] [--threshold P]
                             [--rows N] [--out FILE]
    mixtral-tune sft +recipe=NAME peft=esft peft.esft_selection=FILE              (selected experts, full)
    mixtral-tune sft +recipe=NAME peft=lora peft.targets=experts peft.esft_selection=FILE   (LoRA on them)

Selection runs the base model (the recipe's `model.name_or_path`, or its seeded random init) over the
first N tokenized training rows and scores every expert of every layer on the rows' tokens:

- `gate`: the expert's mean router probability (softmax over all experts), the ESFT paper's average
  gate score;
- `token`: the share of the layer's top-k selections that went to the expert (token selection ratio).

Both sum to 1 over a layer's experts. Per layer the experts are ranked by score (ties: lower index
first) and the smallest prefix whose cumulative score reaches the threshold is kept. The selection
file (JSON) holds the experts per layer, the scores and how they were computed; training copies it
into OUTPUT_DIR/final.

Training with a selection: `peft.method=esft` freezes everything but the selected experts' w1/w2/w3
(saved as a full model: transformers loads it); `peft.method=lora|qlora` with `peft.esft_selection`
puts LoRA on the selected experts' projections only (`peft.targets=experts`), or on them and the
attention projections (`peft.targets=both`). Under expert parallelism only the ranks holding selected
experts have anything of theirs to train, so only they hold expert optimizer state.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

SCORES = ("gate", "token")
SELECTION_FORMAT = "mixtral-tune-esft-selection"


def expert_scores(router_logits_NE: torch.Tensor, top_k: int) -> dict[str, list[float]]:
    """Both ESFT scores of one layer's experts from its router logits over N tokens."""
    probs_NE = torch.softmax(router_logits_NE.float(), dim=-1)
    chosen_NK = torch.topk(probs_NE, top_k, dim=-1).indices
    counts_E = torch.bincount(chosen_NK.reshape(-1), minlength=probs_NE.shape[-1]).double()
    return {
        "gate": probs_NE.double().mean(dim=0).tolist(),
        "token": (counts_E / chosen_NK.numel()).tolist(),
    }


def select(scores_E: list[float], threshold: float) -> list[int]:
    """The smallest set of experts (highest score first, lower index on ties) whose cumulative score
    reaches `threshold` (scores of a layer sum to 1)."""
    order = sorted(range(len(scores_E)), key=lambda e: (-scores_E[e], e))
    kept, total = [], 0.0
    for e in order:
        kept.append(e)
        total += scores_E[e]
        if total >= threshold - 1e-12:
            break
    return sorted(kept)


def position_ids_of(row: dict) -> torch.Tensor:
    """Positions of one tokenized row; a packed row restarts them at each of its sequences."""
    lengths = row.get("seq_lengths") or [len(row["input_ids"])]
    return torch.cat([torch.arange(n) for n in lengths])[None]


@torch.no_grad()
def score_model(model, rows, top_k: int) -> dict[str, list[list[float]]]:
    """Per layer, both scores over every token of `rows` (tokenized training rows)."""
    per_layer_logits: list[list[torch.Tensor]] = []
    device = next(model.parameters()).device
    for row in rows:
        input_ids = torch.tensor(row["input_ids"], device=device)[None]
        out = model(
            input_ids=input_ids, position_ids=position_ids_of(row).to(device), output_router_logits=True
        )
        if not per_layer_logits:
            per_layer_logits = [[] for _ in out.router_logits]
        for layer, logits_NE in enumerate(out.router_logits):
            per_layer_logits[layer].append(logits_NE.float().cpu())
    layers = [expert_scores(torch.cat(logits), top_k) for logits in per_layer_logits]
    return {score: [layer[score] for layer in layers] for score in SCORES}


def selection(scores: dict, score: str, threshold: float, rows: int, tokens: int, model: str) -> dict:
    experts = [select(layer_scores, threshold) for layer_scores in scores[score]]
    return {
        "format": SELECTION_FORMAT,
        "score": score,
        "threshold": threshold,
        "rows": rows,
        "tokens": tokens,
        "model": model,
        "experts": experts,
        "scores": scores,
    }


def format_table(chosen: dict) -> str:
    """One line per layer: the kept experts and every expert's score."""
    num_experts = len(chosen["scores"][chosen["score"]][0])
    kept = sum(len(layer) for layer in chosen["experts"])
    total = num_experts * len(chosen["experts"])
    lines = [
        f"ESFT selection by {chosen['score']} score, threshold {chosen['threshold']}, over {chosen['rows']} "
        f"rows ({chosen['tokens']} tokens): {kept} of {total} experts",
        "layer  kept            " + " ".join(f"e{e:<5}" for e in range(num_experts)),
    ]
    for layer, experts in enumerate(chosen["experts"]):
        scores = chosen["scores"][chosen["score"]][layer]
        marks = " ".join(f"{s:.3f}{'*' if e in experts else ' '}" for e, s in enumerate(scores))
        lines.append(f"{layer:<6} {','.join(map(str, experts)):<15} {marks}")
    return "\n".join(lines)


class SelectionError(ValueError):
    """A selection file that is missing, malformed or does not fit the model: one line."""


def load_selection(path, num_layers: int | None = None, num_experts: int | None = None) -> list[list[int]]:
    """The experts per layer from a selection file, checked against the model's shape when given."""
    try:
        chosen = json.loads(Path(path).read_text())
    except FileNotFoundError as error:
        raise SelectionError(
            f"peft.esft_selection={path} does not exist: run `mixtral-tune esft-select` first"
        ) from error
    except (OSError, json.JSONDecodeError) as error:
        raise SelectionError(f"peft.esft_selection={path} is not a selection file ({error})") from error
    experts = chosen.get("experts") if isinstance(chosen, dict) else None
    if chosen.get("format") != SELECTION_FORMAT or not isinstance(experts, list):
        raise SelectionError(
            f"peft.esft_selection={path} is not a selection written by `mixtral-tune esft-select`"
        )
    if num_layers is not None and len(experts) != num_layers:
        raise SelectionError(
            f"peft.esft_selection={path} selects experts for {len(experts)} layers but the model has "
            f"{num_layers}: select again for this model"
        )
    for layer, kept in enumerate(experts):
        bad = [e for e in kept if not isinstance(e, int) or not 0 <= e < (num_experts or e + 1)]
        if bad:
            raise SelectionError(
                f"peft.esft_selection={path} layer {layer} names experts {bad} outside the model's "
                f"{num_experts}: select again for this model"
            )
    if not any(experts):
        raise SelectionError(f"peft.esft_selection={path} selects no expert: nothing would train")
    return experts


def expert_module_names(experts: list[list[int]]) -> list[tuple[int, int]]:
    return [(layer, e) for layer, kept in enumerate(experts) for e in kept]


def freeze_all_but_selected(model, experts: list[list[int]]) -> int:
    """Everything frozen but the selected experts' weights (those this rank holds); the count of
    trainable values on this rank."""
    model.requires_grad_(False)
    trainable = 0
    for layer, e in expert_module_names(experts):
        block = model.model.layers[layer].block_sparse_moe
        if str(e) in block.experts:  # under expert parallelism a rank holds only its own experts
            block.experts[str(e)].requires_grad_(True)
            trainable += sum(p.numel() for p in block.experts[str(e)].parameters())
    return trainable


def lora_target_regex(experts: list[list[int]], attention: list[str]) -> str:
    """PEFT `target_modules` (a regex, matched in full) for LoRA on the selected experts' w1/w2/w3,
    plus the named attention projections."""
    parts = [
        rf"layers\.{layer}\.block_sparse_moe\.experts\.({'|'.join(map(str, kept))})\.(w1|w2|w3)"
        for layer, kept in enumerate(experts)
        if kept
    ]
    if attention:
        parts.append(rf"layers\.\d+\.self_attn\.({'|'.join(attention)})")
    return rf".*\.({'|'.join(parts)})"


def parse_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="mixtral-tune esft-select",
        description="Score every expert on the recipe's training data and write the ESFT selection.",
        epilog="Other arguments are the recipe and its overrides, as `mixtral-tune sft` takes them.",
    )
    parser.add_argument(
        "--score", choices=SCORES, default="gate", help="gate (mean router probability) or token"
    )
    parser.add_argument("--threshold", type=float, default=0.5, help="cumulative score to reach per layer")
    parser.add_argument("--rows", type=int, default=256, help="training rows to score (first N)")
    parser.add_argument("--out", default=None, help="selection file (default OUTPUT_DIR/esft_selection.json)")
    flags, rest = parser.parse_known_args(argv)
    if not 0.0 < flags.threshold <= 1.0:
        parser.error(f"--threshold={flags.threshold} must be within (0, 1]")
    if flags.rows < 1:
        parser.error(f"--rows={flags.rows} must be at least 1")
    return flags, rest


def main(argv: list[str]) -> str:
    from mixtral_tune import pipeline
    from mixtral_tune.config import ConfigError, load_config
    from mixtral_tune.data import prepare_sft_data
    from mixtral_tune.training.model_factory import (
        base_model_path,
        expert_parallel_layout,
        fit_vocabulary,
        load_model,
    )

    flags, overrides = parse_flags(argv)
    try:
        cfg = load_config("sft", overrides)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        pipeline.fail(error)
    tokenizer = pipeline.tokenizer_for(cfg)
    data = pipeline.load_data_or_exit(prepare_sft_data, cfg.data, tokenizer, cfg.trainer.seed)
    pipeline.prepare_base_checkpoint(cfg, tokenizer)
    model = load_model(cfg, base_model_path(cfg), expert_parallel_layout(cfg)).eval()
    fit_vocabulary(model, tokenizer)  # a chat template's added tokens
    rows = data.train.select(range(min(flags.rows, len(data.train))))
    scores = score_model(model, rows, model.config.num_experts_per_tok)
    tokens = sum(len(row["input_ids"]) for row in rows)
    chosen = selection(scores, flags.score, flags.threshold, len(rows), tokens, base_model_path(cfg))
    out = Path(flags.out or Path(cfg.output_dir) / "esft_selection.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text(json.dumps(chosen, indent=1))
    partial.replace(out)
    print(format_table(chosen))
    trained = sum(
        p.numel()
        for layer, e in expert_module_names(chosen["experts"])
        for p in model.model.layers[layer].block_sparse_moe.experts[str(e)].parameters()
    )
    total = sum(p.numel() for p in model.parameters())
    print(f"peft=esft trains {trained:,} of {total:,} parameters ({trained / total:.1%})")
    print(f"selection written to {out}: train with peft=esft peft.esft_selection={out}; memory: "
          f"python -m mixtral_tune.estimate {' '.join(overrides)} peft=esft peft.esft_selection={out}")  # fmt: skip
    return str(out)


if __name__ == "__main__":
    main(sys.argv[1:])
