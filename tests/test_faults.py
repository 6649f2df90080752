"""Faults off the happy path (issue 17): a diverging run stops and says so, loading a checkpoint runs
nothing and reads only finite values, one run owns its output directory, `final/` is atomic, and
no environment value lands in saved outputs. The pipelines run as a user runs them (subprocesses
on the tiny recipe); the checks they rely on are also held to planted files in-process."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from pipeline_runs import SFT, pipeline_command, run_env, run_pipeline
from safetensors.torch import load_file, save_file

from mixtral_tune import run_dir
from mixtral_tune.config import load_config
from mixtral_tune.training.resume import mark_checkpoint_complete
from mixtral_tune.training.safe_load import (
    UnsafeCheckpointFile,
    checkpoint_problem_on_any_rank,
    load_checkpoint_file,
)

SECRET = "hunter2-not-for-the-hub"
USER_README = "# my notes\nkept by hand, not a model card\n"
TWO_STEPS = ["max_steps=2", "trainer.save_steps=1", "trainer.save_total_limit=null"]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_line_refusal(result, *names: str) -> str:
    """Exit 2, one `error:` line naming each of `names`, and no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and all(name in lines[0] for name in names), (lines, names)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


class Payload:
    """Unpickling this creates `marker` (what a planted checkpoint would do with os.system)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def plant(path: Path, marker: Path) -> None:
    """The real file's contents with a payload added, written back as the same kind of file."""
    state = torch.load(path, weights_only=False) if path.exists() else {"scale": 1024.0, "_growth_tracker": 0}
    state = (
        {"state": state, "extra": Payload(marker)}
        if not isinstance(state, dict)
        else {**state, "x": Payload(marker)}
    )
    torch.save(state, path)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A 2-step SFT run (a checkpoint at each step) into an output_dir holding the user's README.md,
    with trainer.run_name read from the environment."""
    out = tmp_path_factory.mktemp("good") / "run"
    out.mkdir()
    (out / "README.md").write_text(USER_README)
    os.environ["SECRET_TOKEN"] = SECRET
    try:
        run_pipeline(
            "sft", [*SFT, *TWO_STEPS, f"output_dir={out}", "trainer.run_name=${oc.env:SECRET_TOKEN}"]
        )
    finally:
        del os.environ["SECRET_TOKEN"]
    return out


def test_a_users_readme_survives_and_final_is_complete_with_nothing_left_staged(good_run):
    assert (good_run / "README.md").read_text() == USER_README  # TRL's card would replace it at each save
    assert (good_run / "final" / "README.md").exists()
    assert run_dir.final_problem(good_run / "final") is None
    marker = json.loads((good_run / "final" / run_dir.FINAL_MARKER).read_text())["files"]
    assert marker["model.safetensors"] == (good_run / "final" / "model.safetensors").stat().st_size
    leftovers = [
        p for p in good_run.rglob("*") if p.name.startswith(run_dir.STAGING_NAME) or ".tmp" in p.name
    ]
    assert leftovers == []


def test_environment_values_stay_unresolved_in_saved_outputs(good_run, monkeypatch):
    saved = OmegaConf.load(good_run / "final" / "run_config.yaml")
    assert OmegaConf.to_container(saved.trainer)["run_name"] == "${oc.env:SECRET_TOKEN}"
    for file in good_run.rglob("*"):  # final/, the checkpoints, run_config*.yaml: every output
        if file.is_file():
            assert SECRET.encode() not in file.read_bytes(), file
    args = torch.load(good_run / "final" / "training_args.bin", weights_only=False)
    assert args.run_name == "${oc.env:SECRET_TOKEN}"
    # as Hydra's saved config: the value comes back when the environment has it again
    monkeypatch.setenv("SECRET_TOKEN", "again")
    assert saved.trainer.run_name == "again"
    assert saved.trainer.learning_rate == 3e-3  # pipeline_runs.SFT's value: everything else resolved


def test_a_base_of_other_settings_is_rebuilt_for_a_new_run_and_refused_on_resume(good_run, tmp_path):
    record = json.loads((good_run / "base" / run_dir.BASE_RECORD).read_text())
    # pipeline_runs.SMALL_MODEL's hidden size; configs/trainer/sft.yaml's seed
    assert record["model.architecture"]["hidden_size"] == 32 and record["trainer.seed"] == 42
    other = tmp_path / "other"
    shutil.copytree(good_run / "base", other / "base")
    args = [*SFT, f"output_dir={other}"]
    assert run_dir.check_random_init_base(load_config("sft", args), resuming=False) is False
    tokenizer = load_config("sft", args)
    tokenizer.model.tokenizer = "/another/tokenizer"
    for change, cfg in (
        ("hidden_size", load_config("sft", [*args, "model.architecture.hidden_size=64"])),
        ("seed", load_config("sft", [*args, "trainer.seed=7"])),
        ("tokenizer", tokenizer),
    ):
        assert run_dir.check_random_init_base(cfg, resuming=False) is True, change
        with pytest.raises(run_dir.OutputDirError, match="checkpoints here were trained from it"):
            run_dir.check_random_init_base(cfg, resuming=True)
    (other / "base" / run_dir.BASE_RECORD).unlink()
    with pytest.raises(run_dir.OutputDirError, match="not written by this version's random init"):
        run_dir.check_random_init_base(load_config("sft", args), resuming=False)


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt"])
def test_a_payload_planted_in_a_trainer_file_does_not_run(good_run, tmp_path, name):
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(good_run / "checkpoint-2", checkpoint)
    marker = tmp_path / "payload-ran"
    plant(checkpoint / name, marker)
    problem = checkpoint_problem_on_any_rank(checkpoint)
    assert not marker.exists()
    assert problem.startswith(f"{checkpoint / name} needs ") and "\n" not in problem, problem
    assert "makedirs" in problem
    torch.load(checkpoint / name, weights_only=False)  # the payload is real: unrestricted loading runs it
    assert marker.exists()


def test_the_unplanted_files_load_and_a_nan_in_any_of_them_is_found(good_run, tmp_path):
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(good_run / "checkpoint-2", checkpoint)
    assert checkpoint_problem_on_any_rank(checkpoint) is None
    optimizer = load_checkpoint_file(checkpoint / "optimizer.pt")
    reference = torch.load(checkpoint / "optimizer.pt", weights_only=False)
    torch.testing.assert_close(optimizer["state"][0]["exp_avg"], reference["state"][0]["exp_avg"])
    optimizer["state"][0]["exp_avg"].view(-1)[3] = float("inf")
    torch.save(optimizer, checkpoint / "optimizer.pt")
    problem = checkpoint_problem_on_any_rank(checkpoint)
    assert problem.startswith(
        f"{checkpoint / 'optimizer.pt'} holds NaN or infinite values (['state'][0]['exp_avg'])"
    )


def plant_nan_weight(checkpoint: Path) -> None:
    weights = load_file(checkpoint / "model.safetensors")
    name = next(iter(sorted(weights)))
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    mark_checkpoint_complete(checkpoint)


@pytest.mark.parametrize("fault", ["nan-weight", "payload-optimizer"])
def test_resume_from_a_planted_checkpoint_refuses_with_one_line(good_run, tmp_path, fault):
    out = tmp_path / "run"
    shutil.copytree(good_run / "checkpoint-1", out / "checkpoint-1")
    marker = tmp_path / "payload-ran"
    if fault == "nan-weight":
        plant_nan_weight(out / "checkpoint-1")
        names = [str(out / "checkpoint-1" / "model.safetensors"), "NaN or infinite"]
    else:
        plant(out / "checkpoint-1" / "optimizer.pt", marker)
        mark_checkpoint_complete(out / "checkpoint-1")
        names = [str(out / "checkpoint-1" / "optimizer.pt"), "not loaded"]
    result = run_pipeline(
        "sft", [*SFT, *TWO_STEPS, f"output_dir={out}", f"resume={out / 'checkpoint-1'}"], check=False
    )
    assert_one_line_refusal(result, *names)
    assert not marker.exists() and not (out / "final").exists() and not (out / "checkpoint-2").exists()


def test_a_diverging_run_stops_at_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    """trainer.learning_rate=1e6: step 2's update leaves huge weights, step 3's gradient norm is NaN."""
    out = tmp_path / "run"
    steps = ["max_steps=6", "trainer.save_steps=1", "trainer.save_total_limit=2", "trainer.learning_rate=1e6"]
    result = run_pipeline("sft", [*SFT, *steps, f"output_dir={out}"], check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    (line,) = error_lines(result.stderr)
    assert line.startswith("error: training diverged at step 3: loss=") and "grad_norm=nan" in line, line
    assert f"the last good checkpoint is {out / 'checkpoint-2'}" in line
    assert "Traceback" not in result.stderr
    assert any(row.startswith("step 3/6") and "grad_norm nan" in row for row in result.stdout.splitlines())
    assert not (out / "final").exists() and not (out / run_dir.STAGING_NAME).exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    for checkpoint in out.glob("checkpoint-*"):
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "model.safetensors").values())
        assert checkpoint_problem_on_any_rank(checkpoint) is None
    assert [
        e["step"]
        for e in json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    ] == [1, 2]


def test_a_nan_loss_is_logged_as_nan_and_stops_the_run():
    """The callback on a log transformers' Trainer makes from a NaN loss: stop, no save of that step."""
    from transformers import TrainerControl, TrainerState

    from mixtral_tune.training.divergence import DivergenceCallback

    callback, control = DivergenceCallback(), TrainerControl(should_save=True)
    state = TrainerState(global_step=4)
    callback.on_log(None, state, control, logs={"loss": float("nan"), "grad_norm": 1.5})
    assert callback.stopped == "step 4: loss=nan, grad_norm=1.5"
    assert control.should_training_stop and not control.should_save
    skipped = type("Optimizer", (), {"step_was_skipped": True})()  # a scaler skipping an overflow step
    callback, control = DivergenceCallback(), TrainerControl(should_save=True)
    callback.on_log(None, state, control, logs={"loss": 2.0, "grad_norm": float("inf")}, optimizer=skipped)
    assert callback.stopped is None and control.should_save and not control.should_training_stop


def test_two_runs_started_at_once_one_trains_the_other_refuses_naming_it(tmp_path):
    out = tmp_path / "run"
    command = pipeline_command("sft", [*SFT, "max_steps=2", "trainer.save_steps=2", f"output_dir={out}"])
    runs = [subprocess.Popen(command, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]  # fmt: skip
    results = [(run.pid, *run.communicate(timeout=600), run.returncode) for run in runs]
    codes = sorted(code for *_, code in results)
    assert codes == [0, 2], [(code, err[-2000:]) for _, _, err, code in results]
    (winner,) = [pid for pid, _, _, code in results if code == 0]
    (loser_err,) = [err for _, _, err, code in results if code == 2]
    (line,) = error_lines(loser_err)
    assert line.startswith(
        f"error: output_dir={out} is in use by another run (pid {winner} on {socket.gethostname()}"
    )
    assert run_dir.final_problem(out / "final") is None


def hold_lock_in_a_subprocess(out: Path) -> subprocess.Popen:
    code = f"from mixtral_tune import run_dir; run_dir.take_output_dir({str(out)!r}); print('held', flush=True); input()"
    holder = subprocess.Popen([sys.executable, "-c", code], env=run_env(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_held_lock_refuses_and_a_dead_holders_lock_is_taken(tmp_path, monkeypatch):
    out = tmp_path / "run"
    holder = hold_lock_in_a_subprocess(out)
    with pytest.raises(run_dir.OutputDirError, match=f"in use by another run \\(pid {holder.pid} on "):
        run_dir.take_output_dir(out)
    # the other ranks of a launch whose rank 0 was refused: the same line, without waiting for rank 0
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("GROUP_RANK", "0")
    with pytest.raises(run_dir.OutputDirError, match=f"pid {holder.pid} "):
        run_dir.take_output_dir(out)
    monkeypatch.setenv("RANK", "0")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((out / run_dir.LOCK_NAME).read_text())["pid"] == holder.pid  # stale: names a dead run
    run_dir.take_output_dir(out)
    assert json.loads((out / run_dir.LOCK_NAME).read_text())["pid"] == os.getpid()
    run_dir.release_output_dir(out)
    assert not (out / run_dir.LOCK_NAME).exists()


SLOW_MARK = """
import runpy, sys, time
from mixtral_tune import run_dir
original = run_dir.mark_final_complete
run_dir.mark_final_complete = lambda directory: (time.sleep(600), original(directory))
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_kill_9_during_the_final_save_leaves_no_final_and_readers_refuse(tmp_path, capsys):
    """The run is killed with every file of final/ staged but not yet marked complete: no final/
    exists; DPO, export and the demo's evaluation refuse the staged directory (or one renamed to
    final/ unmarked) with one line; resume=true writes a complete final/ and leaves nothing staged."""
    from mixtral_tune import export, pipeline
    from mixtral_tune.demo import evaluate

    out = tmp_path / "run"
    overrides = [*SFT, "max_steps=2", "trainer.save_steps=2", f"output_dir={out}"]
    command = [sys.executable, "-c", SLOW_MARK, *pipeline_command("sft", overrides)[1:]]
    process = subprocess.Popen(command, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staged = out / run_dir.STAGING_NAME
    deadline = time.time() + 300
    while not (staged / "README.md").exists():  # the model card: the last file staged before marking
        assert process.poll() is None and time.time() < deadline, "the run ended before its final save"
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "final").exists() and (staged / "model.safetensors").exists()

    for directory in (staged, out / "final"):
        if directory.name == "final":
            shutil.copytree(staged, directory)  # what an unstaged save cut short left as final/
        for read in (
            lambda d: pipeline.config_from_argv(
                "dpo", ["+recipe=tiny/dpo", f"model.name_or_path={d}", f"output_dir={tmp_path / 'dpo'}"]
            ),  # fmt: skip
            lambda d: export.main([str(d), str(tmp_path / "export")]),
        ):
            with pytest.raises(SystemExit) as exit_:
                read(directory)
            assert exit_.value.code == 2
            (line,) = capsys.readouterr().err.splitlines()
            assert line.startswith("error: ") and str(directory) in line and "did not finish" in line, line
        with pytest.raises(run_dir.OutputDirError, match="did not finish"):
            evaluate(directory, None, None, 0.1)
    shutil.rmtree(out / "final")
    run_pipeline("sft", [*overrides, "resume=true"])
    assert run_dir.final_problem(out / "final") is None
    leftovers = [p for p in out.rglob("*") if p.name.startswith(run_dir.STAGING_NAME) or ".tmp" in p.name]
    assert leftovers == []


@pytest.mark.slow
@pytest.mark.distributed
def test_a_payload_planted_in_a_deepspeed_checkpoint_does_not_run(tmp_path):
    """A real 2-rank ZeRO-2 checkpoint: a payload in rank 1's optimizer states runs under DeepSpeed's
    own checkpoint engine as shipped (torch.load(weights_only=False)); routed through our loader it
    does not, and resume=true refuses the checkpoint naming the file, on every rank."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from mixtral_compat.deepspeed import route_checkpoint_engine_loads

    out = tmp_path / "run"
    layout = [*SFT, "deepspeed=zero2", "trainer.save_steps=1"]
    run_pipeline("sft", [*layout, "max_steps=1", f"output_dir={out}"], nproc=2)
    shard = out / "checkpoint-1" / "global_step1" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    marker = tmp_path / "payload-ran"
    state = load_checkpoint_file(shard)  # every type a real shard holds is on the allow-list
    torch.save({**state, "x": Payload(marker)}, shard)
    mark_checkpoint_complete(out / "checkpoint-1")
    final_marker = (out / "final" / run_dir.FINAL_MARKER).read_text()  # the 1-step run's final/

    route_checkpoint_engine_loads(load_checkpoint_file)
    with pytest.raises(UnsafeCheckpointFile, match="makedirs"):
        TorchCheckpointEngine().load(str(shard))
    assert not marker.exists()

    result = run_pipeline(
        "sft", [*layout, "max_steps=2", f"output_dir={out}", "resume=true"], nproc=2, check=False
    )
    assert result.returncode != 0
    lines = error_lines(result.stderr)
    assert lines and all(line == lines[0] for line in lines) and str(shard) in lines[0], result.stderr[-3000:]
    assert not marker.exists() and not (out / "checkpoint-2").exists()
    assert (out / "final" / run_dir.FINAL_MARKER).read_text() == final_marker
    torch.load(shard, weights_only=False)  # DeepSpeed's own load, as shipped: the payload runs
    assert marker.exists()
