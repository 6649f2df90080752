"""DeepSpeed wiring (`mixtral_parallel/deepspeed_moe.py`): the gradient rule under ZeRO 0-3, with and without
expert parallelism, on gloo ranks on CPU.

Each distributed test launches `torchrun` on a worker in tests/distributed/ (a free port, a timeout, so
a hang fails instead of blocking) that trains the tiny model for 3 optimizer steps (fp32, gradient
clipping at 1.0 as DeepSpeed defaults to) and compares every parameter with a single-process reference
that steps on the mean of the ranks' losses. SGD keeps gradient scale visible (Adam would hide a wrong
factor on the expert gradients); "skewed" runs make rank 1 route every token to experts 0 and 1, and
"idle experts skipped" runs never call an expert that got no tokens, as an implementation free to do
so would. Negative controls show the comparison catches a wrong rule and a ZeRO-3 collective mismatch.
"""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers
from deepspeed.utils.z3_leaf_module import z3_leaf_module
from mixtral_reference import tiny_config
from pipeline_runs import free_port, run_captured
from safetensors.torch import load_file

from mixtral_model import MixtralConfig, MixtralForCausalLM
from mixtral_model.moe import SparseMoeBlock
from mixtral_parallel.deepspeed_moe import (
    check_parallel_combination,
    check_zero_config_for_moe,
    mark_expert_parameters,
    moe_optimizer,
    moe_param_groups,
    prepare_for_deepspeed,
    supported_combinations,
)

WORKERS = Path(__file__).parent / "distributed"
REPO = Path(__file__).parents[1]
TIMEOUT_S = 240
SGD_TOL = 1e-6
ADAMW_TOL = 5e-5
SKEWED = ["--skew-rank", "1", "--skip-idle-experts"]


def launch(
    worker: str, args: list[str], nproc: int = 2, timeout: int = TIMEOUT_S
) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(WORKERS / worker), *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return run_captured(command, timeout, env=env, cwd=REPO)


def run_parity(tmp_path, worker: str, args: list[str], nproc: int = 2) -> tuple[dict, str]:
    out = tmp_path / "result.json"
    proc = launch(worker, [*args, "--out", str(out)], nproc)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return json.loads(out.read_text()), output


def assert_matches_reference(result: dict, tol: float) -> None:
    print(
        f"max |DeepSpeed - reference| = {result['max_abs_diff']:.2e} (relative {result['max_rel_diff']:.2e})"
    )
    assert result["max_abs_diff"] <= tol, (
        f"{result['worst_param']}: max |DeepSpeed - reference| = {result['max_abs_diff']:.3e} > {tol}"
    )
    assert result["replica_spread"] == 0.0, "ranks disagree on a parameter they share"


def assert_experts_partitioned_within_their_group(result: dict, nproc: int) -> None:
    """ZeRO-3 partitions (gathers, reduce-scatters) an expert only over the ranks holding it (EP=2)."""
    for rank, ranks in enumerate(result["zero3_partition_ranks"]):
        assert ranks["expert"] == list(range(rank % 2, nproc, 2))
        assert ranks["dense"] == list(range(nproc))


PARITY = [
    pytest.param(["--zero-stage", "2"], 2, id="zero2"),
    pytest.param(["--zero-stage", "3", *SKEWED], 2, id="zero3-skewed"),
    pytest.param(["--zero-stage", "3", "--expert-backend", "grouped_loop", *SKEWED], 2, id="zero3-grouped"),
    pytest.param(["--zero-stage", "2", "--expert-parallel-size", "2", "--skew-rank", "1"], 2, id="zero2-ep2"),
    pytest.param(["--zero-stage", "3", "--expert-parallel-size", "2", *SKEWED], 2, id="zero3-ep2-skewed"),
    pytest.param(["--zero-stage", "0"], 2, id="zero0", marks=pytest.mark.slow),
    pytest.param(["--zero-stage", "1"], 2, id="zero1", marks=pytest.mark.slow),
    pytest.param(
        ["--zero-stage", "1", "--expert-parallel-size", "2"], 2, id="zero1-ep2", marks=pytest.mark.slow
    ),
    pytest.param(["--zero-stage", "3", "--peft", *SKEWED], 2, id="zero3-peft", marks=pytest.mark.slow),
    pytest.param(
        ["--zero-stage", "2", "--expert-parallel-size", "2", *SKEWED],
        4,
        id="zero2-ep2-edp2",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        ["--zero-stage", "3", "--expert-parallel-size", "2", "--persistence-threshold", "100000", *SKEWED],
        4,
        id="zero3-ep2-edp2-persistent",
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.distributed
@pytest.mark.parametrize("args, nproc", PARITY)
def test_sgd_steps_match_single_process_reference(tmp_path, args, nproc):
    result, output = run_parity(tmp_path, "ds_train_parity.py", [*args, "--optimizer", "sgd"], nproc)
    assert_matches_reference(result, SGD_TOL)
    if "--skew-rank" in args:
        assert "rank 1 routed to experts [0, 1]" in output
    if "grouped_loop" in args:  # ZeRO-3 leaf MoE blocks: gathered experts, read by the grouped path
        assert "rank 0 expert paths ['grouped']" in output and "rank 1 expert paths ['grouped']" in output
    if "--peft" in args and "--expert-parallel-size" in args:
        assert result["trainable_expert_params"] > 0, "no LoRA adapter landed on an expert"
    if args[:2] == ["--zero-stage", "3"] and "--expert-parallel-size" in args:
        assert_experts_partitioned_within_their_group(result, nproc)


ADAPTER_TOL = 1e-5


def adapter_logits(base_class, base_dir: Path, adapter_dir: Path) -> torch.Tensor:
    model = peft.PeftModel.from_pretrained(base_class.from_pretrained(base_dir), adapter_dir).eval()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.distributed
@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--zero-stage", "2", "--skew-rank", "1"], id="zero2", marks=pytest.mark.slow),
        pytest.param(["--zero-stage", "3", *SKEWED], id="zero3-skewed"),
    ],
)
def test_expert_parallel_lora_matches_reference_and_saves_one_complete_adapter(tmp_path, args):
    """EP=2 + LoRA on attention and experts, 3 SGD steps on 2 ranks, against one process at EP=1 on
    the same global batch: losses and every parameter agree; the adapter saved across the EP ranks is
    one complete PEFT adapter equal to the reference's, loads onto transformers' Mixtral and ours at
    EP=1 with the reference adapter's logits, and loads back into an EP=2 model rank by rank."""
    saved = tmp_path / "saved"
    result, _ = run_parity(
        tmp_path,
        "ds_train_parity.py",
        [*args, "--expert-parallel-size", "2", "--peft", "--optimizer", "sgd", "--save-adapter", str(saved)],
    )
    assert_matches_reference(result, ADAPTER_TOL)
    assert result["trainable_expert_params"] > 0, "no LoRA adapter landed on an expert"
    losses, reference = torch.tensor(result["losses"]), torch.tensor(result["reference_losses"])
    torch.testing.assert_close(losses, reference, rtol=0, atol=ADAPTER_TOL)
    assert result["reloaded_adapter_diff"] == [0.0, 0.0]

    adapter = load_file(saved / "adapter" / "adapter_model.safetensors")
    expected = load_file(saved / "reference_adapter" / "adapter_model.safetensors")
    assert sorted(adapter) == sorted(expected)
    assert {k for k in adapter if ".experts.3.w2.lora_B" in k}, "an expert of rank 1 is missing"
    for key, value in expected.items():
        torch.testing.assert_close(
            adapter[key], value, rtol=0, atol=ADAPTER_TOL, msg=lambda m, k=key: f"{k}: {m}"
        )
    assert all(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k), "an adapter did not train"

    reference_logits = adapter_logits(MixtralForCausalLM, saved / "base", saved / "reference_adapter")
    for base_class in (MixtralForCausalLM, transformers.MixtralForCausalLM):
        logits = adapter_logits(base_class, saved / "base", saved / "adapter")
        torch.testing.assert_close(logits, reference_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.distributed
@pytest.mark.slow
def test_adamw_from_deepspeed_config_matches_reference(tmp_path):
    """The optimizer DeepSpeed builds from its `optimizer` block (the path HF Trainer takes with one)."""
    args = ["--zero-stage", "3", "--expert-parallel-size", "2", "--optimizer", "adamw", *SKEWED]
    result, _ = run_parity(tmp_path, "ds_train_parity.py", args)
    assert_matches_reference(result, ADAMW_TOL)


TRAINER = [
    pytest.param(
        ["--zero-stage", "2", "--expert-parallel-size", "2"], SGD_TOL, id="zero2-ep2-trainer-optimizer"
    ),
    pytest.param(
        ["--zero-stage", "3", "--expert-parallel-size", "2"],
        SGD_TOL,
        id="zero3-ep2-trainer-optimizer",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        ["--zero-stage", "2", "--expert-parallel-size", "2", "--optimizer", "deepspeed-adamw"],
        ADAMW_TOL,
        id="zero2-ep2-deepspeed-optimizer",
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.distributed
@pytest.mark.parametrize("args, tol", TRAINER)
def test_hf_trainer_matches_reference(tmp_path, args, tol):
    result, _ = run_parity(tmp_path, "ds_trainer_parity.py", args)
    assert_matches_reference(result, tol)
    assert any(group["moe"] for group in result["optimizer_groups"])
    assert result["saved_vs_trained"] == {"missing": [], "max_abs_diff": 0.0}


@pytest.mark.distributed
@pytest.mark.slow
def test_without_prepare_expert_parallel_gradients_are_wrong(tmp_path):
    """Negative control: plain DeepSpeed averages the different experts of different ranks together."""
    args = ["--zero-stage", "2", "--expert-parallel-size", "2", "--optimizer", "sgd", "--skip-prepare"]
    result, _ = run_parity(tmp_path, "ds_train_parity.py", args)
    assert result["max_abs_diff"] > 1e-3


@pytest.mark.distributed
@pytest.mark.slow
def test_without_leaf_modules_zero3_breaks_when_ranks_route_differently(tmp_path):
    """Negative control (DeepSpeed issue 4808): with per-module ZeRO-3 hooks, a rank that skips an idle
    expert skips its gather; gloo reports the collective mismatch (NCCL would hang)."""
    args = [
        "--zero-stage",
        "3",
        "--optimizer",
        "sgd",
        "--skip-prepare",
        *SKEWED,
        "--out",
        str(tmp_path / "r.json"),
    ]
    try:
        proc = launch("ds_train_parity.py", args, timeout=120)
    except subprocess.TimeoutExpired as hang:
        pytest.fail(
            f"expected gloo to report the collective mismatch, but the run hung for {hang.timeout:.0f} s"
        )
    assert proc.returncode != 0, "ranks that skip different experts' ZeRO-3 gathers trained without an error"


@pytest.mark.parametrize("combination", [c for c in supported_combinations() if not c.supported])
def test_unsupported_combinations_fail_with_one_line_error(combination):
    ep = 2 if combination.expert_parallel else 1
    with pytest.raises(
        ValueError, match=f"ZeRO stage {combination.zero_stage} with expert_parallel_size={ep}"
    ) as err:
        check_parallel_combination(combination.zero_stage, ep, combination.peft)
    assert "\n" not in str(err.value)


def test_every_combination_is_in_the_table_once():
    keys = [(c.zero_stage, c.expert_parallel, c.peft) for c in supported_combinations()]
    assert sorted(keys) == sorted(itertools.product(range(4), [False, True], [False, True]))


@pytest.mark.parametrize(
    "stage, ep, match",
    [(4, 1, "zero_optimization.stage=4"), (2, 0, "expert_parallel_size=0 must be a positive integer")],
)
def test_invalid_settings_fail_with_one_line_error(stage, ep, match):
    with pytest.raises(ValueError, match=match):
        check_parallel_combination(stage, ep)


def tiny_model() -> MixtralForCausalLM:
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(**tiny_config()))


def test_moe_param_groups_put_expert_parameters_in_their_own_groups():
    model = tiny_model()
    layers, experts = tiny_config()["num_hidden_layers"], tiny_config()["num_local_experts"]
    expert_weights = layers * experts * 3  # w1, w2, w3
    assert mark_expert_parameters(model, expert_parallel_size=2, zero_stage=2) == expert_weights
    groups = moe_param_groups(
        [{"params": [p for n, p in model.named_parameters() if "norm" not in n], "weight_decay": 0.1},
         {"params": [p for n, p in model.named_parameters() if "norm" in n], "weight_decay": 0.0}]
    )  # fmt: skip
    summary = [(g["name"], g.get("moe", False), g["weight_decay"], len(g["params"])) for g in groups]
    assert summary == [
        ("group0", False, 0.1, 2 + 2 * 5),
        ("group1", False, 0.0, 5),
        ("ep_size_2", True, 0.1, 24),
    ]

    optimizer = moe_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    assert [g.get("moe", False) for g in optimizer.param_groups] == [False, True]
    assert moe_optimizer(optimizer) is optimizer


def test_prepare_zero3_makes_every_moe_block_a_leaf():
    model, params = prepare_for_deepspeed(tiny_model(), {"zero_optimization": {"stage": 3}})
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    assert blocks and all(z3_leaf_module(m) for m in blocks)
    assert len(params) == len(list(model.parameters()))


def test_zero_config_without_reduce_scatter_is_rejected_for_expert_parallelism():
    with pytest.raises(ValueError, match="zero_optimization.reduce_scatter=false"):
        check_zero_config_for_moe({"zero_optimization": {"stage": 2, "reduce_scatter": False}})
