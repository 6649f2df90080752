"""Expert-specialized fine-tuning: the selection held to scores computed here from transformers'
Mixtral router logits on the same weights and tokens, and training that changes only the selected
experts (full weights) or puts LoRA on them only."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pipeline_runs import REPO, SFT, run_env, run_pipeline
from safetensors.torch import load_file

from mixtral_model import MixtralConfig, MixtralForCausalLM
from mixtral_tune.esft import lora_target_regex, score_model, select

TINY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
)  # fmt: skip


def test_select_keeps_the_smallest_prefix_reaching_the_threshold():
    # hand-computed: ranked 1 (0.4), 2 (0.3), 3 (0.2), 0 (0.1); cumulative 0.4, 0.7, 0.9, 1.0
    scores = [0.1, 0.4, 0.3, 0.2]
    assert select(scores, 0.4) == [1]
    assert select(scores, 0.41) == [1, 2]
    assert select(scores, 0.7) == [1, 2]
    assert select(scores, 0.71) == [1, 2, 3]
    assert select(scores, 1.0) == [0, 1, 2, 3]
    assert select([0.25, 0.25, 0.25, 0.25], 0.5) == [0, 1]  # ties: lower index first


def test_scores_equal_transformers_router_on_the_same_weights(tmp_path):
    from transformers import MixtralForCausalLM as HFMixtral

    torch.manual_seed(0)
    ours = MixtralForCausalLM(MixtralConfig(**TINY)).eval()
    ours.save_pretrained(tmp_path)
    theirs = HFMixtral.from_pretrained(tmp_path).eval()
    rows = [{"input_ids": [int(t) for t in torch.randint(0, 64, (n,))]} for n in (7, 12, 5)]
    rows.append({"input_ids": [int(t) for t in torch.randint(0, 64, (9,))], "seq_lengths": [4, 5]})

    got = score_model(ours, rows, top_k=2)

    # Independently: transformers' router logits per row (a packed row as its two sequences), softmax,
    # top-2 counts, means over all tokens.
    logits = [[], []]
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor(row["input_ids"])
            for part in ids.split(row.get("seq_lengths", [len(ids)])):
                out = theirs(input_ids=part[None], output_router_logits=True)
                for layer, layer_logits in enumerate(out.router_logits):
                    logits[layer].append(layer_logits)
    for layer in range(2):
        probs = torch.cat(logits[layer]).softmax(-1).double()
        top2 = probs.topk(2, dim=-1).indices
        token = torch.tensor([(top2 == e).sum().item() for e in range(4)], dtype=torch.float64) / top2.numel()
        torch.testing.assert_close(torch.tensor(got["gate"][layer], dtype=torch.float64), probs.mean(0),
                                   atol=1e-6, rtol=0)  # fmt: skip
        torch.testing.assert_close(torch.tensor(got["token"][layer], dtype=torch.float64), token)
        assert sum(got["gate"][layer]) == pytest.approx(1.0)


def test_lora_regex_names_exactly_the_selected_experts():
    import re

    pattern = re.compile(lora_target_regex([[1, 2], [0]], ["q_proj"]))
    names = [f"model.layers.{la}.block_sparse_moe.experts.{e}.{w}" for la in (0, 1) for e in range(4)
             for w in ("w1", "w2", "w3")]  # fmt: skip
    matched = {n for n in names if pattern.fullmatch(n)}
    assert matched == {
        f"model.layers.0.block_sparse_moe.experts.{e}.{w}" for e in (1, 2) for w in ("w1", "w2", "w3")
    } | {f"model.layers.1.block_sparse_moe.experts.0.{w}" for w in ("w1", "w2", "w3")}
    assert pattern.fullmatch("model.layers.1.self_attn.q_proj")
    assert not pattern.fullmatch("model.layers.1.self_attn.k_proj")
    assert not pattern.fullmatch("model.layers.0.block_sparse_moe.gate")


def esft_select(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mixtral_tune", "esft-select", *SFT, f"output_dir={out}", *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=run_env(), cwd=REPO)


def test_esft_trains_only_the_selected_experts(tmp_path):
    out = tmp_path / "run"
    selected = esft_select(out, "--rows", "16", "--threshold", "0.3")
    assert selected.returncode == 0, selected.stderr[-3000:]
    selection = json.loads((out / "esft_selection.json").read_text())
    assert "ESFT selection by gate score, threshold 0.3, over 16 rows" in selected.stdout
    experts = selection["experts"]
    kept = sum(len(layer) for layer in experts)  # small model of pipeline_runs: hidden 32, intermediate 64
    assert f"peft=esft trains {kept * 3 * 32 * 64:,} of " in selected.stdout
    run_pipeline("sft", [*SFT, f"output_dir={out}", "max_steps=2", "peft=esft",
                         f"peft.esft_selection={out / 'esft_selection.json'}"])  # fmt: skip
    base = load_file(out / "base" / "model.safetensors")
    final = load_file(out / "final" / "model.safetensors")
    assert json.loads((out / "final" / "esft_selection.json").read_text())["experts"] == experts
    changed = {key for key in base if not torch.equal(base[key], final[key])}
    expected = {
        f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"
        for layer, kept in enumerate(experts)
        for e in kept
        for w in ("w1", "w2", "w3")
    }
    assert changed == expected


def test_esft_without_a_selection_is_one_line(tmp_path):
    result = run_pipeline("sft", [*SFT, f"output_dir={tmp_path}", "peft=esft"], check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: peft=esft needs peft.esft_selection=FILE: write one with `mixtral-tune esft-select +recipe=...`"
    ]
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"format": "mixtral-tune-esft-selection", "experts": [[0], [1], [2]]}))
    result = run_pipeline(
        "sft", [*SFT, f"output_dir={tmp_path}", "peft=esft", f"peft.esft_selection={wrong}"], check=False
    )
    assert result.returncode == 2
    assert "selects experts for 3 layers but the model has 2" in result.stderr
    assert "Traceback" not in result.stderr


def test_estimate_counts_the_selected_experts_as_trained():
    """The estimator's ESFT layout trains the selected experts' values (counted here on a built model's
    parameters) and keeps the rest frozen, on one rank and over 2 expert-parallel ranks."""
    from mixtral_tune.estimate import estimate_layout

    config = MixtralConfig(**TINY)
    model = MixtralForCausalLM(config)
    experts = [[0, 3], [1]]
    selected = sum(
        p.numel()
        for layer, kept in enumerate(experts)
        for e in kept
        for p in model.model.layers[layer].block_sparse_moe.experts[str(e)].parameters()
    )
    expert_values = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    dense_values = sum(p.numel() for p in model.parameters()) - expert_values
    for ep in (1, 2):
        got = estimate_layout(config, world_size=2, expert_parallel_size=ep, zero_stage=0, peft="esft",
                              dtype="float32", esft_experts=3, seq_len=8)  # fmt: skip
        assert got.memory["trainable_weights"] == selected * 4 // ep
        assert got.memory["optimizer_states"] == selected * 8 // ep  # fp32 weights: AdamW's two moments
        held = got.memory["frozen_base_weights"] + got.memory["trainable_weights"]
        assert held == (dense_values + expert_values // ep) * 4
