"""Every user error a launch can meet ends in one line naming the key or file and the fix, exit
status 2, no traceback, before any work (nothing written, no data prepared, no model built); and
degenerate training data is refused, or counted in a warning.

The checks run in `pipeline.config_from_argv` (the first step of every entry point) or right after
data preparation, so most tests call those steps in-process as the entry points do; one launches the
pipeline as a user would, to see the whole console.
"""

import io
import json

import pytest
import safetensors.torch
import torch
from pipeline_runs import DPO, REPO, SFT, run_pipeline

from mixtral_model import load_tokenizer
from mixtral_tune import pipeline
from mixtral_tune.config import load_config
from mixtral_tune.data import prepare_dpo_data, prepare_sft_data
from mixtral_tune.training.resume import checkpoint_problem, mark_checkpoint_complete

LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def one_line_exit(stage: str, argv: list[str], capsys) -> str:
    """The entry points' first step on argv: assert it exits 2 with one `error:` line; return the line."""
    with pytest.raises(SystemExit) as exited:
        pipeline.config_from_argv(stage, argv)
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def fake_checkpoint(path, files: dict[str, bytes]):
    """A checkpoint directory as ResumeMixin leaves it: files, trainer_state.json, the marker last."""
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": int(path.name.split("-")[1])}))
    for name, data in files.items():
        (path / name).write_bytes(data)
    mark_checkpoint_complete(path)
    return path


def torch_save_bytes(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def checkpoint_files() -> dict[str, bytes]:
    return {
        "model.safetensors": safetensors.torch.save({"w": torch.ones(4)}),
        "optimizer.pt": torch_save_bytes({"state": {}}),
        "scheduler.pt": torch_save_bytes({"last_epoch": 2}),
    }


def garble_header(file) -> None:
    """Overwrite the start of a safetensors JSON header, keeping the file's size."""
    data = bytearray(file.read_bytes())
    data[8:16] = b"\x00garbled"
    file.write_bytes(bytes(data))


@pytest.fixture
def no_launcher(monkeypatch):
    for name in LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)


def test_malformed_recipe_yaml_names_the_file_line_and_column(tmp_path, capsys):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("stage: sft\ntrainer: {learning_rate: 1e-3\nmax_steps: 2\n")
    line = one_line_exit("sft", [f"+recipe={recipe}"], capsys)
    assert line.startswith(f"error: recipe={recipe} is not valid YAML:") and "line 3" in line


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_an_empty_data_file_is_refused_naming_it(tmp_path, capsys, content):
    data = tmp_path / "empty.jsonl"
    data.write_text(content)
    out = tmp_path / "run"
    line = one_line_exit("sft", [*SFT, f"output_dir={out}", f"data.path={data}"], capsys)
    assert line == f"error: data.path={data} is empty (no rows): point it at a file with data"
    assert not out.exists()


def test_output_dir_below_a_regular_file_fails_before_data_preparation(tmp_path, capsys):
    (tmp_path / "results").write_text("a file")
    out = tmp_path / "results" / "run"
    line = one_line_exit("sft", [*SFT, f"output_dir={out}"], capsys)
    assert line == (
        f"error: output_dir={out}: {tmp_path / 'results'} is a file, not a directory; pick another output_dir"
    )


def test_deepspeed_without_a_launcher_says_how_to_launch(tmp_path, capsys, no_launcher):
    line = one_line_exit("sft", [*SFT, f"output_dir={tmp_path / 'run'}", "deepspeed=zero2"], capsys)
    assert (
        "needs a distributed launcher" in line and "torchrun --nproc_per_node=N -m mixtral_tune.sft" in line
    )


def test_deepspeed_json_with_a_word_for_the_stage_names_the_key(tmp_path, capsys):
    config = tmp_path / "ds.json"
    config.write_text(
        json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": "two"}})
    )
    line = one_line_exit("sft", [*SFT, f"output_dir={tmp_path / 'run'}", f"deepspeed={config}"], capsys)
    assert (
        line
        == "error: deepspeed zero_optimization.stage='two' is not a whole number: write 0, 1, 2 or 3 in the JSON"
    )


def test_resume_path_that_is_not_a_checkpoint_names_the_newest_one_inside(tmp_path, capsys):
    run = tmp_path / "old"
    fake_checkpoint(run / "checkpoint-3", checkpoint_files())
    line = one_line_exit("sft", [*SFT, f"output_dir={tmp_path / 'run'}", f"resume={run}"], capsys)
    assert line == (
        f"error: resume={run} is not a checkpoint-<step> directory: pass resume={run / 'checkpoint-3'} "
        "(its newest complete checkpoint)"
    )


@pytest.mark.parametrize(
    "fault", ["garbled header", "optimizer.pt missing", "no marker", "torch file garbled"]
)
def test_resume_path_gets_the_checks_resume_true_gets(tmp_path, capsys, fault):
    checkpoint = fake_checkpoint(tmp_path / "old" / "checkpoint-3", checkpoint_files())
    assert checkpoint_problem(checkpoint) is None
    if fault == "garbled header":
        garble_header(checkpoint / "model.safetensors")
    elif fault == "optimizer.pt missing":
        (checkpoint / "optimizer.pt").unlink()
    elif fault == "no marker":
        (checkpoint / "checkpoint_complete.json").unlink()
    else:
        (checkpoint / "scheduler.pt").write_bytes(b"\x00" * (checkpoint / "scheduler.pt").stat().st_size)
    expected = {
        "garbled header": "model.safetensors has an unreadable header (Error while deserializing header",
        "optimizer.pt missing": "optimizer.pt is missing",
        "no marker": "no readable checkpoint_complete.json",
        "torch file garbled": "scheduler.pt is not a readable torch.save file",
    }[fault]
    line = one_line_exit("sft", [*SFT, f"output_dir={tmp_path / 'run'}", f"resume={checkpoint}"], capsys)
    assert line.startswith(f"error: resume={checkpoint} cannot be resumed from: {expected}")
    assert checkpoint_problem(checkpoint).startswith(expected)  # resume=true skips it for the same reason


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_zero_epochs_is_refused_before_anything_is_saved(tmp_path, capsys, stage):
    recipe = SFT if stage == "sft" else DPO
    line = one_line_exit(
        stage, [*recipe, f"output_dir={tmp_path}/run", "max_steps=-1", "trainer.num_train_epochs=0"], capsys
    )
    assert line.startswith("error: trainer.num_train_epochs=0 with max_steps=-1 trains nothing")


def test_resume_allow_changes_takes_only_config_keys(tmp_path, capsys):
    line = one_line_exit(
        "sft",
        [*SFT, f"output_dir={tmp_path}/run", "resume_allow_changes=[model.architecture.hidden_sise]"],
        capsys,
    )
    assert line.startswith(
        "error: resume_allow_changes: 'model.architecture.hidden_sise' is not a config key (did you mean 'model.architecture.hidden_size'?)"
    )


def test_a_pipeline_launch_with_a_user_error_prints_one_line_and_writes_nothing(tmp_path, no_launcher):
    """The whole console of a user's launch (here: DeepSpeed without torchrun, which used to end in
    DeepSpeed's `No module named 'mpi4py'` traceback)."""
    out = tmp_path / "run"
    result = run_pipeline("sft", [*SFT, f"output_dir={out}", "deepspeed=zero2"], check=False)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and errors[0].startswith("error: deepspeed=... needs a distributed launcher")
    assert not out.exists()


def dpo_rows(path, pairs: list[tuple[str, str]]) -> None:
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Reverse: {i}"}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
        for i, (chosen, rejected) in enumerate(pairs)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_dpo_pairs_whose_chosen_equals_rejected_are_counted_or_refused(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    tokenizer = load_tokenizer()
    overrides = [*DPO, f"output_dir={tmp_path}/run", f"data.path={data}", f"data.cache_dir={tmp_path}/cache"]

    dpo_rows(data, [("b a", "a b"), ("same", "same"), ("d c", "c d"), ("x", "x")])
    cfg = load_config("dpo", overrides)
    pipeline.check_training_rows(cfg, prepare_dpo_data(cfg.data, tokenizer, 0))
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"warning: {data}: 2 of 4 training pairs have chosen equal to rejected (they add no preference signal)"
    )

    dpo_rows(data, [("same", "same"), ("x", "x"), ("y z", "y z")])
    cfg = load_config("dpo", overrides)
    with pytest.raises(SystemExit) as exited:
        pipeline.check_training_rows(cfg, prepare_dpo_data(cfg.data, tokenizer, 0))
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {data}: all 3 training pairs have chosen equal to rejected: nothing to prefer"
    )


def test_data_too_small_for_one_batch_is_zero_usable_steps(tmp_path, capsys):
    data = tmp_path / "few.jsonl"
    rows = (REPO / "data" / "sft_train.jsonl").read_text().splitlines()[:3]
    data.write_text("\n".join(rows) + "\n")
    overrides = [*SFT, f"output_dir={tmp_path}/run", f"data.path={data}", f"data.cache_dir={tmp_path}/cache"]
    cfg = load_config("sft", [*overrides, "++trainer.dataloader_drop_last=true"])
    prepared = prepare_sft_data(cfg.data, load_tokenizer(), 0)
    with pytest.raises(SystemExit):
        pipeline.check_training_rows(cfg, prepared)
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: 3 training rows on 1 rank(s) make no full batch of trainer.per_device_train_batch_size=8 with "
        "trainer.dataloader_drop_last=true: zero usable steps; lower the batch size or add rows"
    )
    pipeline.check_training_rows(load_config("sft", overrides), prepared)  # without drop_last: one batch of 3
