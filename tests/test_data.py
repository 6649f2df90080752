"""Data layer: row validation and reporting, label masking, packing, DPO rows for TRL."""

import json
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from trl.data_utils import is_conversational

from mixtral_model import encode_chat, load_tokenizer
from train.config import REPO_ROOT, DataConfig
from train.data import (
    IGNORE_INDEX,
    DataError,
    best_fit_bins,
    check_chat_template_matches_encode_chat,
    prepare_dpo_data,
    prepare_sft_data,
)

TEST_DATA = Path(__file__).parent / "data"
SFT_BAD = TEST_DATA / "sft_bad.jsonl"
DPO_BAD = TEST_DATA / "dpo_bad.jsonl"
SFT_BAD_ROWS = {
    1: "invalid JSON",
    2: "missing field",
    3: "wrong type",
    4: "empty text",
    5: "broken alternation",
    6: "too long",
    9: "wrong type",
    11: "wrong type",
    12: "broken alternation",
}
DPO_BAD_ROWS = {2: "missing field", 3: "wrong type", 4: "empty text", 5: "broken alternation", 6: "too long"}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def data_cfg(path, kind="sft", **overrides):
    return OmegaConf.structured(DataConfig(path=str(path), kind=kind, **{"max_length": 64, **overrides}))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def chat(*turns: str) -> list[dict]:
    return [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]


def assistant_text(tokenizer, labels: list[int]) -> str:
    return tokenizer.decode([token for token in labels if token != IGNORE_INDEX])


def test_bundled_demo_data_has_no_bad_rows(tokenizer):
    for kind, prepare in (("sft", prepare_sft_data), ("dpo", prepare_dpo_data)):
        cfg = data_cfg(
            REPO_ROOT / "data" / f"{kind}_train.jsonl",
            kind,
            eval_path=str(REPO_ROOT / "data" / f"{kind}_eval.jsonl"),
        )
        prepared = prepare(cfg, tokenizer, seed=0)
        assert [report.bad for report in prepared.reports] == [[], []]
        assert len(prepared.train) > 5 * len(prepared.eval) > 0


def test_demo_eval_strings_never_appear_in_training():
    def letter_strings(name: str) -> set[str]:
        rows = [json.loads(line) for line in (REPO_ROOT / "data" / name).read_text().splitlines()]
        prompts = [
            row["messages"][0]["content"] if "messages" in row else row["prompt"][0]["content"]
            for row in rows
        ]
        return {prompt.split(": ", 1)[1] for prompt in prompts}

    held_out = letter_strings("sft_eval.jsonl") | letter_strings("dpo_eval.jsonl")
    assert not held_out & (letter_strings("sft_train.jsonl") | letter_strings("dpo_train.jsonl"))


def test_each_kind_of_bad_sft_row_is_reported_with_file_and_row(tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        prepared = prepare_sft_data(
            data_cfg(SFT_BAD, max_bad_fraction=1.0, max_reported_bad_rows=20), tokenizer, seed=0
        )
    (report,) = prepared.reports
    assert {index: reason.kind for index, reason in report.bad} == SFT_BAD_ROWS
    assert report.total == 13 and len(prepared.train) == 13 - len(SFT_BAD_ROWS)
    assert str(SFT_BAD) in caplog.text
    for index, kind in SFT_BAD_ROWS.items():
        assert f"row {index}: {kind}" in caplog.text


def test_bad_row_report_shows_at_most_the_configured_examples(tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        prepare_sft_data(data_cfg(SFT_BAD, max_bad_fraction=1.0, max_reported_bad_rows=2), tokenizer, seed=0)
    assert caplog.text.count("  row ") == 2
    assert f"... and {len(SFT_BAD_ROWS) - 2} more" in caplog.text


def test_each_kind_of_bad_dpo_row_is_reported_with_file_and_row(tokenizer):
    prepared = prepare_dpo_data(data_cfg(DPO_BAD, "dpo", max_bad_fraction=1.0), tokenizer, seed=0)
    (report,) = prepared.reports
    assert {index: reason.kind for index, reason in report.bad} == DPO_BAD_ROWS
    assert len(prepared.train) == report.total - len(DPO_BAD_ROWS) == 4


def test_too_many_bad_rows_fail_with_one_line_naming_file_and_threshold(tokenizer):
    with pytest.raises(DataError) as caught:
        prepare_sft_data(data_cfg(SFT_BAD, max_bad_fraction=0.1), tokenizer, seed=0)
    message = str(caught.value)
    assert "\n" not in message
    assert str(SFT_BAD) in message and "9 of 13" in message and "data.max_bad_fraction=0.1" in message


def test_no_usable_rows_fail_with_one_line(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "all_bad.jsonl", [{"text": "x"}, {"messages": []}])
    with pytest.raises(DataError, match="no usable rows") as caught:
        prepare_sft_data(data_cfg(path, max_bad_fraction=1.0), tokenizer, seed=0)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_sft_file_given_to_dpo_fails_as_missing_fields(tokenizer):
    with pytest.raises(DataError, match="missing field"):
        prepare_dpo_data(data_cfg(REPO_ROOT / "data" / "sft_eval.jsonl", "dpo"), tokenizer, seed=0)


@pytest.mark.parametrize("path", ["./no/such/train.jsonl", "/no/such/train.parquet", "missing.json"])
def test_missing_local_file_names_it(tokenizer, path):
    with pytest.raises(FileNotFoundError, match="data file not found") as caught:
        prepare_sft_data(data_cfg(path), tokenizer, seed=0)
    assert path in str(caught.value)


def test_unreachable_hub_dataset_fails_with_one_line(tokenizer):
    """conftest.py sets HF_HUB_OFFLINE=1, so this never touches the network."""
    with pytest.raises(DataError, match="could not load hub dataset 'no-such-org/no-such-set'") as caught:
        prepare_sft_data(data_cfg("no-such-org/no-such-set"), tokenizer, seed=0)
    assert "\n" not in str(caught.value)


def test_a_directory_is_not_a_data_file(tokenizer, tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        prepare_sft_data(data_cfg(tmp_path), tokenizer, seed=0)


def test_json_and_parquet_files_load_like_jsonl(tokenizer, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"messages": chat("Copy: a b", "a b")}, {"messages": chat("Reverse: a b", "b a")}]
    jsonl = write_jsonl(tmp_path / "rows.jsonl", rows)
    as_json = tmp_path / "rows.json"
    as_json.write_text(json.dumps(rows))
    as_parquet = tmp_path / "rows.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(as_parquet))
    expected = prepare_sft_data(data_cfg(jsonl), tokenizer, seed=0).train.to_list()
    for path in (as_json, as_parquet):
        assert prepare_sft_data(data_cfg(path), tokenizer, seed=0).train.to_list() == expected


def test_labels_cover_exactly_the_assistant_tokens(tokenizer, tmp_path):
    conversation = [
        {"role": "system", "content": "Be terse."},
        *chat("Copy: a b", "a b", "Reverse: c d", "d c"),
    ]
    path = write_jsonl(tmp_path / "rows.jsonl", [{"messages": conversation}])
    (row,) = prepare_sft_data(data_cfg(path), tokenizer, seed=0).train.to_list()
    encoded = encode_chat(tokenizer, conversation)
    assert row["input_ids"] == encoded["input_ids"]
    expected = [
        t if m else IGNORE_INDEX for t, m in zip(encoded["input_ids"], encoded["assistant_mask"], strict=True)
    ]
    assert row["labels"] == expected
    assert assistant_text(tokenizer, row["labels"]) == "a b</s> d c</s>"


def test_prompt_completion_rows_train_on_the_completion_only(tokenizer, tmp_path):
    prompt = chat("Copy: a b", "a b", "Reverse: c d")
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": prompt, "completion": "d c"}])
    (row,) = prepare_sft_data(data_cfg(path), tokenizer, seed=0).train.to_list()
    assert assistant_text(tokenizer, row["labels"]) == "d c</s>"


def test_completion_only_off_trains_on_every_token(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"messages": chat("Copy: a b", "a b")}])
    (row,) = prepare_sft_data(data_cfg(path, completion_only=False), tokenizer, seed=0).train.to_list()
    assert row["labels"] == row["input_ids"]


def test_eval_fraction_holds_out_rows_deterministically(tokenizer, tmp_path):
    rows = [{"messages": chat(f"Copy: {letter}", letter)} for letter in "abcdefghij"]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    first = prepare_sft_data(data_cfg(path, eval_fraction=0.2), tokenizer, seed=3)
    again = prepare_sft_data(data_cfg(path, eval_fraction=0.2), tokenizer, seed=3)
    assert (len(first.train), len(first.eval)) == (8, 2)
    assert first.eval.to_list() == again.eval.to_list()
    held = {tuple(row["input_ids"]) for row in first.eval}
    assert not held & {tuple(row["input_ids"]) for row in first.train}


def test_packing_restarts_positions_and_isolates_labels(tokenizer):
    cfg = data_cfg(REPO_ROOT / "data" / "sft_eval.jsonl", max_length=64)
    unpacked = prepare_sft_data(cfg, tokenizer, seed=0).train.to_list()
    cfg.packing = True
    packed = prepare_sft_data(cfg, tokenizer, seed=0).train.to_list()
    assert len(packed) < len(unpacked) / 2
    sequences = []
    for row in packed:
        assert (
            len(row["input_ids"])
            == len(row["labels"])
            == len(row["position_ids"])
            == sum(row["seq_lengths"])
            <= 64
        )
        start = 0
        for length in row["seq_lengths"]:
            assert row["position_ids"][start : start + length] == list(range(length))
            assert row["labels"][start] == IGNORE_INDEX
            sequences.append(
                (row["input_ids"][start : start + length], row["labels"][start : start + length])
            )
            start += length
    expected = sorted((r["input_ids"], [IGNORE_INDEX, *r["labels"][1:]]) for r in unpacked)
    assert sorted(sequences) == expected


def test_packing_masks_a_sequence_start_even_when_every_token_trains(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"messages": chat("Copy: a", "a")}] * 3)
    cfg = data_cfg(path, completion_only=False, packing=True)
    (row,) = prepare_sft_data(cfg, tokenizer, seed=0).train.to_list()
    starts = [sum(row["seq_lengths"][:i]) for i in range(3)]
    assert [row["labels"][s] for s in starts] == [IGNORE_INDEX] * 3
    assert [row["position_ids"][s] for s in starts] == [0, 0, 0]


def test_best_fit_bins_place_every_sequence_once_within_capacity():
    lengths = [5, 9, 1, 7, 3, 3, 10, 2, 8, 4]
    bins = best_fit_bins(lengths, capacity=10)
    assert sorted(index for members in bins for index in members) == list(range(len(lengths)))
    assert all(sum(lengths[index] for index in members) <= 10 for members in bins)
    assert len(bins) == 6  # total 52 -> at least 6 bins of 10


def test_dpo_rows_are_conversational_in_trl_form(tokenizer):
    prepared = prepare_dpo_data(data_cfg(DPO_BAD, "dpo", max_bad_fraction=1.0), tokenizer, seed=0)
    expected = {
        "prompt": [{"role": "user", "content": "Copy: a b"}],
        "chosen": [{"role": "assistant", "content": "a b"}],
        "rejected": [{"role": "assistant", "content": "b a"}],
    }
    rows = prepared.train.to_list()
    assert rows[0] == rows[1] == expected  # from strings, and from message lists
    assert (
        rows[2]["prompt"] == rows[3]["prompt"] == [{"role": "user", "content": "Reverse: a b"}]
    )  # implicit, repeated
    assert rows[2]["chosen"] == rows[3]["chosen"] == [{"role": "assistant", "content": "b a"}]
    assert all(is_conversational(row) for row in rows)


def test_trl_tokenization_of_dpo_rows_matches_encode_chat(tokenizer):
    """DPOTrainer renders prompt (with generation prompt) and prompt+chosen with the chat template."""
    row = prepare_dpo_data(data_cfg(DPO_BAD, "dpo", max_bad_fraction=1.0), tokenizer, seed=0).train[0]
    prompt_ids = tokenizer.apply_chat_template(
        row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    full_ids = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=True, return_dict=True)
    assert full_ids["input_ids"][: len(prompt_ids["input_ids"])] == prompt_ids["input_ids"]
    assert full_ids["input_ids"] == encode_chat(tokenizer, row["prompt"] + row["chosen"])["input_ids"]


def test_a_chat_template_that_differs_from_encode_chat_is_refused(tokenizer):
    other = load_tokenizer()
    other.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    row = {"prompt": chat("Copy: a"), "chosen": [{"role": "assistant", "content": "a"}]}
    check_chat_template_matches_encode_chat(tokenizer, row)
    with pytest.raises(DataError, match="chat template"):
        check_chat_template_matches_encode_chat(other, row)
