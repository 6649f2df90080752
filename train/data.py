"""Datasets of the SFT and DPO pipelines: load, validate every row, tokenize, pack.

Sources: a local `.jsonl` / `.json` / `.parquet` file (chosen by extension), or a hub dataset name
when the path is not a local file. A path that looks local but does not exist is a
FileNotFoundError naming it, never a hub lookup.

Rows (TRL conventions):
  SFT  `messages`: [{role, content}, ...] (optional system first, then user/assistant alternating,
       ending with assistant), or `prompt` + `completion`, each a string or a message list.
  DPO  `prompt` (string or message list ending with a user turn) + `chosen` + `rejected` (strings
       or assistant-message lists; a chosen/rejected list that repeats the prompt has it stripped).
       Without `prompt`, the messages shared by chosen and rejected are the prompt.

Every row is checked: invalid JSON, missing field, wrong type, empty text, broken role
alternation, too long after tokenization (> data.max_length). Bad rows are dropped and reported
(file and row index, a few examples); loading fails with one line when no rows remain or when
more than data.max_bad_fraction of them are bad. Row indices are 0-based (for .jsonl: the line).

Outputs:
  SFT  `input_ids`, `labels` (-100 outside the assistant turns, or outside the completion for
       prompt/completion rows, when data.completion_only). With data.packing, rows are packed up
       to data.max_length and also carry `position_ids` restarting at 0 for every sequence and
       `seq_lengths` (TRL's packed-row column); the first label of every sequence is -100 so no
       token is trained to predict across a boundary.
  DPO  conversational rows {prompt, chosen, rejected} as TRL's DPOTrainer takes them; it renders
       them with the tokenizer's chat template, checked here to match `encode_chat`.
"""

import bisect
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from mixtral_model import encode_chat
from train.config import looks_like_local_path

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
LOCAL_FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A dataset a user can fix: the message names the file and the fix, on one line."""


class BadRow(ValueError):
    """Why one row is unusable; `kind` groups the reasons in the summary."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass
class RowReport:
    """Bad rows found in one source, and how many rows it had."""

    source: str
    total: int = 0
    bad: list[tuple[int, BadRow]] = field(default_factory=list)

    @property
    def bad_fraction(self) -> float:
        return len(self.bad) / self.total if self.total else 0.0

    def counts(self) -> str:
        by_kind = Counter(reason.kind for _, reason in self.bad)
        return ", ".join(f"{kind}: {count}" for kind, count in sorted(by_kind.items()))

    def summary(self, max_examples: int) -> str:
        lines = [f"{self.source}: {len(self.bad)} of {self.total} rows bad ({self.counts()})"]
        lines += [f"  row {index}: {reason}" for index, reason in self.bad[:max_examples]]
        if len(self.bad) > max_examples:
            lines.append(f"  ... and {len(self.bad) - max_examples} more")
        return "\n".join(lines)


@dataclass
class PreparedData:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    reports: list[RowReport]


@dataclass
class SftExample:
    messages: list[dict]
    num_prompt_messages: int | None = None  # prompt/completion rows: loss only after these messages


@dataclass
class DpoExample:
    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]


def prepare_sft_data(data_cfg: Any, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreparedData:
    """Tokenized (and optionally packed) SFT train/eval datasets from `cfg.data`."""

    def tokenize(row: Any) -> dict:
        return tokenize_sft_example(
            tokenizer, parse_sft_row(row), data_cfg.max_length, data_cfg.completion_only
        )

    train_rows, eval_rows, reports = load_validated_splits(data_cfg, tokenize, seed)
    to_dataset = partial(pack_rows, max_length=data_cfg.max_length) if data_cfg.packing else unpacked_rows
    return PreparedData(
        train=to_dataset(train_rows),
        eval=to_dataset(eval_rows) if eval_rows is not None else None,
        reports=reports,
    )


def prepare_dpo_data(data_cfg: Any, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreparedData:
    """Conversational prompt/chosen/rejected train/eval datasets for TRL's DPOTrainer from `cfg.data`."""

    def check(row: Any) -> dict:
        example = parse_dpo_row(row)
        check_dpo_length(tokenizer, example, data_cfg.max_length)
        return {"prompt": example.prompt, "chosen": example.chosen, "rejected": example.rejected}

    train_rows, eval_rows, reports = load_validated_splits(data_cfg, check, seed)
    check_chat_template_matches_encode_chat(tokenizer, train_rows[0])
    return PreparedData(
        train=datasets.Dataset.from_list(train_rows),
        eval=datasets.Dataset.from_list(eval_rows) if eval_rows is not None else None,
        reports=reports,
    )


RowConverter = Callable[[Any], dict]


def load_validated_splits(
    data_cfg: Any, convert: RowConverter, seed: int
) -> tuple[list[dict], list[dict] | None, list[RowReport]]:
    """Converted good rows of the train source and of the eval source (or a held-out fraction)."""
    train_rows, train_report = convert_source(data_cfg.path, data_cfg.split, convert, data_cfg)
    reports = [train_report]
    eval_rows = None
    if data_cfg.eval_path:
        eval_rows, eval_report = convert_source(data_cfg.eval_path, data_cfg.eval_split, convert, data_cfg)
        reports.append(eval_report)
    elif data_cfg.eval_fraction > 0:
        train_rows, eval_rows = hold_out(train_rows, data_cfg.eval_fraction, seed)
    return train_rows, eval_rows, reports


def convert_source(
    path: str, split: str, convert: RowConverter, data_cfg: Any
) -> tuple[list[dict], RowReport]:
    """Convert every row of one source, report the bad ones, enforce data.max_bad_fraction."""
    source, rows = read_rows(path, split)
    report = RowReport(source)
    good = []
    for index, row in rows:
        report.total += 1
        try:
            good.append(convert(row))
        except BadRow as reason:
            report.bad.append((index, reason))
    if report.bad:
        logger.warning(report.summary(data_cfg.max_reported_bad_rows))
    enforce_bad_row_budget(report, data_cfg.max_bad_fraction)
    return good, report


def enforce_bad_row_budget(report: RowReport, max_bad_fraction: float) -> None:
    if report.total == len(report.bad):
        raise DataError(
            f"{report.source}: no usable rows ({len(report.bad)} of {report.total} bad: {report.counts() or 'empty'}); "
            "fix the rows reported above"
        )
    if report.bad_fraction > max_bad_fraction:
        raise DataError(
            f"{report.source}: {len(report.bad)} of {report.total} rows ({report.bad_fraction:.0%}) are bad "
            f"({report.counts()}), above data.max_bad_fraction={max_bad_fraction}: fix them or raise data.max_bad_fraction"
        )


def hold_out(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split rows into (train, eval) with `fraction` of them, at least one, held out at random."""
    count = min(max(1, round(len(rows) * fraction)), len(rows) - 1)
    if count < 1:
        raise DataError(
            f"data.eval_fraction: only {len(rows)} usable row(s), too few to hold any out; set data.eval_path"
        )
    held = set(random.Random(seed).sample(range(len(rows)), count))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def read_rows(path: str, split: str) -> tuple[str, Iterator[tuple[int, Any]]]:
    """(source name, (row index, row) pairs) of a local file or a hub dataset split."""
    local = Path(path).expanduser()
    if local.is_file():
        reader = {"jsonl": read_jsonl, "json": read_json, "parquet": read_parquet}.get(
            LOCAL_FORMATS.get(local.suffix, "")
        )
        if reader is None:
            raise DataError(f"{path}: unsupported file type '{local.suffix}'; use .jsonl, .json or .parquet")
        return str(path), reader(local)
    if local.is_dir():
        raise DataError(
            f"{path} is a directory: point data.path / data.eval_path at a .jsonl, .json or .parquet file"
        )
    if looks_like_local_path(path):
        raise FileNotFoundError(
            f"data file not found: {path} (fix data.path / data.eval_path, or give a hub dataset name)"
        )
    return f"{path}[{split}]", enumerate(load_hub_split(path, split))


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if line.strip():
                yield index, parse_json_line(line)


def parse_json_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        return BadRow("invalid JSON", str(error))


def read_json(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}: invalid JSON ({error}); for one object per line, name the file .jsonl"
        ) from error
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of row objects, got {type(rows).__name__}")
    return enumerate(rows)


def read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    return enumerate(datasets.Dataset.from_parquet(str(path)))


def load_hub_split(name: str, split: str) -> Iterable[dict]:
    try:
        return datasets.load_dataset(name, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"could not load hub dataset '{name}' split '{split}': {first_line}") from error


def parse_sft_row(row: Any) -> SftExample:
    """An SFT row as a conversation, or BadRow."""
    row = require_object(row)
    if "messages" in row:
        messages = parse_messages(row, "messages")
        require_conversation(messages, "messages")
        if messages[-1]["role"] != "assistant":
            raise BadRow("broken alternation", "'messages' must end with an assistant message")
        return SftExample(messages)
    if "prompt" in row and "completion" in row:
        prompt = parse_turns(row, "prompt", "user")
        completion = parse_turns(row, "completion", "assistant")
        require_conversation(prompt + completion, "prompt + completion")
        return SftExample(prompt + completion, num_prompt_messages=len(prompt))
    raise BadRow("missing field", "expected 'messages', or 'prompt' and 'completion'")


def parse_dpo_row(row: Any) -> DpoExample:
    """A DPO row as prompt messages + chosen/rejected assistant messages, or BadRow."""
    row = require_object(row)
    for key in ("chosen", "rejected"):
        if key not in row:
            raise BadRow("missing field", f"'{key}'")
    if "prompt" in row:
        prompt = parse_turns(row, "prompt", "user")
        chosen = strip_prompt(prompt, parse_turns(row, "chosen", "assistant"))
        rejected = strip_prompt(prompt, parse_turns(row, "rejected", "assistant"))
    else:
        prompt, chosen, rejected = split_implicit_prompt(
            parse_messages(row, "chosen"), parse_messages(row, "rejected")
        )
    if not prompt or prompt[-1]["role"] != "user":
        raise BadRow("broken alternation", "the prompt must end with a user message")
    for key, completion in (("chosen", chosen), ("rejected", rejected)):
        if not completion:
            raise BadRow("empty text", f"'{key}' has no assistant message after the prompt")
        require_conversation(prompt + completion, f"prompt + {key}")
        if completion[-1]["role"] != "assistant":
            raise BadRow("broken alternation", f"'{key}' must end with an assistant message")
    return DpoExample(prompt, chosen, rejected)


def strip_prompt(prompt: list[dict], completion: list[dict]) -> list[dict]:
    """Drop the prompt from the front of a completion that repeats it (e.g. UltraFeedback)."""
    return completion[len(prompt) :] if completion[: len(prompt)] == prompt else completion


def split_implicit_prompt(
    chosen: list[dict], rejected: list[dict]
) -> tuple[list[dict], list[dict], list[dict]]:
    """Prompt = the messages chosen and rejected share, up to their last shared user message."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and chosen[shared - 1]["role"] != "user":
        shared -= 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def require_object(row: Any) -> dict:
    if isinstance(row, BadRow):
        raise row
    if not isinstance(row, dict):
        raise BadRow("wrong type", f"row must be an object, got {type(row).__name__}")
    return row


def parse_turns(row: dict, key: str, role: str) -> list[dict]:
    """A field that is a plain string (one `role` message) or a message list."""
    value = row[key]
    if isinstance(value, str):
        if not value.strip():
            raise BadRow("empty text", f"'{key}' is empty")
        return [{"role": role, "content": value}]
    return parse_messages(row, key)


def parse_messages(row: dict, key: str) -> list[dict]:
    """A non-empty list of {role, content} messages with known roles and non-empty string content."""
    value = row[key]
    if not isinstance(value, list) or not value:
        raise BadRow(
            "wrong type", f"'{key}' must be a non-empty list of messages, got {type(value).__name__}"
        )
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise BadRow("missing field", f"'{key}'[{index}] must have 'role' and 'content'")
        if message["role"] not in ROLES:
            raise BadRow(
                "wrong type",
                f"'{key}'[{index}] has unknown role {message['role']!r} (use {', '.join(ROLES)})",
            )
        if not isinstance(message["content"], str):
            raise BadRow(
                "wrong type",
                f"'{key}'[{index}].content must be a string, got {type(message['content']).__name__}",
            )
        if not message["content"].strip():
            raise BadRow("empty text", f"'{key}'[{index}].content is empty")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def require_conversation(messages: list[dict], what: str) -> None:
    """Optional system message first, then user/assistant alternating from user."""
    start = 1 if messages[0]["role"] == "system" else 0
    for index, message in enumerate(messages):
        expected = "system" if index < start else ("user", "assistant")[(index - start) % 2]
        if message["role"] != expected:
            raise BadRow(
                "broken alternation",
                f"{what}: message {index} is {message['role']}, expected {expected} "
                "(optional system first, then user/assistant alternating)",
            )


def tokenize_sft_example(
    tokenizer: PreTrainedTokenizerBase, example: SftExample, max_length: int, completion_only: bool
) -> dict:
    """input_ids and labels of one conversation; BadRow when longer than max_length."""
    encoded = encode_chat(tokenizer, example.messages)
    input_ids = encoded["input_ids"]
    require_fits(len(input_ids), max_length)
    if not completion_only:
        return {"input_ids": input_ids, "labels": list(input_ids)}
    trained = encoded["assistant_mask"]
    if example.num_prompt_messages is not None:
        prompt_length = len(
            encode_chat(tokenizer, example.messages[: example.num_prompt_messages])["input_ids"]
        )
        trained = [0] * prompt_length + trained[prompt_length:]
    return {
        "input_ids": input_ids,
        "labels": [t if m else IGNORE_INDEX for t, m in zip(input_ids, trained, strict=True)],
    }


def check_dpo_length(tokenizer: PreTrainedTokenizerBase, example: DpoExample, max_length: int) -> None:
    for completion in (example.chosen, example.rejected):
        require_fits(len(encode_chat(tokenizer, example.prompt + completion)["input_ids"]), max_length)


def require_fits(length: int, max_length: int) -> None:
    if length > max_length:
        raise BadRow("too long", f"{length} tokens > data.max_length={max_length}")


def check_chat_template_matches_encode_chat(tokenizer: PreTrainedTokenizerBase, row: dict) -> None:
    """DPOTrainer tokenizes with the chat template; it must give the ids SFT trained on (encode_chat)."""
    conversation = row["prompt"] + row["chosen"]
    expected = encode_chat(tokenizer, conversation)["input_ids"]
    try:
        rendered = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
    except ValueError as error:
        raise DataError(
            f"the tokenizer has no usable chat template ({error}); use the one from load_tokenizer()"
        ) from error
    if list(rendered) != expected:
        raise DataError(
            "the tokenizer's chat template renders conversations differently from encode_chat (the SFT format): "
            "use the tokenizer from load_tokenizer() or one saved by an SFT run"
        )


def unpacked_rows(rows: list[dict]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({key: [row[key] for row in rows] for key in ("input_ids", "labels")})


def pack_rows(rows: list[dict], max_length: int) -> datasets.Dataset:
    """Pack sequences into rows of at most max_length tokens (best-fit decreasing).

    Each packed row carries position_ids restarting at 0 per sequence, the sequence lengths, and
    labels whose first position in every sequence is -100 (nothing predicts across a boundary).
    """
    packed = {"input_ids": [], "labels": [], "position_ids": [], "seq_lengths": []}
    for members in best_fit_bins([len(row["input_ids"]) for row in rows], max_length):
        sequences = [rows[index] for index in members]
        packed["input_ids"].append([t for row in sequences for t in row["input_ids"]])
        packed["labels"].append([t for row in sequences for t in [IGNORE_INDEX, *row["labels"][1:]]])
        packed["position_ids"].append([p for row in sequences for p in range(len(row["input_ids"]))])
        packed["seq_lengths"].append([len(row["input_ids"]) for row in sequences])
    return datasets.Dataset.from_dict(packed)


def best_fit_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins of total length <= capacity: longest first, each into the fullest bin it fits."""
    free: list[tuple[int, int]] = []  # (space left, bin number), sorted
    bins: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        slot = bisect.bisect_left(free, (lengths[index], -1))
        if slot == len(free):
            bins.append([index])
            bisect.insort(free, (capacity - lengths[index], len(bins) - 1))
            continue
        space, number = free.pop(slot)
        bins[number].append(index)
        bisect.insort(free, (space - lengths[index], number))
    return bins
