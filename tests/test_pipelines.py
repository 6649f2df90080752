"""SFT and DPO entry points run end to end on CPU: learning, router loss, saves, bad data, two ranks
against one, two "nodes" over loopback (resume after kill -9: tests/test_resume.py)."""

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
from omegaconf import OmegaConf
from pipeline_runs import (
    DPO,
    REPO,
    SFT,
    log_history,
    run_env,
    run_pipeline,
    train_losses,
)
from safetensors.torch import load_file

from mixtral_model import MixtralForCausalLM, load_tokenizer
from mixtral_tune.evaluate import answer_log_probs, pair_log_probs, read_jsonl
from mixtral_tune.shipped import DATA_DIR
from mixtral_tune.training.resume import latest_complete_checkpoint

RANK_PROBE = Path(__file__).parent / "rank_probe"
DPO_DATA = DATA_DIR / "dpo_train.jsonl"


def logits(model, seed=0):
    ids = torch.randint(3, 32000, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


CONSOLE_STEP = re.compile(
    r"^step (\d+)/12 \(\d+%\) \| loss [\d.]+ \| lr [\d.e+-]+ \| grad_norm [\d.e+-]+ \| aux_loss [\d.]+ "
    r"\| \d+ tok/s \| eta \d+m\d\ds$"
)
CONSOLE_MOE = re.compile(r"^  moe: router entropy [\d.]+/1\.39 \| busiest expert [\d.]+x balanced$")


def test_sft_learns_logs_aux_loss_and_saves_a_hub_checkpoint(tmp_path):
    out = tmp_path / "sft"
    result = run_pipeline(
        "sft",
        [
            *SFT,
            f"output_dir={out}",
            "max_steps=12",
            "trainer.save_steps=12",
            "trainer.report_to=[tensorboard]",
        ],
    )
    losses = train_losses(out / "final")
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    aux = train_losses(out / "final", "aux_loss")
    assert len(aux) == 12 and all(a > 0 for a in aux)
    assert any(key.startswith("router/layer_1/expert_") for key in log_history(out / "final")[0])
    # the console: two short lines per logged step, per-layer statistics only in the log history and trackers
    lines = result.stdout.splitlines()
    assert [int(CONSOLE_STEP.match(line)[1]) for line in lines if line.startswith("step ")] == list(
        range(1, 13)
    )
    assert sum(bool(CONSOLE_MOE.match(line)) for line in lines) == 12
    assert "router/layer" not in result.stdout and "FutureWarning" not in result.stderr
    assert "gemm_4bit_forward" not in result.stderr and "Setting accelerator" not in result.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "runs").rglob("events.out.tfevents.*")))).Reload()
    assert {"train/loss", "train/router/layer_1/expert_3_fraction"} <= set(events.Tags()["scalars"])
    # final/: what servers and hubs read
    generation = json.loads((out / "final" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 0)
    card = (out / "final" / "README.md").read_text()
    assert "library_name: transformers" in card and "+recipe=tiny/sft" in card and "sft.py" in card
    assert f"| train_loss | {log_history(out / 'final')[-1]['train_loss']:.4g} |" in card
    assert "| 1 |" in card and "busiest expert load" in card  # a router-health row per layer
    ours = MixtralForCausalLM.from_pretrained(out / "final")
    reference = transformers.MixtralForCausalLM.from_pretrained(out / "final")
    torch.testing.assert_close(logits(ours), logits(reference), rtol=1e-5, atol=1e-5)
    assert (out / "final" / "tokenizer_config.json").exists()


def test_dpo_with_lora_logs_rewards_and_aux_loss_and_exports(tmp_path):
    out = tmp_path / "dpo"
    run_pipeline("dpo", [*DPO, f"output_dir={out}", "max_steps=4", "peft=lora", "trainer.save_steps=4"])
    history = log_history(out / "final")
    assert all("rewards/margins" in entry and entry["aux_loss"] > 0 for entry in history if "loss" in entry)
    adapter = out / "final"
    base = MixtralForCausalLM.from_pretrained(out / "base")
    trained = peft.PeftModel.from_pretrained(base, adapter)
    lora_b = [p for name, p in trained.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b), "adapter is empty or untrained"
    assert "library_name: peft" in (adapter / "README.md").read_text()
    assert (adapter / "generation_config.json").is_file()
    # Trained with the shipped lora_dropout (0.05), loaded as saved onto transformers' fused experts.
    assert OmegaConf.load(adapter / "run_config.yaml").peft.dropout == 0.05
    reference = peft.PeftModel.from_pretrained(
        transformers.MixtralForCausalLM.from_pretrained(out / "base"), adapter
    )
    torch.testing.assert_close(logits(trained), logits(reference), rtol=1e-5, atol=1e-5)

    export = tmp_path / "merged"
    subprocess.run(
        [sys.executable, str(REPO / "train" / "export.py"), str(adapter), str(export)],
        check=True,
        env=run_env(),
    )
    merged = transformers.MixtralForCausalLM.from_pretrained(export)
    torch.testing.assert_close(logits(merged), logits(trained), rtol=1e-4, atol=1e-5)


def test_existing_run_is_not_overwritten_without_resume(tmp_path):
    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    result = run_pipeline("sft", [*SFT, f"output_dir={out}", "max_steps=2"], check=False)
    assert result.returncode == 2
    assert "already holds a run" in result.stderr


@pytest.mark.parametrize("stage, data", [("sft", "sft_bad.jsonl"), ("dpo", "dpo_bad.jsonl")])
def test_bad_data_file_fails_cleanly_and_leaves_outputs_alone(tmp_path, stage, data):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("previous results")
    recipe = SFT if stage == "sft" else DPO
    overrides = [*recipe, f"output_dir={out}", "max_steps=2", f"data.path={REPO / 'tests' / 'data' / data}",
                 "data.max_bad_fraction=0.0"]  # fmt: skip
    result = run_pipeline(stage, overrides, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error:") and data in last_line
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "previous results"


def test_missing_data_file_is_one_line(tmp_path):
    result = run_pipeline("sft", [*SFT, f"output_dir={tmp_path}/x", "data.path=./no/such.jsonl"], check=False)
    assert result.returncode == 2 and "no/such.jsonl" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.distributed
def test_two_ranks_match_one_rank_for_the_same_global_batch(tmp_path):
    """2 ranks x 4 rows against 1 rank x 4 rows x 2 accumulation steps: the same 8 rows per step, and
    the router aux loss of each 4-row micro-batch (it is not linear in the batch), in both runs."""
    common = [*SFT, "max_steps=3", "trainer.save_steps=3", "trainer.warmup_ratio=0.0",
              "trainer.per_device_train_batch_size=4"]  # fmt: skip
    run_pipeline("sft", [*common, f"output_dir={tmp_path / 'one'}", "trainer.gradient_accumulation_steps=2"])
    run_pipeline("sft", [*common, f"output_dir={tmp_path / 'two'}"], nproc=2)
    one, two = train_losses(tmp_path / "one" / "final"), train_losses(tmp_path / "two" / "final")
    assert one == pytest.approx(two, rel=1e-4), (one, two)
    single = MixtralForCausalLM.from_pretrained(tmp_path / "one" / "final")
    double = MixtralForCausalLM.from_pretrained(tmp_path / "two" / "final")
    for (name, a), (_, b) in zip(single.state_dict().items(), double.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.distributed
@pytest.mark.parametrize(
    "stage, extra",
    [
        ("sft", ["peft=lora", "deepspeed=zero3"]),
        ("dpo", ["peft=lora", "deepspeed=zero3"]),
        (
            "sft",
            [
                "peft=qlora",
                "deepspeed=zero3",
                "peft.quant.compute_dtype=float32",
                "peft.quant.quant_storage=float32",
            ],
        ),
        ("sft", ["deepspeed=zero2", "model.expert_parallel_size=2"]),
    ],
    ids=["sft-zero3-lora", "dpo-zero3-lora", "sft-zero3-qlora", "sft-zero2-ep2"],
)
@pytest.mark.timeout(900)
def test_two_rank_deepspeed_runs_learn_and_save_complete_outputs(tmp_path, monkeypatch, stage, extra):
    """The run learned: on the first 32 training rows the saved model's log-probability of the answer
    (SFT), or its DPO implicit-reward margin against the base (DPO: trained on exactly those 32 pairs,
    each seen once in 4 steps of 8, at a learning rate that moves a zero-initialised adapter in 4
    steps), improved by more than three standard errors of the per-row change. Every rank ends with the same values of every trainable
    parameter they both hold (tests/rank_probe hashes each rank's after training); only expert-parallel
    experts are held by one rank alone."""
    recipe = SFT if stage == "sft" else DPO
    if stage == "dpo":
        rows = tmp_path / "dpo_rows.jsonl"
        rows.write_text("".join(DPO_DATA.read_text().splitlines(keepends=True)[:32]))
        extra = [*extra, f"data.path={rows}", "trainer.learning_rate=1e-2"]
    out, probe = tmp_path / "run", tmp_path / "probe"
    probe.mkdir()
    monkeypatch.setenv("RANK_PROBE_DIR", str(probe))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, (str(RANK_PROBE), os.environ.get("PYTHONPATH"))))
    )
    run_pipeline(
        stage,
        [*recipe, *extra, f"output_dir={out}", "max_steps=4", "trainer.save_steps=4"],
        nproc=2,
        timeout=600,
    )
    digests = [json.loads((probe / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    shared = digests[0].keys() & digests[1].keys()
    assert shared and all(".experts." in name for name in digests[0].keys() ^ digests[1].keys())
    differing = sorted(name for name in shared if digests[0][name] != digests[1][name])
    assert not differing, f"the ranks hold different values after training: {differing[:5]}"
    losses = train_losses(out / "final")
    assert len(losses) == 4 and all(loss == loss for loss in losses)
    assert all(entry["aux_loss"] > 0 for entry in log_history(out / "final") if "loss" in entry)
    base = MixtralForCausalLM.from_pretrained(out / "base").eval()
    if "peft=lora" in extra or "peft=qlora" in extra:
        adapter = json.loads((out / "final" / "adapter_config.json").read_text())
        assert set(adapter["target_modules"]) >= {"w1", "q_proj"}
        trained = peft.PeftModel.from_pretrained(
            MixtralForCausalLM.from_pretrained(out / "base"), out / "final"
        )
        assert any(p.abs().max() > 0 for n, p in trained.named_parameters() if "lora_B" in n), "empty adapter"
    else:
        trained = MixtralForCausalLM.from_pretrained(out / "final")
    assert_learned(stage, trained.eval(), base)


def assert_learned(stage: str, trained, base, rows: int = 32) -> None:
    tokenizer = load_tokenizer()
    if stage == "sft":
        data = read_jsonl(DATA_DIR / "sft_train.jsonl")[:rows]
        change = torch.tensor(
            [answer_log_probs(trained, tokenizer, row["messages"][:-1], row["messages"][-1:])
             - answer_log_probs(base, tokenizer, row["messages"][:-1], row["messages"][-1:]) for row in data]
        )  # fmt: skip
    else:  # the implicit reward margin, chosen minus rejected, with the base as the reference
        data = read_jsonl(DPO_DATA)[:rows]
        reward = pair_log_probs(trained, tokenizer, data) - pair_log_probs(base, tokenizer, data)
        change = reward[:, 0] - reward[:, 1]
    standard_error = change.std() / len(change) ** 0.5
    assert change.mean() > 3 * standard_error, (change.mean().item(), standard_error.item())


EP_LORA = ["deepspeed=zero3", "model.expert_parallel_size=2"]


@pytest.mark.distributed
@pytest.mark.parametrize(
    "stage, extra",
    [
        pytest.param("sft", [*EP_LORA, "peft=lora", "peft.dropout=0.0"], id="sft-zero3-lora"),
        pytest.param(
            "sft",
            ["deepspeed=zero2", "model.expert_parallel_size=2", "peft=lora", "peft.dropout=0.0"],
            id="sft-zero2-lora",
            marks=pytest.mark.slow,
        ),
        pytest.param("sft", [*EP_LORA, "peft=qlora"], id="sft-zero3-qlora", marks=pytest.mark.slow),
        pytest.param(
            "dpo", [*EP_LORA, "peft=lora", "peft.dropout=0.0"], id="dpo-zero3-lora", marks=pytest.mark.slow
        ),
        pytest.param("dpo", [*EP_LORA, "peft=qlora"], id="dpo-zero3-qlora", marks=pytest.mark.slow),
    ],
)
def test_expert_parallel_adapter_runs_save_one_complete_trained_adapter(tmp_path, stage, extra):
    """EP=2 with LoRA/QLoRA (QLoRA with the shipped bf16 storage): the run trains, and every save
    (checkpoint and final) is one adapter holding every expert's lora_A/lora_B, trained, that loads
    onto our model at EP=1 (and, without LoRA dropout, onto transformers' with the same logits)."""
    recipe = SFT if stage == "sft" else DPO
    out = tmp_path / "run"
    run_pipeline(
        stage, [*recipe, *extra, f"output_dir={out}", "max_steps=3", "trainer.save_steps=3"], nproc=2
    )
    history = [entry for entry in log_history(out / "final") if "loss" in entry and "train_loss" not in entry]
    assert len(history) == 3 and all(entry["aux_loss"] > 0 for entry in history)
    if stage == "dpo":  # step 1: the adapter starts at zero, so policy == reference (adapter disabled)
        assert history[0]["rewards/chosen"] == 0.0 and history[0]["rewards/rejected"] == 0.0
    expert_keys = {f"layers.{layer}.block_sparse_moe.experts.{e}.{w}.lora_{ab}.weight"
                   for layer in range(2) for e in range(4) for w in ("w1", "w2", "w3") for ab in "AB"}  # fmt: skip
    for saved in (Path(latest_complete_checkpoint(out)), out / "final"):
        adapter = load_file(saved / "adapter_model.safetensors")
        assert {k.removeprefix("base_model.model.model.") for k in adapter} >= expert_keys, saved
        assert all(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k), f"{saved}: untrained"
    ours = peft.PeftModel.from_pretrained(MixtralForCausalLM.from_pretrained(out / "base"), out / "final")
    if "peft.dropout=0.0" in extra:
        theirs = peft.PeftModel.from_pretrained(
            transformers.MixtralForCausalLM.from_pretrained(out / "base"), out / "final"
        )
        torch.testing.assert_close(logits(theirs.eval()), logits(ours.eval()), rtol=1e-5, atol=1e-5)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero3"])
def test_expert_parallel_lora_resume_restores_every_ranks_experts(tmp_path, zero):
    """EP=2 + LoRA: resuming from checkpoint-3 of a 3-step run trains no step and saves final/ from the
    restored engine, so final/ equals checkpoint-3 tensor for tensor -- every expert's adapter
    restored on its own rank (an unrestored rank would save its initial adapter: lora_B zero)."""
    out = tmp_path / "run"
    overrides = [*SFT, f"deepspeed={zero}", "model.expert_parallel_size=2", "peft=lora", "peft.dropout=0.0",
                 f"output_dir={out}", "max_steps=3", "trainer.save_steps=3"]  # fmt: skip
    run_pipeline("sft", overrides, nproc=2)
    checkpoint = load_file(out / "checkpoint-3" / "adapter_model.safetensors")
    run_pipeline("sft", [*overrides, "resume=true"], nproc=2)
    final = load_file(out / "final" / "adapter_model.safetensors")
    assert sorted(final) == sorted(checkpoint)
    for key, value in checkpoint.items():
        assert torch.equal(final[key], value), key
    assert all(v.abs().max() > 0 for k, v in final.items() if "lora_B" in k)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_launch_two_nodes_over_loopback(tmp_path):
    """Two `./launch.sh sft` nodes (NNODES=2, one process each) meet at a c10d rendezvous on a store this
    test holds on a port it bound (port 0), so no other process can take the port between choosing it
    and using it; both nodes join as clients. Each node's output goes to a file, not a pipe read one node
    after the other (a node that fills its pipe would block while the other waits for it)."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    out = tmp_path / "run"
    nodes, logs = [], []
    for node_rank in ("0", "1"):
        env = {**run_env(), "NNODES": "2", "NODE_RANK": node_rank, "NPROC": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(store.port), "RDZV_ID": f"two-nodes-{store.port}", "LOGLEVEL": "INFO",
               "VIRTUAL_ENV": run_env().get("VIRTUAL_ENV", "ci")}  # fmt: skip
        command = [
            str(REPO / "launch.sh"),
            "sft",
            *SFT,
            f"output_dir={out}",
            "max_steps=2",
            "trainer.save_steps=2",
        ]
        logs.append(tmp_path / f"node{node_rank}.log")
        with logs[-1].open("w") as log:
            nodes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        for node in nodes:
            node.wait(timeout=300)
    except subprocess.TimeoutExpired:  # a hang: stop both nodes and show where each one was
        for node in nodes:
            node.kill()
            node.wait()
        tails = [log.read_text(errors="replace")[-3000:] for log in logs]
        pytest.fail(f"two-node run hung: node 0 ...{tails[0]}\nnode 1 ...{tails[1]}")
    finally:
        del store
    outputs = [log.read_text(errors="replace") for log in logs]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    # torchrun's rendezvous result (LOGLEVEL=INFO): one node each, two workers in all
    group_ranks = sorted(int(re.search(r"group_rank=(\d+)", o).group(1)) for o in outputs)
    assert group_ranks == [0, 1]
    assert all("group_world_size=2" in o and "global_world_sizes=[2]" in o for o in outputs)
    assert len(train_losses(out / "final")) == 2
