"""A resumed run explains itself: a change that alters what is trained is refused with one line
naming the keys (unless allowed in resume_allow_changes); a change that extends or observes the run
is printed and recorded in run_config_history.yaml, never by rewriting run_config.yaml; a resume at
max_steps trains nothing more. Every key of the schema is classified once (config.RESUME_CHANGES).
"""

import dataclasses
import shutil

import pytest
import yaml
from pipeline_runs import REPO, SFT, log_history, run_pipeline
from safetensors.torch import load_file

from mixtral_tune import pipeline, run_dir
from mixtral_tune.config import (
    OBSERVES,
    RESUME_CHANGES,
    TRAINS,
    resume_change_kind,
    schema_keys,
    trl_config_class,
)
from mixtral_tune.run_config import HISTORY, RUN_CONFIG

LORA = [*SFT, "peft=lora", "peft.r=4", "max_steps=4", "trainer.save_steps=2"]


def test_every_schema_key_is_classified_once():
    assert {resume_change_kind(key) for key in schema_keys()} <= {TRAINS, OBSERVES}
    assert all(resume_change_kind(key) is not None for key in schema_keys())
    trl_fields = {
        item.name for stage in ("sft", "dpo") for item in dataclasses.fields(trl_config_class(stage))
    }
    rows = [key.removeprefix("trainer.") for key in RESUME_CHANGES if key.startswith("trainer.")]
    assert set(rows) <= trl_fields, set(rows) - trl_fields  # every trainer row names a field TRL has
    assert resume_change_kind("trainer.learning_rate") == TRAINS  # unlisted trainer keys train
    assert resume_change_kind("deepspeed.zero_optimization.stage") == TRAINS


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A LoRA SFT run of 4 steps (checkpoints at 2 and 4, the newest kept) and its saved config."""
    out = tmp_path_factory.mktemp("resume_changes") / "run"
    run_pipeline("sft", [*LORA, f"output_dir={out}"])
    return out


def refusal(run, overrides: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exited:
        pipeline.config_from_argv("sft", [*LORA, f"output_dir={run}", "resume=true", *overrides])
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    "override, change",
    [
        ("model.architecture.hidden_size=64", "model.architecture.hidden_size (32 -> 64)"),
        ("peft.r=8", "peft.r (4 -> 8)"),
        ("trainer.learning_rate=1e-3", "trainer.learning_rate (0.003 -> 0.001)"),
        ("data.max_length=32", "data.max_length (64 -> 32)"),
        ("trainer.gradient_accumulation_steps=2", "trainer.gradient_accumulation_steps (1 -> 2)"),
    ],
)
def test_a_change_of_what_is_trained_is_refused_naming_the_key(run, capsys, override, change):
    key = change.split(" ")[0]
    assert refusal(run, [override], capsys) == (
        f"error: resume from {run / 'checkpoint-4'}: these changes alter what is trained: {change}; restore "
        f"them, start a new output_dir, or allow them with resume_allow_changes=[{key}]"
    )
    allowed = [*LORA, f"output_dir={run}", "resume=true", override, f"resume_allow_changes=[{key}]"]
    if key.startswith("model.architecture."):  # allowed here, but OUTPUT_DIR/base was built for the old one
        assert "base was written for model.architecture.hidden_size=32 (now 64)" in refusal(
            run, allowed[-2:], capsys
        )
        return
    pipeline.config_from_argv("sft", allowed)
    run_dir.release_every_output_dir()  # config_from_argv took the output_dir for this process


def test_another_data_file_and_world_size_are_refused_together(run, tmp_path, capsys, monkeypatch):
    data = tmp_path / "copy.jsonl"
    shutil.copyfile(REPO / "data" / "sft_train.jsonl", data)
    monkeypatch.setenv("WORLD_SIZE", "2")
    line = refusal(run, [f"data.path={data}"], capsys)
    assert f"data.path ({REPO / 'data' / 'sft_train.jsonl'} -> {data}), world_size (1 -> 2);" in line


def test_extending_and_logging_changes_are_recorded_in_the_history_and_trained(run, tmp_path):
    resumed = tmp_path / "run"
    resumed.mkdir()
    for name in ("checkpoint-4", RUN_CONFIG, HISTORY):
        (shutil.copytree if name.startswith("checkpoint") else shutil.copyfile)(run / name, resumed / name)
    saved = (resumed / RUN_CONFIG).read_text()
    overrides = [*LORA, f"output_dir={resumed}", "resume=true", "max_steps=6", "trainer.logging_steps=2"]

    result = run_pipeline("sft", overrides)
    assert f"[resume] continuing {resumed / 'checkpoint-4'}" in result.stdout
    assert (
        f"[resume] config changes: max_steps: 4 -> 6; output_dir: {run} -> {resumed}; trainer.logging_steps: 1 -> 2"
    ) in result.stdout
    assert (resumed / RUN_CONFIG).read_text() == saved
    history = yaml.safe_load((resumed / HISTORY).read_text())
    assert [entry.get("started", False) for entry in history] == [True, False]
    assert history[-1]["resumed_from"] == str(resumed / "checkpoint-4")
    assert history[-1]["changes"] == {
        "max_steps": {"from": 4, "to": 6},
        "output_dir": {"from": str(run), "to": str(resumed)},  # a copy of the run continues it
        "trainer.logging_steps": {"from": 1, "to": 2},
    }
    assert [entry["step"] for entry in log_history(resumed / "final") if "loss" in entry] == [1, 2, 3, 4, 6]

    # Resumed again at max_steps with final/ gone: nothing trained, final/ written from checkpoint-6.
    shutil.rmtree(resumed / "final")
    result = run_pipeline("sft", [*overrides, "trainer.logging_steps=2"])
    assert f"[resume] {resumed / 'checkpoint-6'} is at step 6 of 6: nothing left to train" in result.stdout
    assert sorted(path.name for path in resumed.glob("checkpoint-*")) == ["checkpoint-6"]
    final, checkpoint = (
        load_file(resumed / "final" / "adapter_model.safetensors"),
        load_file(resumed / "checkpoint-6" / "adapter_model.safetensors"),
    )
    assert final.keys() == checkpoint.keys() and all((final[k] == checkpoint[k]).all() for k in final)
    assert len(yaml.safe_load((resumed / HISTORY).read_text())) == 2  # nothing trained, nothing recorded
