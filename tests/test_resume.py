"""Resume in every layout: a run interrupted after a checkpoint and continued with `resume=true`
logs the uninterrupted run's losses step for step and ends with its weights (or adapter).

Two ways to interrupt, both ending in a fresh process that resumes through the pipelines:
* `kill -9` of the whole process tree (torchrun and its workers) in the middle of training, right
  after a checkpoint was marked complete; the killed run asks for many more steps on a constant
  learning rate, so it is always still training when killed, and its resumed run stops where the
  reference does.
* the checkpoint of an uninterrupted run copied into a new output_dir: the same files a run killed
  after that checkpoint leaves, for the layouts where the kill itself adds nothing but minutes.
A checkpoint cut short (a file truncated) is skipped with one line naming it.
"""

import io
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from pipeline_runs import DPO, SFT, log_history, pipeline_command, run_env, run_pipeline
from safetensors.torch import load_file

from mixtral_tune.training.resume import (
    COMPLETE_MARKER,
    checkpoint_problem,
    latest_complete_checkpoint,
    mark_checkpoint_complete,
)

STAGES = {"sft": SFT, "dpo": DPO}
EP2 = ["model.expert_parallel_size=2"]
FP32_REL = 1e-5


def logged(run_dir: Path, key: str = "loss") -> dict[int, float]:
    return {e["step"]: e[key] for e in log_history(run_dir / "final") if key in e and "train_loss" not in e}


def final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    final = run_dir / "final"
    name = (
        "adapter_model.safetensors" if (final / "adapter_model.safetensors").exists() else "model.safetensors"
    )
    return load_file(final / name)


def assert_same_run(resumed: Path, reference: Path, after: int, rel: float) -> None:
    """Every loss (and DPO reward margin) logged after step `after` and every final tensor agree to
    `rel`; prints the largest differences (run with -s to see them)."""
    keys = [
        "loss",
        *(["rewards/margins"] if "rewards/margins" in log_history(reference / "final")[0] else []),
    ]
    for key in keys:
        ours, theirs = logged(resumed, key), logged(reference, key)
        steps = [step for step in theirs if step > after]
        assert steps and [step for step in sorted(ours) if step > after] == steps, (key, ours, theirs)
        for step in steps:
            assert ours[step] == pytest.approx(theirs[step], rel=rel, abs=1e-7), (key, step, ours, theirs)
    ours, theirs = logged(resumed), logged(reference)
    worst_loss = max(abs(ours[step] - theirs[step]) / abs(theirs[step]) for step in theirs if step > after)
    mine, expected = final_tensors(resumed), final_tensors(reference)
    assert sorted(mine) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(mine[key], value, rtol=rel, atol=rel * value.abs().max().item(), msg=key)
    worst_weight = max((mine[k].float() - v.float()).abs().max().item() for k, v in expected.items())
    print(
        f"[resume] after step {after}: max rel loss diff {worst_loss:.1e}, max weight diff {worst_weight:.1e}"
    )


def kill_process_tree(process: subprocess.Popen) -> None:
    """SIGKILL the launched process and everything it started (torchrun's workers too)."""
    import psutil  # a DeepSpeed dependency

    root = psutil.Process(process.pid)
    for proc in [root, *root.children(recursive=True)]:
        proc.send_signal(signal.SIGKILL)
    process.wait()


# (stage, ranks, overrides, relative tolerance). fp32 throughout except the bf16 row: there the
# resumed run repeats the same bf16 operations from the same restored state, so it is held to the
# fp32 tolerance as well (measured equal, see README).
LAYOUTS = [
    pytest.param("sft", 2, ["deepspeed=zero2"], FP32_REL, id="zero2-full"),
    pytest.param("sft", 2, ["deepspeed=zero2", "peft=lora"], FP32_REL, id="zero2-lora"),
    pytest.param("sft", 2, ["deepspeed=zero3"], FP32_REL, id="zero3-full"),
    pytest.param("sft", 2, ["deepspeed=zero3", "peft=lora"], FP32_REL, id="zero3-lora"),
    pytest.param("dpo", 2, ["deepspeed=zero2", "peft=lora"], FP32_REL, id="dpo-zero2-lora"),
    pytest.param("dpo", 2, ["deepspeed=zero3"], FP32_REL, id="dpo-zero3-full"),
    pytest.param("sft", 2, ["deepspeed=zero2", *EP2], FP32_REL, id="ep2-zero2-full"),
    pytest.param("sft", 2, ["deepspeed=zero2_offload", *EP2], FP32_REL, id="ep2-zero2-offload-full"),
    pytest.param("sft", 2, ["deepspeed=zero3", *EP2], FP32_REL, id="ep2-zero3-full"),
    pytest.param("sft", 2, ["deepspeed=zero3", *EP2, "peft=lora"], FP32_REL, id="ep2-zero3-lora"),
    pytest.param(
        "sft",
        2,
        ["deepspeed=zero3", *EP2, "peft=lora", "model.dtype=bfloat16"],
        FP32_REL,
        id="ep2-zero3-lora-bf16",
    ),
    pytest.param(
        "sft",
        2,
        ["deepspeed=zero2", *EP2, "peft=lora", "trainer.gradient_accumulation_steps=2"],
        FP32_REL,
        id="ep2-zero2-lora-accum2",
    ),
    pytest.param("dpo", 2, ["deepspeed=zero2", *EP2, "peft=lora"], FP32_REL, id="dpo-ep2-zero2-lora"),
]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage, nproc, layout, rel", LAYOUTS)
def test_resume_from_a_checkpoint_continues_the_uninterrupted_run(tmp_path, stage, nproc, layout, rel):
    """4 steps saving every 2 (LoRA with its shipped dropout, so every rank's RNG state counts too);
    checkpoint-2 resumed in a new output_dir trains steps 3-4 exactly as the uninterrupted run did."""
    steps = ["max_steps=4", "trainer.save_steps=2", "trainer.save_total_limit=null"]
    reference, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    run_pipeline(stage, [*STAGES[stage], *layout, *steps, f"output_dir={reference}"], nproc=nproc)
    shutil.copytree(reference / "checkpoint-2", resumed / "checkpoint-2")
    run_pipeline(
        stage, [*STAGES[stage], *layout, *steps, f"output_dir={resumed}", "resume=true"], nproc=nproc
    )
    assert_same_run(resumed, reference, after=2, rel=rel)


KILL_LAYOUTS = [
    pytest.param(
        2, ["deepspeed=zero2", *EP2, "peft=lora"], id="ep2-zero2-lora", marks=pytest.mark.distributed
    ),
    pytest.param(
        2,
        ["deepspeed=zero3", "peft=lora"],
        id="zero3-lora",
        marks=[pytest.mark.distributed, pytest.mark.slow],
    ),
    pytest.param(1, [], id="one-process", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("nproc, layout", KILL_LAYOUTS)
def test_kill_9_mid_run_then_resume_continues_with_the_same_losses(tmp_path, nproc, layout):
    """torchrun and its workers get SIGKILL while training past checkpoint-2 (and maybe while writing
    checkpoint-4); `resume=true` picks the newest complete checkpoint and trains on to step 5 with the
    losses and final weights of an uninterrupted 5-step run."""
    recipe = [
        *SFT,
        *layout,
        "trainer.lr_scheduler_type=constant",
        "trainer.warmup_steps=0",
        "trainer.save_steps=2",
        "trainer.save_total_limit=2",
    ]
    reference, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    run_pipeline("sft", [*recipe, "max_steps=5", f"output_dir={reference}"], nproc=nproc)

    command = pipeline_command("sft", [*recipe, "max_steps=1000", f"output_dir={killed}"], nproc)
    process = subprocess.Popen(command, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while latest_complete_checkpoint(killed) is None:
        assert process.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline, "no complete checkpoint in time"
        time.sleep(0.05)
    kill_process_tree(process)
    assert not (killed / "final").exists()
    restart = Path(latest_complete_checkpoint(killed))
    assert restart.name in ("checkpoint-2", "checkpoint-4"), restart

    run_pipeline("sft", [*recipe, "max_steps=5", f"output_dir={killed}", "resume=true"], nproc=nproc)
    assert_same_run(killed, reference, after=int(restart.name.split("-")[1]), rel=FP32_REL)


def test_truncated_newest_checkpoint_is_skipped_with_one_line(tmp_path):
    """checkpoint-3 with its model file cut in half: resume=true names it, takes checkpoint-2, and
    steps 3-4 are the uninterrupted run's."""
    steps = ["max_steps=4", "trainer.save_steps=1", "trainer.save_total_limit=null"]
    reference, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    run_pipeline("sft", [*SFT, *steps, f"output_dir={reference}"])
    for step in (1, 2, 3):
        shutil.copytree(reference / f"checkpoint-{step}", resumed / f"checkpoint-{step}")
    weights = resumed / "checkpoint-3" / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as file:
        file.truncate(size // 2)

    result = run_pipeline("sft", [*SFT, *steps, f"output_dir={resumed}", "resume=true"])
    warnings = [line for line in result.stderr.splitlines() if "skipping incomplete checkpoint" in line]
    assert warnings == [
        f"warning: skipping incomplete checkpoint {resumed / 'checkpoint-3'}: model.safetensors has "
        f"{size // 2} bytes, {size} when it was saved (cut short)"
    ]
    assert_same_run(resumed, reference, after=2, rel=FP32_REL)


def write_checkpoint(path: Path, step: int, files: dict[str, bytes], mark: bool = True) -> None:
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    if mark:
        mark_checkpoint_complete(path)


def safetensors_bytes() -> bytes:
    return safetensors.torch.save({"w": torch.zeros(2)})


def torch_save_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"step": 5}, buffer)
    return buffer.getvalue()


def test_a_checkpoint_is_complete_only_when_its_marker_matches_its_files(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    shard = "global_step5/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    weights, state = safetensors_bytes(), torch_save_bytes()
    write_checkpoint(tmp_path / "checkpoint-5", 5, {"model.safetensors": weights, shard: state})
    assert checkpoint_problem(tmp_path / "checkpoint-5") is None
    marker = json.loads((tmp_path / "checkpoint-5" / COMPLETE_MARKER).read_text())
    state_size = len(json.dumps({"global_step": 5}))
    assert marker["files"] == {
        "model.safetensors": len(weights),
        shard: len(state),
        "trainer_state.json": state_size,
    }

    write_checkpoint(tmp_path / "checkpoint-6", 6, {"model.safetensors": b"x"}, mark=False)  # killed first
    write_checkpoint(tmp_path / "checkpoint-7", 7, {shard: state})
    (tmp_path / "checkpoint-7" / shard).unlink()  # a rank's shard lost
    write_checkpoint(tmp_path / "checkpoint-8", 8, {"model.safetensors": b"x"})
    (tmp_path / "checkpoint-8" / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    write_checkpoint(tmp_path / "checkpoint-9", 9, {"model.safetensors": b"x" * 10})
    (tmp_path / "checkpoint-9" / "model.safetensors").write_bytes(b"x" * 4)
    (tmp_path / "checkpoint-10").mkdir()  # cut short before trainer_state.json

    assert latest_complete_checkpoint(tmp_path, warn=True) == str(tmp_path / "checkpoint-5")
    assert capsys.readouterr().err.splitlines() == [
        f"warning: skipping incomplete checkpoint {tmp_path / name}: {why}"
        for name, why in [
            ("checkpoint-10", "no readable trainer_state.json (cut short before it was written)"),
            ("checkpoint-9", "model.safetensors has 4 bytes, 10 when it was saved (cut short)"),
            ("checkpoint-8", "trainer_state.json names step 2, not 8"),
            ("checkpoint-7", f"{shard} is missing"),
            (
                "checkpoint-6",
                f"no readable {COMPLETE_MARKER} (cut short before every rank had written its part)",
            ),
        ]
    ]
    monkeypatch.setenv("RANK", "1")  # the other ranks choose the same checkpoint silently
    assert latest_complete_checkpoint(tmp_path, warn=True) == str(tmp_path / "checkpoint-5")
    assert capsys.readouterr().err == ""
