"""mixtral_tune/estimate.py held to real models: its parameter counts to ours, transformers' and PEFT's built
models (Mixtral-8x7B on the meta device: 46,702,792,704), its per-rank counts and token bytes under
expert parallelism to what 2 gloo ranks of the pipelines' model hold and hand to all_to_all_single, its
QLoRA base bytes to a built QLoRA model (tests/test_qlora_memory.py), its per-layer working set to the bytes
tiny models built as the pipelines build them save for backward; and every recipe header's estimate
table to the function, recomputed here so the headers cannot go stale.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers
from distributed.estimate_ep import MICRO_BATCH, SEQ_LEN, overrides
from mixtral_reference import MIXTRAL_8X7B_SHAPE as MIXTRAL_8X7B
from pipeline_runs import REPO, free_port

from mixtral_model import MixtralConfig, MixtralForCausalLM
from mixtral_tune.config import LORA_TARGET_MODULES, compose, recipe_files
from mixtral_tune.estimate import (
    GIB,
    checkpointed_layers,
    estimate_layout,
    estimate_run,
    layout_of,
    lora_parameter_counts,
    parameter_counts,
    qlora_account,
    row_overrides,
)

TINY_SHAPES = [  # GQA 1/2/4, 4 or 8 experts, top-1/2/3, an explicit head_dim
    dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=4, num_local_experts=4,
         num_experts_per_tok=2, num_hidden_layers=2),
    dict(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=2, num_local_experts=8,
         num_experts_per_tok=3, num_hidden_layers=3),
    dict(hidden_size=48, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
         num_experts_per_tok=1, num_hidden_layers=1, head_dim=16),
]  # fmt: skip


def tiny(**shape) -> MixtralConfig:
    return MixtralConfig(vocab_size=128, max_position_embeddings=64, **shape)


def part_of(name: str) -> str:
    for needle, part in (("experts.", "experts"), ("block_sparse_moe.gate", "router"), ("self_attn", "attention"),
                         ("embed_tokens", "embed_tokens"), ("lm_head", "lm_head"), ("norm", "norms")):  # fmt: skip
        if needle in name:
            return part
    raise AssertionError(f"unclassified parameter {name}")


def built_counts(model) -> dict[str, int]:
    counts = dict.fromkeys(("embed_tokens", "attention", "norms", "router", "experts", "lm_head"), 0)
    for name, param in model.named_parameters():
        counts[part_of(name)] += param.numel()
    return counts


@pytest.mark.parametrize("shape", TINY_SHAPES, ids=["gqa1", "gqa4-top3", "head_dim"])
def test_parameter_counts_equal_our_built_model_part_by_part(shape):
    config = tiny(**shape)
    assert parameter_counts(config) == built_counts(MixtralForCausalLM(config))


def test_mixtral_8x7b_parameter_count_equals_ours_and_transformers_on_meta():
    with torch.device("meta"):
        ours = MixtralForCausalLM(MixtralConfig(**MIXTRAL_8X7B))
        theirs = transformers.MixtralForCausalLM(transformers.MixtralConfig(**MIXTRAL_8X7B))
    counts = parameter_counts(MixtralConfig(**MIXTRAL_8X7B))
    assert counts == built_counts(ours)
    assert sum(p.numel() for p in theirs.parameters()) == sum(counts.values()) == 46_702_792_704
    # from transformers' own config object, and from the pipelines' model.architecture
    assert parameter_counts(transformers.MixtralConfig(**MIXTRAL_8X7B)) == counts
    assert parameter_counts(compose("sft", ["+recipe=mixtral-8x7b/sft_lora_ep"]).model.architecture) == counts


@pytest.mark.parametrize("targets", list(LORA_TARGET_MODULES))
def test_lora_parameter_counts_equal_peft(targets):
    config = tiny(**TINY_SHAPES[1])
    model = peft.get_peft_model(
        MixtralForCausalLM(config), peft.LoraConfig(r=4, target_modules=LORA_TARGET_MODULES[targets])
    )
    found = {"attention": 0, "experts": 0}
    for name, param in model.named_parameters():
        if "lora_" in name:
            found[part_of(name)] += param.numel()
    assert found == lora_parameter_counts(config, 4, targets)
    assert sum(found.values()) == model.get_nb_trainable_parameters()[0]


def test_qlora_base_bytes_are_the_qlora_account_on_mixtral_8x7b():
    """estimate_layout's QLoRA base is qlora_account's NF4 weights, constants and unquantized weights."""
    config = MixtralConfig(**MIXTRAL_8X7B)
    estimate = estimate_layout(config, world_size=1, zero_stage=0, peft="qlora")
    account = qlora_account(config, r=16, targets="both")
    base = account["nf4_weights"] + account["nf4_constants"] + account["unquantized"]
    assert estimate.memory["frozen_base_weights"] == base


@pytest.mark.distributed
def test_expert_parallel_rank_holds_and_sends_what_the_estimate_says(tmp_path):
    """2 gloo ranks, EP=2, LoRA (fp32): the parameters each rank holds (dense and its experts, base and
    LoRA) and their bytes; the token bytes handed to all_to_all_single in one forward + backward with
    activation checkpointing (dispatch and combine, forward, recomputation and backward)."""
    out = tmp_path / "report.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", str(REPO / "tests" / "distributed" / "estimate_ep.py"),
        str(tmp_path / "run"), str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = json.loads(out.read_text())

    cfg = compose("sft", overrides(tmp_path / "run"))
    config, n = cfg.model.architecture, cfg.model.expert_parallel_size
    counts, lora = parameter_counts(config), lora_parameter_counts(config, cfg.peft.r, cfg.peft.targets)
    layout = layout_of(
        cfg, world_size=2, micro_batch=MICRO_BATCH, seq_len=SEQ_LEN, activation_checkpointing=True
    )
    estimate = estimate_layout(config, **layout)
    for held in ranks.values():
        assert held["expert_base"] == counts["experts"] // n
        assert held["dense_base"] == sum(counts.values()) - counts["experts"]
        assert (held["dense_lora"], held["expert_lora"]) == (lora["attention"], lora["experts"] // n)
        assert held["frozen_bytes"] == estimate.memory["frozen_base_weights"]
        assert held["trainable_bytes"] == estimate.memory["trainable_weights"]
        assert held["calls"] == config.num_hidden_layers * 6
    # A rank dispatches its T*k rows and returns the rows its experts got: over the EP group the buffers
    # average T*k rows a call. The estimate counts the (n-1)/n of them that leave a rank (uniform routing).
    mean_buffer = sum(held["buffer_bytes"] for held in ranks.values()) / n
    assert estimate.communication["expert_token_all_to_all"] == pytest.approx(mean_buffer * (n - 1) / n)
    off_rank = sum(held["off_rank_bytes"] for held in ranks.values()) / sum(
        held["buffer_bytes"] for held in ranks.values()
    )
    print(f"measured off-rank fraction {off_rank:.3f}, assumed {(n - 1) / n:.3f}")


# ---- recipe headers --------------------------------------------------------------------------------------

ROW = re.compile(r"^#   (?P<label>\S.*?)\s{2,}(?P<cells>\d[\d.]* GiB(?: \| +\d[\d.]* GiB)*)$")


def header_rows(path) -> list[tuple[str, list[float]]]:
    rows = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        match = ROW.match(line)
        if match:
            cells = [float(cell.split()[0]) for cell in match["cells"].split("|")]
            rows.append((match["label"], cells))
    return rows


ESTIMATED = sorted(name for name, path in recipe_files().items() if header_rows(path))


def test_every_expert_parallel_recipe_states_its_estimate_beside_a_run_without_it():
    for name in recipe_files():
        cfg = compose("sft", [f"+recipe={name}"])
        if cfg.model.expert_parallel_size > 1:
            assert name in ESTIMATED, f"{name}: no estimate table in its header"
    assert {"mixtral-8x7b/sft_full_ep", "mixtral-8x7b/sft_lora_ep", "mixtral-8x7b/dpo_lora_ep"} <= set(
        ESTIMATED
    )
    for name in ESTIMATED:
        labels = [label for label, _ in header_rows(recipe_files()[name])]
        assert labels[0] == "this recipe"
        baselines = [
            estimate_run(row_overrides(label, [f"+recipe={name}"]), 8).layout for label in labels[1:]
        ]
        assert any(b["expert_parallel_size"] == 1 and b["zero_stage"] == 3 for b in baselines), name


@pytest.mark.parametrize("recipe", ESTIMATED)
def test_recipe_header_estimates_are_the_functions(recipe):
    """Every number of the header's table, recomputed from the recipe (on the 8 GPUs it names)."""
    for label, cells in header_rows(recipe_files()[recipe]):
        estimate = estimate_run(row_overrides(label, [f"+recipe={recipe}"]), world_size=8)
        assert cells == list(estimate.summary().values()), (recipe, label, estimate.summary())


def test_expert_parallelism_moves_tokens_instead_of_weights_for_lora_on_mixtral_8x7b():
    """The comparison the recipes make, in the function's own terms: same run, EP=8 against EP=1 under
    ZeRO-3; the experts are no longer gathered (only the dense part is), tokens are exchanged instead."""
    config = MixtralConfig(**MIXTRAL_8X7B)
    common = dict(world_size=8, zero_stage=3, peft="lora", micro_batch=1, seq_len=4096, grad_accum=1)
    ep, zero3 = estimate_layout(config, expert_parallel_size=8, **common), estimate_layout(config, **common)
    counts = parameter_counts(config)
    dense = sum(counts.values()) - counts["experts"]
    lora = lora_parameter_counts(config, 16, "both")
    gathers = 2  # forward, backward
    assert zero3.communication["zero3_weight_all_gather"] == int(
        gathers * 7 / 8 * 2 * (sum(counts.values()) + sum(lora.values()))
    )
    assert ep.communication["zero3_weight_all_gather"] == int(
        gathers * 7 / 8 * 2 * (dense + lora["attention"])
    )
    tokens_per_exchange = 4096 * 2 * 4096 * 2  # tokens x top-k x hidden x bf16
    assert ep.communication["expert_token_all_to_all"] == 32 * 6 * tokens_per_exchange * 7 / 8
    assert ep.communication_total < zero3.communication_total / 3
    assert ep.memory["frozen_base_weights"] == zero3.memory["frozen_base_weights"]  # 1/8 of the weights each
    assert zero3.memory["frozen_base_weights"] / GIB == pytest.approx(46_702_792_704 * 2 / 8 / GIB)


# ---- ZeRO-3 traffic, counted in the pipeline --------------------------------------------------------------


def counted_run(tmp_path, name: str, run: list[str], steps: int) -> dict:
    """Bytes rank 0 sent by collective in a 2-rank SFT run of `steps` steps (tests/distributed/count_collectives.py)."""
    prefix = tmp_path / f"{name}_{steps}"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", str(REPO / "tests" / "distributed" / "count_collectives.py"), str(prefix),
        str(REPO / "train" / "sft.py"), *run, f"max_steps={steps}", f"output_dir={tmp_path / f'run_{name}_{steps}'}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "offline"}  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(Path(f"{prefix}.rank0.json").read_text())


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("expert_parallel_size", [1, 2])
def test_zero3_weight_gathers_and_gradient_reduce_scatters_are_what_the_estimate_says(
    tmp_path, expert_parallel_size
):
    """Full SFT under ZeRO-3 on 2 gloo ranks: the bytes rank 0 hands to all-gather and reduce-scatter in a
    steady step (3 steps minus 1 step, halved: start-up, the first gathers and the saves cancel). With
    stage3_max_reuse_distance=0 DeepSpeed re-gathers for the backward, as it must for Mixtral-8x7B, whose
    layers are far more than the default 1e9 values apart. At EP=2 the experts are never gathered."""
    run = [
        "+recipe=tiny/sft", "deepspeed=zero3", f"model.expert_parallel_size={expert_parallel_size}",
        "trainer.report_to=none", "trainer.eval_steps=null", "data.eval_path=null",
        "model.architecture.hidden_size=32", "model.architecture.intermediate_size=64",
        "model.architecture.num_attention_heads=4", "model.architecture.num_key_value_heads=2",
        "deepspeed.zero_optimization.stage3_max_reuse_distance=0",
    ]  # fmt: skip
    name = f"ep{expert_parallel_size}"
    one, three = counted_run(tmp_path, name, run, 1), counted_run(tmp_path, name, run, 3)
    per_step = {kind: (three[kind] - one.get(kind, 0)) / 2 for kind in three}
    cfg = compose("sft", run)
    estimate = estimate_layout(cfg.model.architecture, **layout_of(cfg, world_size=2))
    print(f"EP={expert_parallel_size} per step: measured {per_step}, estimated {estimate.communication}")
    assert per_step["reduce_scatter"] == pytest.approx(estimate.communication["gradient_reduce"], rel=1e-3)
    # the norms and routers (<= 10 x hidden values) stay resident, and the last block may be kept for its
    # backward: within 1% on this 2-layer model
    assert per_step["all_gather"] == pytest.approx(
        estimate.communication["zero3_weight_all_gather"], rel=1e-2
    )


@pytest.mark.parametrize("every", [1, 2, 3, 5, 6])
def test_checkpointed_layers_are_those_transformers_every_n_layers_checkpoints(every):
    model = MixtralForCausalLM(tiny(**{**TINY_SHAPES[0], "num_hidden_layers": 5}))
    model.activation_checkpointing_enable(every_n_layers=every)
    flagged = sum(bool(layer.gradient_checkpointing) for layer in model.model.layers)
    assert checkpointed_layers(5, every) == flagged


def test_a_recipe_with_every_n_layers_is_estimated_with_that_many_checkpointed_layers():
    recipe = ["+recipe=mixtral-8x7b/sft_qlora"]
    cfg = compose("sft", [*recipe, "+trainer.activation_checkpointing_kwargs={every_n_layers: 2}"])
    halves = estimate_layout(cfg.model.architecture, **layout_of(cfg, world_size=1))
    every = estimate_run(recipe, world_size=1)
    assert (halves.layout["checkpoint_every"], halves.layout["checkpointed_layers"]) == (2, 16)
    assert (every.layout["checkpoint_every"], every.layout["checkpointed_layers"]) == (1, 32)
    # 16 layers keep their working set instead of their input: the activations grow, nothing else
    grown = {k for k in every.memory if halves.memory[k] != every.memory[k]}
    assert grown == {"activations"} and halves.memory["activations"] > every.memory["activations"]


# ---- the per-layer working set, held to what a tiny model built as the pipelines build it saves ----------

LAYER_SHAPES = {  # GQA 2 / 2 / 1, top-2 / 3 / 1, an explicit head_dim (heads x head_dim != hidden)
    "A": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
              num_local_experts=4, num_experts_per_tok=2),
    "B": dict(hidden_size=96, intermediate_size=160, num_attention_heads=6, num_key_value_heads=3, head_dim=16,
              num_local_experts=8, num_experts_per_tok=3),
    "C": dict(hidden_size=64, intermediate_size=112, num_attention_heads=4, num_key_value_heads=4, head_dim=32,
              num_local_experts=4, num_experts_per_tok=1),
}  # fmt: skip
LAYER_CASES = [  # shape, tokens, peft, targets, dtype, dropout, attention
    ("A", 37, "qlora", "both", "bfloat16", 0.0, "sdpa"),
    ("B", 29, "qlora", "both", "bfloat16", 0.1, "sdpa"),
    ("C", 23, "qlora", "both", "bfloat16", 0.0, "eager"),
    ("B", 31, "lora", "both", "bfloat16", 0.05, "eager"),
    ("A", 19, "lora", "attention", "bfloat16", 0.0, "sdpa"),
    ("A", 41, "lora", "experts", "float32", 0.1, "sdpa"),
    ("A", 27, "lora", "both", "float32", 0.0, "eager"),
    ("C", 21, "lora", "both", "float32", 0.0, "sdpa"),
    ("B", 33, "none", "both", "bfloat16", 0.0, "sdpa"),
    ("C", 17, "none", "both", "float32", 0.0, "eager"),
]


def factory_model(tmp_path, config: MixtralConfig, peft_method, targets, dtype, dropout, attention):
    """A model as mixtral_tune/training/model_factory.py builds it (load_model + apply_peft)."""
    from omegaconf import OmegaConf

    from mixtral_tune.training.model_factory import apply_peft, load_model

    cfg = OmegaConf.create({
        "model": {"dtype": dtype, "attn_implementation": attention, "router_aux_loss_coef": 0.02,
                  "router_jitter_noise": 0.0, "router_z_loss_coef": 0.0, "expert_parallel_size": 1},
        "peft": {"method": peft_method, "r": 8, "alpha": 16, "dropout": dropout, "targets": targets,
                 "train_router": False, "esft_selection": None,
                 "quant": {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16",
                           "quant_storage": "bfloat16"}},
    })  # fmt: skip
    MixtralForCausalLM(config).save_pretrained(tmp_path)
    model = apply_peft(load_model(cfg, str(tmp_path)), cfg, gradient_checkpointing=False)
    return model.train()


def balanced_routing(gate, args, logits_NE):
    """The router's logits replaced (in the graph, saving nothing more) by ones that send token t to
    experts t*k, ..., t*k + k-1 (mod E): every expert gets rows. A tiny random model routes most tokens to
    one or two experts, and an expert given none keeps (under per_expert, with dropout on CPU) a 0-row
    view of the sorted rows, and with it their whole storage."""
    n, e = logits_NE.shape
    k = gate.top_k
    experts_NK = (torch.arange(n)[:, None] * k + torch.arange(k)[None]) % e
    target = torch.zeros(n, e).scatter_(1, experts_NK, 10.0)
    return logits_NE * 0 + target.to(logits_NE.dtype)


@pytest.mark.parametrize("backend", ["per_expert", "grouped_loop"])
@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: "-".join(map(str, c)))
def test_layer_work_equals_the_bytes_a_layer_saves_for_backward(tmp_path, case, backend):
    """estimate.layer_work's parts equal the bytes the last decoder layer of a 3-layer model saves for
    backward (its input takes gradients; the RoPE tables, shared by the layers, were saved by an earlier
    one), counted with saved-tensor hooks (checkpointing off), under
    autocast for bf16 as the HF Trainer runs, under each expert backend."""
    from mixtral_compat.torch import cpu_has_native_bf16
    from mixtral_model.moe import SparseMoeBlock
    from mixtral_tune.estimate import Shape, layer_work
    from mixtral_tune.memory_measure import layer_parts, saved_bytes_by_module

    shape, tokens, method, targets, dtype, dropout, attention = case
    if backend == "grouped_loop" and dtype == "bfloat16" and not cpu_has_native_bf16():
        pytest.skip("without native bf16 the expert loop runs its per-projection path (grouped_experts.py)")
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=96, num_hidden_layers=3, **LAYER_SHAPES[shape])
    model = factory_model(tmp_path, config, method, targets, dtype, dropout, attention)
    for block in model.modules():
        if isinstance(block, SparseMoeBlock):
            block.expert_backend = backend
            block.gate.top_k = block.top_k
            block.gate.register_forward_hook(balanced_routing)
    ids = torch.randint(0, config.vocab_size, (1, tokens))
    with (
        saved_bytes_by_module(model, layer_parts(model)) as saved,
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"),
    ):
        model(input_ids=ids, labels=ids).loss.backward()
    measured = {
        part: saved.get(f"layer2.{part}", 0)
        for part in ("input_norm", "attention", "post_attention_norm", "moe")
    }
    expected = layer_work(
        Shape.of(config), tokens, peft=method, lora_r=8, lora_targets=targets, lora_dropout=dropout,
        dtype=dtype, attention=attention, device="cpu", expert_backend=backend,
    )  # fmt: skip
    assert saved.get("layer2", 0) == 0  # the residual additions keep nothing
    assert measured == {part: expected[part] for part in measured}
    assert expected["dispatch_buffers"] == 0
