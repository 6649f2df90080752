"""The row formats and sources users bring: each format's converted rows against an independent
conversion of the same file (a hand-written conversion from the format's public definition, TRL's
own helpers and SFTTrainer, `datasets` reading the file), the one-line errors, data.format,
data.columns, the data plan, and the eval set following the training data."""

import json
from pathlib import Path

import datasets
import pytest
import transformers
from data_helpers import data_cfg, write_jsonl
from omegaconf import OmegaConf
from pipeline_runs import DPO, SFT, run_pipeline, train_losses
from trl import SFTConfig, SFTTrainer
from trl.data_utils import extract_prompt, is_conversational

import mixtral_tune.data as data_module
from mixtral_model import encode_chat
from mixtral_tune.config import ConfigError, DataSourceConfig, load_config
from mixtral_tune.data import IGNORE_INDEX, DataError, data_plan, prepare_dpo_data, prepare_sft_data

# ShareGPT (LLaMA-Factory data/README.md, FastChat): `conversations` of {from, value}, roles
# human/gpt/system, and the spellings user/assistant/bot/model/chatgpt.
SHAREGPT_ROWS = [
    {"conversations": [{"from": "human", "value": "Copy: a b"}, {"from": "gpt", "value": "a b"}]},
    {
        "conversations": [
            {"from": "system", "value": "Be terse."},
            {"from": "user", "value": "Reverse: a b"},
            {"from": "bot", "value": "b a"},
            {"from": "Human", "value": "Again: c d"},
            {"from": "chatgpt", "value": "d c"},
        ]
    },
    {
        "system": "Answer in capitals.",
        "conversations": [{"from": "human", "value": "hi"}, {"from": "model", "value": "HI"}],
    },
]
SHAREGPT_EXPECTED = [
    [{"role": "user", "content": "Copy: a b"}, {"role": "assistant", "content": "a b"}],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Reverse: a b"},
        {"role": "assistant", "content": "b a"},
        {"role": "user", "content": "Again: c d"},
        {"role": "assistant", "content": "d c"},
    ],
    [
        {"role": "system", "content": "Answer in capitals."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "HI"},
    ],
]
# Alpaca (tatsu-lab/stanford_alpaca; LLaMA-Factory's AlpacaDatasetConverter joins instruction and
# input with "\n" into the user turn, leaves an empty input out, and takes `system` as the system prompt).
ALPACA_ROWS = [
    {"instruction": "Copy the letters.", "input": "a b", "output": "a b", "system": ""},
    {"instruction": "Say hello.", "input": "", "output": "hello", "system": ""},
    {"instruction": "Reverse the letters.", "input": "c d", "output": "d c", "system": "Be terse."},
]
ALPACA_EXPECTED = [
    [{"role": "user", "content": "Copy the letters.\na b"}, {"role": "assistant", "content": "a b"}],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "hello"}],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Reverse the letters.\nc d"},
        {"role": "assistant", "content": "d c"},
    ],
]
TEXT_ROWS = [
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"text": "a b c d " * 30},  # longer than max_length: split by packing, never cut
    {"text": "Ends with its own EOS.</s>"},
]


pytestmark = pytest.mark.usefixtures("fresh_cache")  # tests/conftest.py


def chat_labels(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    encoded = encode_chat(tokenizer, messages)
    mask = encoded["assistant_mask"]
    return encoded["input_ids"], [
        t if m else IGNORE_INDEX for t, m in zip(encoded["input_ids"], mask, strict=True)
    ]


def assert_rows_are(tokenizer, prepared, conversations: list[list[dict]]) -> None:
    rows = prepared.train.to_list()
    assert [(row["input_ids"], row["labels"]) for row in rows] == [
        chat_labels(tokenizer, conversation) for conversation in conversations
    ]


def test_sharegpt_rows_are_the_conversations_their_definition_gives(tokenizer, tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(SHAREGPT_ROWS))
    prepared = prepare_sft_data(data_cfg(path), tokenizer, seed=0)
    assert_rows_are(tokenizer, prepared, SHAREGPT_EXPECTED)
    assert prepared.reports[0].formats == {"sharegpt": 3}


def test_alpaca_rows_from_csv_join_instruction_and_input_as_llama_factory(tokenizer, tmp_path):
    path = tmp_path / "alpaca.csv"
    datasets.Dataset.from_list(ALPACA_ROWS).to_csv(str(path), index=False)
    prepared = prepare_sft_data(data_cfg(path), tokenizer, seed=0)
    assert_rows_are(tokenizer, prepared, ALPACA_EXPECTED)
    assert prepared.reports[0].formats == {"alpaca": 3}


def test_messages_from_a_save_to_disk_directory_as_datasets_reads_them(tokenizer, tmp_path):
    rows = [{"messages": conversation} for conversation in SHAREGPT_EXPECTED]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
    ).save_to_disk(str(tmp_path / "saved"))
    prepared = prepare_sft_data(
        data_cfg(tmp_path / "saved", eval_path=str(tmp_path / "saved"), eval_split="test"), tokenizer, seed=0
    )
    reference = datasets.load_from_disk(str(tmp_path / "saved"))
    assert_rows_are(tokenizer, prepared, reference["train"]["messages"])
    eval_tokens = len(chat_labels(tokenizer, SHAREGPT_EXPECTED[0])[0])
    assert data_plan(prepared)[-1] == f"[data] eval: {tmp_path / 'saved'}[test]: 1 rows, {eval_tokens} tokens"
    assert prepared.eval.to_list() == [
        dict(zip(("input_ids", "labels"), chat_labels(tokenizer, SHAREGPT_EXPECTED[0]), strict=True))
    ]


def test_prompt_completion_rows_from_parquet_and_arrow_train_on_the_completion(tokenizer, tmp_path):
    rows = [
        {"prompt": "Copy: a b", "completion": "a b"},
        {"prompt": "Reverse: c d", "completion": "d c"},
        {"prompt": "Say hi", "completion": "hi"},
    ]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for path in (tmp_path / "rows.parquet", arrow):
        prepared = prepare_sft_data(data_cfg(path), tokenizer, seed=0)
        reference = datasets.Dataset.from_parquet(str(tmp_path / "rows.parquet"))
        assert_rows_are(
            tokenizer,
            prepared,
            [
                [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
                for r in reference
            ],
        )
        assert prepared.reports[0].formats == {"prompt_completion": 3}


def test_text_rows_are_tokenized_and_packed_as_trl_sft_trainer_does(tokenizer, tmp_path):
    """TRL's SFTTrainer (language modelling, packing with bfd_split) on the same rows is the reference."""
    path = write_jsonl(tmp_path / "text.jsonl", TEXT_ROWS)
    prepared = prepare_sft_data(data_cfg(path), tokenizer, seed=0)
    config = transformers.MixtralConfig(
        vocab_size=32000, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1,
    )  # fmt: skip
    args = SFTConfig(
        output_dir=str(tmp_path / "trl"), max_length=64, packing=True, packing_strategy="bfd_split",
        use_cpu=True, bf16=False, report_to=[], dataset_num_proc=None,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=transformers.MixtralForCausalLM(config),
        args=args,
        train_dataset=datasets.Dataset.from_list(TEXT_ROWS),
        processing_class=tokenizer,
    )
    reference = trainer.train_dataset.to_list()
    ours = prepared.train.to_list()
    assert [row["input_ids"] for row in ours] == [row["input_ids"] for row in reference]
    assert [row["seq_lengths"] for row in ours] == [row["seq_lengths"] for row in reference]
    assert all(row["labels"] == row["input_ids"] for row in ours)  # every token trained
    assert prepared.packed and prepared.reports[0].formats == {"text": 3}
    assert sum(map(len, (row["input_ids"] for row in ours))) == prepared.reports[0].tokens


def test_preference_rows_with_an_implicit_prompt_match_trl_extract_prompt(tokenizer, tmp_path):
    rows = [
        {
            "chosen": [
                {"role": "user", "content": f"Reverse: {a} {b}"},
                {"role": "assistant", "content": f"{b} {a}"},
            ],
            "rejected": [
                {"role": "user", "content": f"Reverse: {a} {b}"},
                {"role": "assistant", "content": f"{a} {b}"},
            ],
        }
        for a, b in ("ab", "cd", "ef")
    ]
    folder = tmp_path / "hub_style" / "data"
    folder.mkdir(parents=True)
    write_jsonl(folder / "train.jsonl", rows)  # a hub-style folder: datasets.load_dataset reads it
    prepared = prepare_dpo_data(data_cfg(tmp_path / "hub_style", "dpo"), tokenizer, seed=0)
    assert prepared.train.to_list() == [extract_prompt(row) for row in rows]
    assert all(is_conversational(row) for row in prepared.train)
    assert prepared.reports[0].formats == {"preference": 3}


def test_explicit_prompt_preference_rows_keep_trl_prompt_and_completions(tokenizer, tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": "Copy: a"}], "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": [{"role": "assistant", "content": "b"}]},
        {"prompt": [{"role": "user", "content": "Copy: c"}], "chosen": [{"role": "assistant", "content": "c"}],
         "rejected": [{"role": "assistant", "content": "d"}]},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    assert prepare_dpo_data(data_cfg(path, "dpo"), tokenizer, seed=0).train.to_list() == rows


def test_a_hub_source_reaches_load_dataset_with_its_config_split_and_revision(tokenizer, monkeypatch):
    """The eval split of the same hub dataset is read with the same config and revision."""
    calls = []

    def load_dataset(path, name=None, *, split, revision):
        calls.append((path, name, split, revision))
        return datasets.Dataset.from_list([{"messages": SHAREGPT_EXPECTED[0]}] * 2)

    monkeypatch.setattr(data_module.datasets, "load_dataset", load_dataset)
    cfg = data_cfg(
        "org/set", config="en", revision="v1", split="train_sft", eval_path="org/set", eval_split="test_sft"
    )
    prepared = prepare_sft_data(cfg, tokenizer, seed=0)
    assert calls == [("org/set", "en", "train_sft", "v1"), ("org/set", "en", "test_sft", "v1")]
    assert [report.source for report in prepared.reports] == ["org/set/en[train_sft]", "org/set/en[test_sft]"]


# --- errors, data.format, data.columns -------------------------------------------------------------


def test_an_unknown_sharegpt_role_is_refused_by_row_with_its_file(tokenizer, tmp_path):
    rows = [
        SHAREGPT_ROWS[0],
        {"conversations": [{"from": "human", "value": "x"}, {"from": "observation", "value": "y"}]},
    ] * 2
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(rows))
    prepared = prepare_sft_data(data_cfg(path, max_bad_fraction=1.0), tokenizer, seed=0)
    (report,) = prepared.reports
    assert report.source == str(path) and report.bad_counts == {"unknown role": 2}
    assert [example[:2] for example in report.examples] == [(1, "unknown role"), (3, "unknown role")]
    assert "'observation'" in report.examples[0][2]


def test_an_unrecognised_shape_fails_with_one_line_naming_the_columns_and_formats(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"question": "q", "answer": "a"}] * 3)
    with pytest.raises(DataError) as caught:
        prepare_sft_data(data_cfg(path), tokenizer, seed=0)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and "columns found: answer, question" in message
    for name in (
        "messages",
        "sharegpt",
        "alpaca",
        "prompt_completion",
        "text",
        "data.columns",
        "data.format",
    ):
        assert name in message


def test_data_columns_map_a_single_source_and_data_format_forces_one(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"question": "Copy: a", "answer": "a", "text": "t"}])
    cfg = data_cfg(path, columns={"question": "prompt", "answer": "completion"})
    (row,) = prepare_sft_data(cfg, tokenizer, seed=0).train.to_list()
    assert (row["input_ids"], row["labels"]) == chat_labels(
        tokenizer, [{"role": "user", "content": "Copy: a"}, {"role": "assistant", "content": "a"}]
    )
    forced = prepare_sft_data(data_cfg(path, format="text"), tokenizer, seed=0)
    assert forced.reports[0].formats == {"text": 1}
    with pytest.raises(DataError, match="missing field"):
        prepare_sft_data(data_cfg(path, format="alpaca"), tokenizer, seed=0)


def test_text_and_chat_rows_in_one_run_fail_with_one_line(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [TEXT_ROWS[0], {"messages": SHAREGPT_EXPECTED[0]}])
    with pytest.raises(DataError, match="separate runs") as caught:
        prepare_sft_data(data_cfg(path), tokenizer, seed=0)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_config_refuses_a_format_or_column_of_another_pipeline():
    with pytest.raises(ConfigError, match="data.format=preference"):
        load_config("sft", ["+recipe=tiny/sft", "data.format=preference"])
    with pytest.raises(ConfigError, match="data.columns.q=chosen"):
        load_config("sft", ["+recipe=tiny/sft", "+data.columns.q=chosen"])
    mixture = DataSourceConfig(path="x/y", columns={"q": "prompt"})
    assert mixture.columns == {"q": "prompt"}


# --- the data plan, and eval follows the data -------------------------------------------------------


def test_the_data_plan_names_sources_rows_tokens_and_eval(tokenizer, tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(SHAREGPT_ROWS * 4))
    prepared = prepare_sft_data(data_cfg(path, eval_fraction=0.25), tokenizer, seed=3)
    tokens = sum(len(chat_labels(tokenizer, c)[0]) for c in SHAREGPT_EXPECTED) * 4
    train_tokens = sum(len(row["input_ids"]) for row in prepared.train)
    eval_tokens = sum(len(row["input_ids"]) for row in prepared.eval)
    assert data_plan(prepared) == [
        f"[data] {path}: 12 rows (12 sharegpt), {tokens} tokens; 0 bad, 0 truncated, 0 dropped",
        f"[data] train: 9 rows, {train_tokens} tokens",
        f"[data] eval: data.eval_fraction=0.25 of the training rows (seed 3): 3 rows, {eval_tokens} tokens",
    ]
    assert train_tokens + eval_tokens == tokens


@pytest.mark.parametrize(
    "recipe, stage, recipe_eval",
    [
        ("mixtral-8x7b/sft_qlora", "sft", "HuggingFaceH4/ultrachat_200k"),
        ("mixtral-8x7b/dpo_qlora", "dpo", "HuggingFaceH4/ultrafeedback_binarized"),
        ("tiny/sft", "sft", "sft_eval.jsonl"),
    ],
)
def test_replacing_the_training_data_leaves_no_recipe_eval_set_behind(tmp_path, recipe, stage, recipe_eval):
    mine = write_jsonl(tmp_path / "my.jsonl", [{"messages": SHAREGPT_EXPECTED[0]}])
    assert recipe_eval in load_config(stage, [f"+recipe={recipe}"]).data.eval_path
    assert load_config(stage, [f"+recipe={recipe}", f"data.path={mine}"]).data.eval_path is None
    mixture = load_config(stage, [f"+recipe={recipe}", "data.path=null", f"+data.mixture=[{{path: {mine}}}]"])
    assert mixture.data.eval_path is None
    own = load_config(stage, [f"+recipe={recipe}", f"data.path={mine}", f"data.eval_path={mine}"])
    assert own.data.eval_path == str(mine)
    held_out = load_config(stage, [f"+recipe={recipe}", f"data.path={mine}", "data.eval_fraction=0.1"])
    assert (held_out.data.eval_path, held_out.data.eval_fraction) == (None, 0.1)


# --- each format trains 2 steps through the entry points -------------------------------------------


def write_source(tmp_path: Path, name: str) -> Path:
    """The format's fixture rows (4 times over) as the kind of source named."""
    if name == "sharegpt.json":
        (tmp_path / name).write_text(json.dumps(SHAREGPT_ROWS * 4))
    elif name == "alpaca.csv":
        datasets.Dataset.from_list(ALPACA_ROWS * 4).to_csv(str(tmp_path / name), index=False)
    elif name == "messages_saved":
        rows = [{"messages": conversation} for conversation in SHAREGPT_EXPECTED * 4]
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / name))
    elif name == "prompt_completion.parquet":
        rows = [{"prompt": f"Copy: {letter}", "completion": letter} for letter in "abcdefghijkl"]
        datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / name))
    elif name == "text.arrow":
        datasets.Dataset.from_list(TEXT_ROWS * 4).save_to_disk(str(tmp_path / "text_saved"))
        next((tmp_path / "text_saved").glob("*.arrow")).rename(tmp_path / name)
    elif name == "preference_folder":
        (tmp_path / name).mkdir()
        rows = [
            {"chosen": [{"role": "user", "content": f"Copy: {c}"}, {"role": "assistant", "content": c}],
             "rejected": [{"role": "user", "content": f"Copy: {c}"}, {"role": "assistant", "content": "x"}]}
            for c in "abcdefgh"
        ]  # fmt: skip
        write_jsonl(tmp_path / name / "train.jsonl", rows)
    elif name == "preference.jsonl":
        write_jsonl(
            tmp_path / name, [{"prompt": f"Copy: {c}", "chosen": c, "rejected": "x"} for c in "abcdefgh"]
        )
    return tmp_path / name


@pytest.mark.parametrize(
    "stage, source, row_format",
    [
        ("sft", "sharegpt.json", "sharegpt"),
        ("sft", "alpaca.csv", "alpaca"),
        ("sft", "messages_saved", "messages"),
        ("sft", "prompt_completion.parquet", "prompt_completion"),
        ("sft", "text.arrow", "text"),
        ("dpo", "preference_folder", "preference"),
        ("dpo", "preference.jsonl", "preference"),
    ],
)
def test_each_format_trains_two_steps_and_prints_its_data_plan(tmp_path, stage, source, row_format):
    """The tiny recipe with only data.path replaced: its bundled eval set must not follow (no
    data.eval_path=null here), and the plan says so."""
    path = write_source(tmp_path, source)
    recipe = [item for item in (SFT if stage == "sft" else DPO) if item != "data.eval_path=null"]
    out = tmp_path / "run"
    result = run_pipeline(stage, [*recipe, f"output_dir={out}", "max_steps=2", f"data.path={path}"])
    assert len(train_losses(out / "final")) == 2
    plan = [line for line in result.stdout.splitlines() if line.startswith("[data] ")]
    rows = {"preference_folder": 8, "preference.jsonl": 8}.get(source, 12)
    name = f"{path}[train]" if path.is_dir() else str(path)
    assert plan[0].startswith(f"[data] {name}: {rows} rows ({rows} {row_format}), ")
    assert plan[1].startswith(f"[data] train: {rows} rows, ")
    assert plan[2] == "[data] eval: none (set data.eval_path or data.eval_fraction to evaluate)"
    assert len(plan) == 3
    if row_format == "text":
        assert ", packed into " in plan[1]
        assert OmegaConf.load(out / "final" / "run_config.yaml").data.packing is True
