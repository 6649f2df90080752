"""Expert parallelism: configuration errors in-process, and 2 gloo ranks (torchrun) against a
single-process reference: logits, losses and every gradient; uneven loads, experts with no token on
a rank or anywhere, capacity drops; per-rank hub checkpoint loading and one complete save.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mixtral_reference import tiny_config
from pipeline_runs import free_port, run_captured

from mixtral_model import MixtralConfig, MixtralForCausalLM
from mixtral_parallel.expert_parallel import (
    ExpertParallelGroups,
    check_expert_parallel_layout,
    expert_parallel_ranks,
    is_expert_param,
    new_expert_parallel_groups,
    parallelize_experts,
    validate_expert_parallel,
)

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5


def torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 120) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(REPO / "tests" / "distributed" / script),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = run_captured(command, timeout, cwd=REPO, env=env)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def ep_parity(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ep") / "parity.json"
    torchrun("ep_parity.py", str(out))
    report = json.loads(out.read_text())
    for case, ranks in report.items():
        for rank, values in ranks.items():
            diffs = {k: f"{v:.1e}" for k, v in values.items() if isinstance(v, float)}
            print(f"{case} rank {rank}: {diffs}")
    return report


def assert_all_close(case: dict, tol: float = TOL) -> None:
    for rank, values in case.items():
        for quantity, diff in values.items():
            if isinstance(diff, float):
                assert diff <= tol, f"rank {rank} {quantity}: max relative diff {diff:.2e} > {tol}"


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["model_padded", "model_z_loss_top1", "model_gradient_checkpointing"])
def test_ep2_model_matches_reference(ep_parity, case):
    assert_all_close(ep_parity[case])
    layers = 2
    recomputed = case == "model_gradient_checkpointing"
    assert ep_parity[case]["0"]["token_exchanges"] == layers * (2 if recomputed else 1)
    assert "z_loss" in ep_parity[case]["0"] or case != "model_z_loss_top1"


@pytest.mark.distributed
def test_ep2_rank_whose_experts_get_no_token(ep_parity):
    case = ep_parity["model_rank1_experts_unused"]
    assert_all_close(case)
    assert case["0"]["global_tokens_per_expert"][4:] == [0, 0, 0, 0]  # rank 1 receives no row at all


@pytest.mark.distributed
def test_ep2_skewed_routing(ep_parity):
    """Expert 3 gets no token anywhere, expert 1 none from rank 1, rank 0 sends no row to rank 1."""
    case = ep_parity["block_skewed_routing"]
    assert_all_close(case)
    assert case["0"]["global_tokens_per_expert"] == [8, 5, 3, 0]


@pytest.mark.distributed
def test_ep2_bf16_block(ep_parity):
    """bf16 rows travel through gloo; expert grads sum rows in another order than the reference."""
    assert_all_close(ep_parity["block_bf16"], tol=2e-2)


@pytest.mark.distributed
def test_ep2_capacity_applies_per_rank(ep_parity):
    case = ep_parity["block_capacity_uneven_tokens"]
    assert_all_close(case)
    assert case["0"]["dropped_slots"] > 0 and case["1"]["dropped_slots"] > 0


@pytest.fixture(scope="module")
def ep_checkpoint(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("ep_checkpoint")
    torchrun("ep_checkpoint.py", str(work), str(work / "found.json"))
    return json.loads((work / "found.json").read_text())


@pytest.mark.distributed
def test_ep2_loads_hub_checkpoint_per_rank(ep_checkpoint):
    """Each rank reads every dense tensor and only its own experts' tensors, and matches transformers."""
    for rank, experts in (("0", [0, 1]), ("1", [2, 3])):
        found = ep_checkpoint[rank]
        assert found["shards"] > 1
        assert found["experts_read"] == experts
        assert found["state_dict_experts"] == experts
        assert found["dense_read_all"]
        assert found["logits_vs_transformers"] <= TOL


@pytest.mark.distributed
def test_ep2_loading_is_strict_on_every_rank(ep_checkpoint):
    for rank in ("0", "1"):
        found = ep_checkpoint[rank]
        assert found["missing_rank1_expert_error"].startswith("rank 1: ")
        assert (
            "missing keys: model.layers.1.block_sparse_moe.experts.3.w2.weight"
            in found["missing_rank1_expert_error"]
        )
        assert "unexpected keys: model.layers.0.extra.weight" in found["stray_key_error"]


@pytest.mark.distributed
@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_ep2_saves_one_complete_checkpoint(ep_checkpoint, dtype):
    rank0, rank1 = ep_checkpoint["0"], ep_checkpoint["1"]
    assert rank0[f"{dtype} wrote_files"] and not rank1[f"{dtype} wrote_files"]
    assert rank0[f"{dtype} same_keys"] and rank0[f"{dtype} tensors_equal"]
    assert rank0[f"{dtype} saved_config_has_ep"] is False  # the layout is a launch choice, not a config field
    assert rank0["reloaded_logits_vs_original"] <= TOL


@pytest.mark.distributed
def test_expert_parallel_group_errors_on_three_ranks(tmp_path):
    torchrun("ep_errors.py", str(tmp_path / "errors.json"), nproc=3)
    errors = json.loads((tmp_path / "errors.json").read_text())
    assert (
        errors["2"] == "expert_parallel_size=2 does not divide the world size 3: launch a multiple of 2 ranks"
    )
    assert (
        errors["4"] == "expert_parallel_size=4 exceeds the world size 3: launch at least 4 ranks or lower it"
    )


@pytest.mark.parametrize(
    "experts, ep, world, message",
    [
        (8, 3, 6, r"expert_parallel_size=3 does not divide num_local_experts=8"),
        (8, 4, 2, r"expert_parallel_size=4 exceeds the world size 2"),
        (8, 2, 3, r"expert_parallel_size=2 does not divide the world size 3"),
        (8, 0, 2, r"expert_parallel_size=0 must be a positive integer"),
    ],
)
def test_validate_expert_parallel_errors(experts, ep, world, message):
    with pytest.raises(ValueError, match=message):
        validate_expert_parallel(ep, experts, world)


def test_validate_expert_parallel_accepts_good_layouts():
    for experts, ep, world in [(8, 1, 1), (8, 2, 2), (8, 2, 6), (8, 8, 8), (4, 4, 8)]:
        validate_expert_parallel(ep, experts, world)


def test_expert_parallel_size_is_not_a_config_field():
    with pytest.raises(ValueError, match="expert_parallel_size is not a model config field"):
        MixtralConfig(**tiny_config(expert_parallel_size=2))
    assert not hasattr(MixtralConfig(**tiny_config(expert_parallel_size=1)), "expert_parallel_size")


def test_groups_without_process_group_is_an_error():
    with pytest.raises(RuntimeError, match="needs an initialised torch.distributed process group"):
        new_expert_parallel_groups(2)


def test_building_a_model_creates_no_process_group(tmp_path, monkeypatch):
    """Construction and loading at EP=1 never touch torch.distributed groups: EP is a step after them."""

    def refuse(*args, **kwargs):
        raise AssertionError("a process group was created")

    monkeypatch.setattr(torch.distributed, "new_group", refuse)
    monkeypatch.setattr(torch.distributed, "init_process_group", refuse)
    model = MixtralForCausalLM(MixtralConfig(**tiny_config()))
    model.save_pretrained(tmp_path)
    loaded = MixtralForCausalLM.from_pretrained(tmp_path)
    assert model.expert_parallel is None and loaded.expert_parallel is None
    assert all(
        block.token_dispatcher is None for block in loaded.modules() if hasattr(block, "token_dispatcher")
    )


def test_parallelize_experts_keeps_this_ranks_experts_with_their_weights():
    """EP rank 1 of 2 keeps experts 2 and 3 of every block, unchanged, and installs the dispatcher
    (groups without process groups: nothing here communicates)."""
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**tiny_config()))
    full = {k: v.clone() for k, v in model.state_dict().items()}
    groups = ExpertParallelGroups(size=2, rank=1, expert_parallel=None, expert_data_parallel=None)
    assert parallelize_experts(model, groups) is model
    state = model.state_dict()
    assert {k for k in full if ".experts." not in k or ".experts.2." in k or ".experts.3." in k} == set(state)
    assert all(torch.equal(state[k], full[k]) for k in state)
    assert model.expert_parallel is groups
    assert [b.local_expert_ids for b in model.model.layers.modules() if hasattr(b, "local_expert_ids")] == [
        [2, 3]
    ] * model.config.num_hidden_layers
    with pytest.raises(ValueError, match="already expert-parallel"):
        parallelize_experts(model, groups)


def test_a_layout_passed_must_be_the_models():
    """What is handed the layout (prepare_for_deepspeed, the trainers, the adapter save/load) checks it
    against the model's blocks: the groups parallelize_experts was given pass; none, other groups
    (even of the same size and rank) or groups for a model that is not expert-parallel are one line."""
    from mixtral_parallel.deepspeed_moe import prepare_for_deepspeed

    model = MixtralForCausalLM(MixtralConfig(**tiny_config()))
    groups = ExpertParallelGroups(size=2, rank=1, expert_parallel=None, expert_data_parallel=None)
    other = ExpertParallelGroups(size=2, rank=1, expert_parallel=None, expert_data_parallel=None)
    with pytest.raises(
        ValueError, match=r"^the expert-parallel layout passed \(EP rank 1 of 2\) is not the "
    ):
        check_expert_parallel_layout(model, groups)
    check_expert_parallel_layout(model, None)
    parallelize_experts(model, groups)
    check_expert_parallel_layout(model, groups)
    with pytest.raises(ValueError, match=r"^the model is expert-parallel \(EP rank 1 of 2\) but no expert-"):
        check_expert_parallel_layout(model, None)
    with pytest.raises(ValueError, match="is not the model's"):
        check_expert_parallel_layout(model, other)
    with pytest.raises(ValueError, match="but no expert-parallel layout was passed"):
        prepare_for_deepspeed(model, {"zero_optimization": {"stage": 2}})


def test_parallelize_experts_checks_divisibility():
    model = MixtralForCausalLM(MixtralConfig(**tiny_config()))
    groups = ExpertParallelGroups(size=3, rank=0, expert_parallel=None, expert_data_parallel=None)
    with pytest.raises(ValueError, match="expert_parallel_size=3 does not divide num_local_experts=4"):
        parallelize_experts(model, groups)


def test_group_layout_matches_deepspeed():
    """EP groups are consecutive ranks, expert-data-parallel groups strided (DeepSpeed's E + D layout)."""
    assert expert_parallel_ranks(5, 8, 2) == ([4, 5], [1, 3, 5, 7])
    assert expert_parallel_ranks(2, 8, 4) == ([0, 1, 2, 3], [2, 6])
    assert expert_parallel_ranks(0, 2, 2) == ([0, 1], [0])


def test_is_expert_param():
    assert is_expert_param("model.layers.0.block_sparse_moe.experts.7.w1.weight")
    assert is_expert_param(
        "module.base_model.model.model.layers.3.block_sparse_moe.experts.0.w2.lora_A.default.weight"
    )
    assert not is_expert_param("model.layers.0.block_sparse_moe.gate.weight")
    assert not is_expert_param("model.layers.0.self_attn.q_proj.weight")


def test_single_process_state_dict_keeps_hub_keys():
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**tiny_config()))
    experts = {k for k in model.state_dict() if ".experts." in k and k.startswith("model.layers.0.")}
    assert experts == {
        f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight"
        for e in range(4)
        for w in ("w1", "w2", "w3")
    }
