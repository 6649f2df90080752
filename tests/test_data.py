"""Data layer: row validation and reporting, label masking, packing, DPO rows for TRL, mixtures,
long rows, the preparation cache, and preparing once under 2 ranks."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from data_helpers import data_cfg, write_jsonl
from omegaconf import OmegaConf
from trl.data_utils import is_conversational
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

import mixtral_tune.data as data_module
from mixtral_model import encode_chat, load_tokenizer
from mixtral_tune.config import DataConfig, DataSourceConfig
from mixtral_tune.data import (
    IGNORE_INDEX,
    DataError,
    check_chat_template_matches_encode_chat,
    prepare_dpo_data,
    prepare_sft_data,
)
from mixtral_tune.shipped import DATA_DIR

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = Path(__file__).parent / "data"
SFT_BAD = TEST_DATA / "sft_bad.jsonl"
DPO_BAD = TEST_DATA / "dpo_bad.jsonl"
SFT_BAD_ROWS = {
    1: "invalid JSON",
    2: "unknown format",
    3: "wrong type",
    4: "empty text",
    5: "broken alternation",
    9: "wrong type",
    11: "wrong type",
    12: "broken alternation",
}
DPO_BAD_ROWS = {2: "missing field", 3: "wrong type", 4: "empty text", 5: "broken alternation"}
LONG_PROMPT_ROW = 6  # in both files: a prompt longer than max_length=64, dropped but not bad


pytestmark = pytest.mark.usefixtures("fresh_cache")  # tests/conftest.py


def mixture_cfg(sources: list[dict], kind="sft", **overrides):
    mixture = [DataSourceConfig(**source) for source in sources]
    return OmegaConf.structured(
        DataConfig(path=None, mixture=mixture, kind=kind, **{"max_length": 64, **overrides})
    )


def chat(*turns: str) -> list[dict]:
    return [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]


def assistant_text(tokenizer, labels: list[int]) -> str:
    return tokenizer.decode([token for token in labels if token != IGNORE_INDEX])


def test_bundled_demo_data_has_no_bad_rows(tokenizer):
    for kind, prepare in (("sft", prepare_sft_data), ("dpo", prepare_dpo_data)):
        cfg = data_cfg(
            DATA_DIR / f"{kind}_train.jsonl",
            kind,
            eval_path=str(DATA_DIR / f"{kind}_eval.jsonl"),
        )
        prepared = prepare(cfg, tokenizer, seed=0)
        assert [report.bad for report in prepared.reports] == [0, 0]
        assert len(prepared.train) > 5 * len(prepared.eval) > 0


def test_demo_eval_strings_never_appear_in_training():
    def letter_strings(name: str) -> set[str]:
        rows = [json.loads(line) for line in (DATA_DIR / name).read_text().splitlines()]
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
    assert {index: kind for index, kind, _ in report.examples} == SFT_BAD_ROWS
    assert report.dropped_long == {"prompt too long": 1}
    rows = len(SFT_BAD.read_text().splitlines())  # every line of the file is a row
    assert report.total == rows and len(prepared.train) == rows - len(SFT_BAD_ROWS) - 1
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
    assert {index: kind for index, kind, _ in report.examples} == DPO_BAD_ROWS
    assert report.dropped_long == {"prompt too long": 1}
    rows = len(DPO_BAD.read_text().splitlines())  # every line of the file is a row
    assert len(prepared.train) == report.total - len(DPO_BAD_ROWS) - 1 == rows - len(DPO_BAD_ROWS) - 1


def test_too_many_bad_rows_fail_with_one_line_naming_file_and_threshold(tokenizer):
    with pytest.raises(DataError) as caught:
        prepare_sft_data(data_cfg(SFT_BAD, max_bad_fraction=0.1), tokenizer, seed=0)
    message = str(caught.value)
    assert "\n" not in message
    assert str(SFT_BAD) in message and "8 of 13" in message and "data.max_bad_fraction=0.1" in message


def test_no_usable_rows_fail_with_one_line(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "all_bad.jsonl", [{"note": "x"}, {"messages": []}])
    with pytest.raises(DataError, match="no usable rows") as caught:
        prepare_sft_data(data_cfg(path, max_bad_fraction=1.0), tokenizer, seed=0)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_sft_file_given_to_dpo_fails_as_missing_fields(tokenizer):
    with pytest.raises(DataError, match="missing field"):
        prepare_dpo_data(data_cfg(DATA_DIR / "sft_eval.jsonl", "dpo"), tokenizer, seed=0)


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


def test_a_directory_without_data_files_fails_with_one_line(tokenizer, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="could not load dataset folder") as caught:
        prepare_sft_data(data_cfg(tmp_path / "empty"), tokenizer, seed=0)
    assert str(tmp_path / "empty") in str(caught.value) and "\n" not in str(caught.value)


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


def padding_free_batch(tokenizer, rows: list[dict]) -> dict:
    """What SFTTrainer(padding_free=True) feeds the model for these rows."""
    return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(rows)


def test_packing_restarts_positions_and_isolates_labels(tokenizer):
    cfg = data_cfg(DATA_DIR / "sft_eval.jsonl", max_length=64)
    unpacked = prepare_sft_data(cfg, tokenizer, seed=0).train.to_list()
    cfg.packing = True
    packed = prepare_sft_data(cfg, tokenizer, seed=0).train.to_list()
    assert len(packed) < len(unpacked) / 2
    sequences = []
    for row in packed:
        assert len(row["input_ids"]) == len(row["labels"]) == sum(row["seq_lengths"]) <= 64
        batch = padding_free_batch(tokenizer, [row])
        positions, labels = batch["position_ids"][0].tolist(), batch["labels"][0].tolist()
        assert "attention_mask" not in batch
        start = 0
        for length in row["seq_lengths"]:
            assert positions[start : start + length] == list(range(length))
            assert labels[start] == IGNORE_INDEX
            sequences.append((row["input_ids"][start : start + length], labels[start : start + length]))
            start += length
    expected = sorted((r["input_ids"], [IGNORE_INDEX, *r["labels"][1:]]) for r in unpacked)
    assert sorted(sequences) == expected


def test_packing_masks_a_sequence_start_even_when_every_token_trains(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"messages": chat("Copy: a", "a")}] * 3)
    cfg = data_cfg(path, completion_only=False, packing=True)
    (row,) = prepare_sft_data(cfg, tokenizer, seed=0).train.to_list()
    batch = padding_free_batch(tokenizer, [row])
    starts = [sum(row["seq_lengths"][:i]) for i in range(3)]
    assert [batch["labels"][0, s].item() for s in starts] == [IGNORE_INDEX] * 3
    assert [batch["position_ids"][0, s].item() for s in starts] == [0, 0, 0]
    assert row["labels"] == row["input_ids"]


def test_dpo_rows_are_conversational_in_trl_form(tokenizer):
    prepared = prepare_dpo_data(data_cfg(DPO_BAD, "dpo", max_bad_fraction=1.0), tokenizer, seed=0)
    expected = {
        "prompt": [{"role": "user", "content": "Copy: a b"}],
        "chosen": [{"role": "assistant", "content": "a b"}],
        "rejected": [{"role": "assistant", "content": "b a"}],
    }
    rows = prepared.train.to_list()
    assert rows.count(expected) == 2  # from strings, and from message lists
    reverse = [row for row in rows if row["prompt"] == [{"role": "user", "content": "Reverse: a b"}]]
    assert len(reverse) == 2  # implicit prompt, and a prompt repeated in chosen/rejected
    assert all(row["chosen"] == [{"role": "assistant", "content": "b a"}] for row in reverse)
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


# --- mixtures -------------------------------------------------------------------------------------


def numbered_rows(prefix: str, count: int) -> list[dict]:
    return [{"messages": chat(f"{prefix} {i}", f"answer {prefix} {i}")} for i in range(count)]


def prompts_of(dataset) -> list[str]:
    return [row["messages"][0]["content"] for row in dataset]


def decoded_prompts(tokenizer, prepared) -> list[str]:
    """The user text of every prepared SFT row, in order."""
    texts = [tokenizer.decode(row["input_ids"]) for row in prepared.train]
    return [text.split("[INST] ", 1)[1].split(" [/INST]", 1)[0] for text in texts]


def test_mixture_weights_take_the_handbook_fraction_of_each_source(tokenizer, tmp_path):
    """alignment-handbook: each source shuffled with the seed, its first int(len * weight) rows kept."""
    first = write_jsonl(tmp_path / "first.jsonl", numbered_rows("first", 40))
    second_rows = numbered_rows("second", 30)
    second = tmp_path / "second.parquet"
    datasets.Dataset.from_list(second_rows).to_parquet(str(second))
    cfg = mixture_cfg([{"path": str(first), "weight": 0.25}, {"path": str(second), "weight": 0.5}])
    prepared = prepare_sft_data(cfg, tokenizer, seed=7)

    handbook = [
        datasets.Dataset.from_list(rows).shuffle(seed=7).select(range(int(len(rows) * weight)))
        for rows, weight in ((numbered_rows("first", 40), 0.25), (second_rows, 0.5))
    ]
    expected = prompts_of(datasets.concatenate_datasets(handbook).shuffle(seed=7))
    assert decoded_prompts(tokenizer, prepared) == expected  # same rows, same order
    assert [report.total for report in prepared.reports] == [10, 15]
    assert [report.source for report in prepared.reports] == [str(first), str(second)]


def test_mixture_is_reproducible_with_a_seed_and_changes_with_another(tokenizer, tmp_path):
    first = write_jsonl(tmp_path / "first.jsonl", numbered_rows("first", 40))
    second = write_jsonl(tmp_path / "second.jsonl", numbered_rows("second", 40))
    sources = [{"path": str(first), "weight": 0.5}, {"path": str(second), "weight": 0.5}]
    runs = [
        decoded_prompts(
            tokenizer,
            prepare_sft_data(mixture_cfg(sources, cache_dir=str(tmp_path / f"c{n}")), tokenizer, seed),
        )
        for n, seed in enumerate((1, 1, 2))
    ]
    assert runs[0] == runs[1]
    assert set(runs[0]) != set(runs[2])
    assert (
        sum(text.startswith("first") for text in runs[0])
        == sum(text.startswith("second") for text in runs[0])
        == int(0.5 * 40)  # the handbook's rule: a weight is the fraction of the source's rows taken
    )


def test_mixture_renames_columns_and_holds_out_a_test_fraction(tokenizer, tmp_path):
    renamed = [
        {"conversation": row["messages"], "id": n} for n, row in enumerate(numbered_rows("renamed", 20))
    ]
    source = write_jsonl(tmp_path / "renamed.jsonl", renamed)
    plain = write_jsonl(tmp_path / "plain.jsonl", numbered_rows("plain", 20))
    cfg = mixture_cfg(
        [{"path": str(source), "columns": {"conversation": "messages"}}, {"path": str(plain)}],
        eval_fraction=0.25,
    )
    prepared = prepare_sft_data(cfg, tokenizer, seed=0)
    assert [report.bad for report in prepared.reports] == [0, 0]
    assert (len(prepared.train), len(prepared.eval)) == (30, 10)
    held = {tuple(row["input_ids"]) for row in prepared.eval}
    assert not held & {tuple(row["input_ids"]) for row in prepared.train}


def test_bad_rows_are_reported_with_their_source_and_row_in_a_mixture(tokenizer, tmp_path, caplog):
    good = numbered_rows("row", 10)
    first = write_jsonl(tmp_path / "first.jsonl", good[:3] + [{"messages": "not a list"}] + good[3:])
    second = write_jsonl(tmp_path / "second.jsonl", good[:7] + [{"note": "no chat"}] + good[7:])
    sources = [{"path": str(first), "weight": 1.0}, {"path": str(second), "weight": 1.0}]
    with caplog.at_level(logging.WARNING):
        prepared = prepare_sft_data(mixture_cfg(sources), tokenizer, seed=0)
    reports = {report.source: report for report in prepared.reports}
    assert [row[:2] for row in reports[str(first)].examples] == [(3, "wrong type")]
    assert [row[:2] for row in reports[str(second)].examples] == [(7, "unknown format")]
    assert f"{first}: 11 rows, 1 bad" in caplog.text and "  row 3: wrong type" in caplog.text
    assert f"{second}: 11 rows, 1 bad" in caplog.text and "  row 7: unknown format" in caplog.text


def test_a_row_index_is_the_line_in_the_file_even_for_a_weighted_source(tokenizer, tmp_path):
    rows = numbered_rows("row", 20)
    rows[13] = {"messages": [{"role": "user", "content": "x"}]}  # no assistant message
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    for seed in range(20):  # find a seed whose half of the rows includes line 13
        cfg = mixture_cfg([{"path": str(path), "weight": 0.5}], cache_dir=str(tmp_path / f"c{seed}"))
        (report,) = prepare_sft_data(cfg, tokenizer, seed=seed).reports
        if report.bad:
            assert report.examples == [
                (13, "broken alternation", "'messages' must end with an assistant message")
            ]
            return
    pytest.fail("no seed selected line 13")


def test_data_path_and_mixture_are_exclusive(tmp_path):
    from mixtral_tune.config import ConfigError, check_data

    path = write_jsonl(tmp_path / "rows.jsonl", numbered_rows("row", 2))
    both = OmegaConf.create({"stage": "sft", "data": mixture_cfg([{"path": str(path)}])})
    both.data.path = str(path)
    with pytest.raises(ConfigError, match="data.path and data.mixture"):
        check_data(both)
    heavy = OmegaConf.create({"stage": "sft", "data": mixture_cfg([{"path": str(path), "weight": 1.5}])})
    with pytest.raises(ConfigError, match=r"data.mixture\[0\].weight=1.5"):
        check_data(heavy)


# --- long rows ------------------------------------------------------------------------------------


def long_rows() -> list[dict]:
    words = " ".join(["word"] * 60)
    return [
        {"messages": chat("Copy: a b", "a b")},  # fits
        {"messages": chat("Copy: a b", f"a b {words}")},  # long completion: truncated
        {"messages": chat(f"Copy: {words}", "a b")},  # prompt alone too long: dropped
        {"prompt": "Say it:", "completion": words},  # long completion: truncated
    ]


def test_long_sft_rows_keep_the_prompt_and_cut_the_completion(tokenizer, tmp_path):
    rows = long_rows()
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    prepared = prepare_sft_data(data_cfg(path, max_length=32, max_bad_fraction=0.0), tokenizer, seed=0)
    (report,) = prepared.reports
    assert (report.bad, report.truncated, report.dropped_long) == (0, 2, {"prompt too long": 1})
    by_ids = {tuple(row["input_ids"]): row["labels"] for row in prepared.train}
    for row in (
        rows[1]["messages"],
        [{"role": "user", "content": "Say it:"}, {"role": "assistant", "content": rows[3]["completion"]}],
    ):
        encoded = encode_chat(tokenizer, row)
        labels = by_ids[tuple(encoded["input_ids"][:32])]  # the first 32 tokens: whole prompt, cut completion
        mask = encoded["assistant_mask"][:32]
        assert labels == [
            t if m else IGNORE_INDEX for t, m in zip(encoded["input_ids"][:32], mask, strict=True)
        ]
    assert tuple(encode_chat(tokenizer, rows[0]["messages"])["input_ids"]) in by_ids


def test_truncation_drop_drops_every_long_row_and_counts_it(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", long_rows())
    prepared = prepare_sft_data(data_cfg(path, max_length=32, truncation="drop"), tokenizer, seed=0)
    (report,) = prepared.reports
    assert (report.bad, report.truncated, report.dropped_long) == (0, 0, {"too long": 3})
    assert len(prepared.train) == 1


def test_long_rows_never_fail_a_run_by_themselves(tokenizer, tmp_path):
    words = " ".join(["word"] * 60)
    path = write_jsonl(
        tmp_path / "long.jsonl", [{"messages": chat("Copy:", words)}] * 9 + [{"messages": chat("a", "b")}]
    )
    for truncation in ("truncate", "drop"):
        cfg = data_cfg(path, max_length=32, truncation=truncation, max_bad_fraction=0.0)
        prepared = prepare_sft_data(cfg, tokenizer, seed=0)
        assert len(prepared.train) == (10 if truncation == "truncate" else 1)


def test_long_dpo_rows_are_left_to_trl_truncation_or_dropped(tokenizer, tmp_path):
    words = " ".join(["word"] * 60)
    rows = [
        {"prompt": "Copy: a b", "chosen": "a b", "rejected": "b a"},
        {"prompt": "Copy: a b", "chosen": f"a b {words}", "rejected": "b a"},  # truncated by TRL
        {"prompt": f"Copy: {words}", "chosen": "a b", "rejected": "b a"},  # prompt fills max_length
    ]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    expected = {
        ("truncate", "keep_start"): (1, {"prompt too long": 1}, 2),
        ("truncate", "keep_end"): (2, {}, 3),
        ("drop", "keep_start"): (0, {"too long": 2}, 1),
    }
    for (truncation, mode), (truncated, dropped, kept) in expected.items():
        cfg = data_cfg(path, "dpo", max_length=32, truncation=truncation, dpo_truncation_mode=mode)
        prepared = prepare_dpo_data(cfg, tokenizer, seed=0)
        (report,) = prepared.reports
        assert (report.truncated, report.dropped_long, len(prepared.train)) == (truncated, dropped, kept)


# --- cache and once per job ------------------------------------------------------------------------


def test_a_second_prepare_reads_the_cache_and_tokenizes_nothing(tokenizer, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "rows.jsonl", numbered_rows("row", 30) + [{"note": "bad"}])
    cfg = data_cfg(path, eval_fraction=0.1, packing=True)
    first = prepare_sft_data(cfg, tokenizer, seed=0)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the second prepare tokenized a row")

    monkeypatch.setattr(data_module, "encode_chat", no_tokenizing)
    cfg.max_bad_fraction = 0.5  # budgets are checked after reading: no re-preparation
    again = prepare_sft_data(cfg, tokenizer, seed=0)
    assert again.train.to_list() == first.train.to_list() and again.eval.to_list() == first.eval.to_list()
    assert again.reports == first.reports
    assert all(file["filename"].startswith(str(tmp_path / "cache")) for file in again.train.cache_files)
    for changed in ({"max_length": 48}, {"completion_only": False}):
        with pytest.raises(AssertionError, match="tokenized a row"):
            prepare_sft_data(data_cfg(path, eval_fraction=0.1, packing=True, **changed), tokenizer, seed=0)
    with pytest.raises(AssertionError, match="tokenized a row"):
        prepare_sft_data(cfg, tokenizer, seed=1)
    write_jsonl(path, numbered_rows("row", 31))  # the file changed
    with pytest.raises(AssertionError, match="tokenized a row"):
        prepare_sft_data(cfg, tokenizer, seed=0)


def test_worker_processes_give_the_same_rows_as_one(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "MIN_ROWS_PER_PROC", 10)
    path = write_jsonl(tmp_path / "rows.jsonl", numbered_rows("row", 40) + [{"note": "bad"}])
    one = prepare_sft_data(data_cfg(path, num_proc=1, cache_dir=str(tmp_path / "one")), tokenizer, seed=0)
    two = prepare_sft_data(data_cfg(path, num_proc=2, cache_dir=str(tmp_path / "two")), tokenizer, seed=0)
    assert one.train.to_list() == two.train.to_list() and one.reports == two.reports


@pytest.mark.distributed
def test_two_ranks_tokenize_the_set_once(tmp_path):
    """torchrun, 2 ranks: rank 0 prepares, rank 1 waits and reads the cache; both see the same rows."""
    path = write_jsonl(tmp_path / "rows.jsonl", numbered_rows("row", 50))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={29500 + os.getpid() % 1000}", str(REPO / "tests" / "distributed" / "data_once.py"),
        str(path), str(tmp_path / "cache"), str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [rank["encode_chat_calls"] for rank in ranks] == [50, 0]
    assert ranks[0]["rows"] == ranks[1]["rows"]
    assert ranks[0]["gathered_equal"] is True


def test_the_local_main_of_each_node_or_only_the_global_main_prepares(monkeypatch):
    monkeypatch.setenv("RANK", "8")
    monkeypatch.setenv("LOCAL_RANK", "0")  # first rank of the second node
    assert data_module.is_preparer("local_main") and not data_module.is_preparer("global_main")
    monkeypatch.setenv("RANK", "0")
    assert data_module.is_preparer("global_main")


def test_the_mixture_data_group_composes_with_an_8x7b_recipe():
    from mixtral_tune.config import load_config

    cfg = load_config("sft", ["+recipe=mixtral-8x7b/sft_qlora", "data=ultrachat_no_robots"])
    assert cfg.data.path is None and cfg.data.packing  # the recipe's data settings still apply
    assert [(s.path, s.split, s.weight) for s in cfg.data.mixture] == [
        ("HuggingFaceH4/ultrachat_200k", "train_sft", 1.0),
        ("HuggingFaceH4/no_robots", "train", 0.5),
    ]


def test_a_source_with_only_long_rows_fails_with_one_line_naming_the_fix(tokenizer, tmp_path):
    words = " ".join(["word"] * 60)
    path = write_jsonl(tmp_path / "long.jsonl", [{"messages": chat(words, "a")}] * 3)
    with pytest.raises(DataError, match="all 3 dropped as long") as caught:
        prepare_sft_data(data_cfg(path, max_length=32), tokenizer, seed=0)
    assert "raise data.max_length" in str(caught.value) and "\n" not in str(caught.value)


def test_message_text_spelling_control_tokens_stays_text(tokenizer, tmp_path):
    """Rows go through encode_chat, which encodes `</s>`, `<s>` in message text as text (mistral-common)."""
    conversation = chat("Say </s> and <s> please", "ok </s> done")
    path = write_jsonl(tmp_path / "rows.jsonl", [{"messages": conversation}])
    (row,) = prepare_sft_data(data_cfg(path), tokenizer, seed=0).train.to_list()
    assert row["input_ids"] == encode_chat(tokenizer, conversation)["input_ids"]
    assert (
        row["input_ids"].count(tokenizer.eos_token_id) == 1 and row["input_ids"][-1] == tokenizer.eos_token_id
    )
    assert row["input_ids"].count(tokenizer.bos_token_id) == 1


def test_a_single_source_keeps_its_order(tokenizer, tmp_path):
    rows = numbered_rows("row", 20)
    prepared = prepare_sft_data(data_cfg(write_jsonl(tmp_path / "rows.jsonl", rows)), tokenizer, seed=3)
    assert decoded_prompts(tokenizer, prepared) == prompts_of(rows)
