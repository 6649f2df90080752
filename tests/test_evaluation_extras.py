"""evaluation.*: sample generations at each evaluation (console and trackers) and early stopping.

References: transformers' `MixtralForCausalLM.generate` (greedy) on the saved final model, prompts
from transformers' `apply_chat_template`; transformers' `EarlyStoppingCallback` rule; tensorboard's
own event reader for what reached the tracker.
"""

import json

import pytest
import torch
import transformers
from pipeline_runs import SMALL_MODEL
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mixtral_model import load_tokenizer
from mixtral_tune import sft
from mixtral_tune.config import ConfigError, load_config
from mixtral_tune.shipped import DATA_DIR

EVALUATING = [
    "+recipe=tiny/sft",
    *[
        o
        for o in SMALL_MODEL
        if not o.startswith(("data.eval_path", "trainer.eval_steps", "trainer.report_to"))
    ],
    "trainer.per_device_train_batch_size=8",
    "trainer.per_device_eval_batch_size=64",
    "trainer.learning_rate=3e-3",
]


def completions_at(text: str, step: int) -> list[str]:
    block = text.split(f"samples at step {step} ")[1].split("\n\n")[0]
    return [
        eval(line.split("] completion: ", 1)[1]) for line in block.splitlines() if "] completion: " in line
    ]  # noqa: S307


def test_samples_are_greedy_generations_of_the_model_at_that_step(tmp_path, capsys):
    out = tmp_path / "run"
    final = sft.main([*EVALUATING, "max_steps=2", "trainer.eval_steps=2", "trainer.report_to=tensorboard",
                      "evaluation.sample_prompts=2", "evaluation.sample_max_new_tokens=6",
                      f"output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}"])  # fmt: skip
    logged = completions_at(capsys.readouterr().out, step=2)

    tokenizer = load_tokenizer()
    model = transformers.MixtralForCausalLM.from_pretrained(final).eval()
    rows = [json.loads(line) for line in (DATA_DIR / "sft_eval.jsonl").read_text().splitlines()[:2]]
    expected = []
    for row in rows:
        ids = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=True, return_dict=True)[
            "input_ids"
        ]
        generated = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        expected.append(tokenizer.decode(generated[0, len(ids) :], skip_special_tokens=True))
    assert logged == expected

    events = EventAccumulator(str(next((out / "runs").iterdir())), size_guidance={"tensors": 0})
    events.Reload()
    texts = [tag for tag in events.Tags()["tensors"] if tag.startswith("completions/")]
    assert sorted(texts) == ["completions/0/text_summary", "completions/1/text_summary"]
    logged_text = events.Tensors("completions/0/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert logged_text.endswith(f"→ {expected[0]}")


def test_early_stopping_stops_where_transformers_rule_says(tmp_path):
    out = tmp_path / "run"
    # A threshold no step can beat: the first evaluation sets the best, the next one counts against patience.
    sft.main([*EVALUATING, "max_steps=6", "trainer.eval_steps=1", "trainer.save_steps=1", "trainer.report_to=none",
              "+trainer.load_best_model_at_end=true", "evaluation.early_stopping_patience=2",
              "evaluation.early_stopping_threshold=100", f"output_dir={out}",
              f"data.cache_dir={tmp_path / 'cache'}"])  # fmt: skip
    state = json.loads((out / "final" / "trainer_state.json").read_text())
    evaluations = [entry["step"] for entry in state["log_history"] if "eval_loss" in entry]
    assert evaluations == [1, 2, 3]  # best at 1, then 2 evaluations without improvement: stop
    assert state["global_step"] == 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["evaluation.sample_prompts=2", "trainer.eval_steps=null"], "this run does not evaluate"),
        (["evaluation.early_stopping_patience=2", "data.eval_path=null"], "this run does not evaluate"),
        (["evaluation.early_stopping_patience=2"], "needs trainer.load_best_model_at_end=true"),
        (["evaluation.early_stopping_patience=2", "+trainer.load_best_model_at_end=true", "trainer.save_steps=150"],
         "save_steps (150) to be a multiple of trainer.eval_steps (100)"),
        (["evaluation.sample_prompts=1", "data.completion_only=false"], "needs data.completion_only=true"),
        (["evaluation.sample_prompts=-1"], "use a count >= 0"),
    ],
)  # fmt: skip
def test_evaluation_settings_that_cannot_work_are_one_line_errors(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config("sft", ["+recipe=tiny/sft", f"output_dir={tmp_path}", *overrides])
    assert message in str(caught.value) and "\n" not in str(caught.value)
