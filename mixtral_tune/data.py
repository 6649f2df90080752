"""Datasets of the SFT and DPO pipelines: load, detect each row's format, validate, tokenize, pack;
once per job, cached.

Sources: `data.path` (one source, kept in its order) or `data.mixture` (several, alignment-handbook
`dataset_mixture` semantics: each source's `weight` is the fraction of its rows used, drawn with the
run's seed; the sources are concatenated and shuffled with the seed). A source is a local file
(.jsonl read line by line, .json a list read whole, .parquet, .csv, .arrow), a local directory
(`datasets.save_to_disk` output, read with `datasets.load_from_disk` (its `split` for a DatasetDict),
or a hub-style folder of data files, read with `datasets.load_dataset`), or a hub dataset
(`datasets.load_dataset` with `config`, `split`, `revision`). `data.columns` (a mixture source's
`columns`) renames the source's columns to the names of a format. A path that looks local but does
not exist is a FileNotFoundError naming it, never a hub lookup.

Row formats (FORMATS, one entry per format; `data.format=auto` detects each row's format from its
columns, in the table's order; `data.format=NAME` reads every row as NAME):
  sft  messages           `messages`: [{role, content}, ...] (TRL conversational language modelling)
       sharegpt           `conversations`: [{from, value}, ...], optional `system`; `from` is
                          system | human/user | gpt/assistant/bot/model/chatgpt (any case); others refused
       alpaca             `instruction`, optional `input`, `output`, optional `system`: the user turn is
                          instruction and input joined by a newline, empty parts left out, as
                          LLaMA-Factory's AlpacaDatasetConverter (src/llamafactory/data/converter.py)
       prompt_completion  `prompt` + `completion`, each a string or a message list (TRL prompt-completion)
       text               `text` (TRL language modelling): every token trained, EOS appended as TRL does,
                          packed with TRL's `bfd_split` (long texts are split, never cut); a run's
                          text rows cannot be mixed with chat rows
  dpo  preference         `prompt` (string or message list ending with a user turn) + `chosen` +
                          `rejected` (strings or assistant-message lists; a chosen/rejected list that
                          repeats the prompt has it stripped). Without `prompt` (TRL's implicit prompt),
                          the messages shared by chosen and rejected are the prompt. (ORPO and
                          CPO/SimPO take these rows too.)
  kto  unpaired           `prompt` (as preference's) + `completion` (as its chosen) + `label` (true:
                          desirable, false: undesirable): unpaired feedback, as TRL's KTOTrainer takes it
Chat rules for every chat format: an optional system message first, then user/assistant alternating,
ending with assistant. A null value counts as an absent column.

Every row is checked: invalid JSON, no format fits (missing field), wrong type, empty text, unknown
role, broken role alternation. Bad rows are dropped and reported per source (file and row index, a few
examples); loading fails with one line when a source has no usable rows (naming the columns found and
the formats accepted when no row fits a format) or more than data.max_bad_fraction bad ones. Row
indices are 0-based positions in the source (for .jsonl: the line).

Long rows (more than data.max_length tokens) are not bad rows and never fail a run by themselves.
data.truncation=truncate (default): SFT keeps the prompt (the tokens before the first trained
token) and cuts the completion; a row whose prompt alone fills max_length is dropped. DPO rows are
kept whole and TRL's DPOTrainer truncates them with data.dpo_truncation_mode; a row whose prompt
alone fills max_length under keep_start is dropped here, as TRL would drop it. data.truncation=drop
drops every long row. The report counts truncated and dropped rows apart from bad ones.

Evaluation rows come from data.eval_path (a source as above: split data.eval_split, columns renamed
by data.columns), from a data.eval_fraction of the training rows held out with the seed, or from
nowhere. `data_plan` gives the lines every run prints at start: each source with its formats, rows,
tokens, truncated and dropped rows, then the eval source and its size.

Outputs:
  SFT  `input_ids`, `labels` (-100 outside the assistant turns, or outside the completion for
       prompt/completion rows, when data.completion_only). With data.packing, rows are packed up to
       data.max_length by TRL's `pack_dataset` (best-fit decreasing; `bfd_split` for text rows,
       which are always packed) and carry `seq_lengths`; TRL's
       padding-free collator turns them into position ids restarting at 0 for every sequence and
       masks the first label of every sequence, so no token is trained across a boundary.
  DPO  conversational rows {prompt, chosen, rejected} as TRL's DPOTrainer takes them; it renders
       them with the tokenizer's chat template, checked here to match `encode_chat`.

Why our own pass and not TRL's SFT tokenization: TRL renders each row with `apply_chat_template`
and its assistant mask, which gives the same ids as `encode_chat` (control-token spellings included,
since the tokenizer escapes them). Ours calls `encode_chat` itself (the reference held token-for-token
to mistral-common, and faster than the template route: README, Data) and does in the same pass what
TRL does not: validate every row and report bad ones by source and row index under
a budget, and count truncated and dropped long rows. Packing and boundary masking are TRL's.

Once per job: preparation runs as batched `datasets.map` passes (data.num_proc worker processes)
whose results are saved under data.cache_dir, keyed by a fingerprint of everything that decides
them (sources and their files' size and mtime or a hub dataset's commit, the data settings (the
format and column settings among them), the seed, the tokenizer, the code of this file and of the
tokenizer module, the versions of the libraries that tokenize and pack). The preparing process
(data.prepare_on: the local
main of each node, or only the global main) writes the result and publishes it with one rename;
the other ranks wait for it and read it. A later launch with the same fingerprint reads the cache
and tokenizes nothing. Bad-row budgets are checked after reading, so changing them needs no
re-preparation.
"""

import hashlib
import importlib.metadata
import inspect
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from omegaconf import OmegaConf
from transformers import PreTrainedTokenizerBase
from trl.data_utils import pack_dataset

import mixtral_model.tokenizer
from mixtral_model import encode_chat
from mixtral_model.hub_weights import looks_like_local_path
from mixtral_model.tokenizer import CHAT_TEMPLATE, ROLES, validate_conversation

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
LOCAL_FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}

# Outcome of one row (the `__problem` column): kept as is, kept truncated, dropped as long, or bad.
KEPT, TRUNCATED = "", "truncated"
TOO_LONG, PROMPT_TOO_LONG = "too long", "prompt too long"
LONG_DROPS = (TOO_LONG, PROMPT_TOO_LONG)
MAX_KEPT_EXAMPLES = 1000  # bad-row examples kept per source (all of them are counted)
MIN_ROWS_PER_PROC = 1000  # fewer rows than this per worker: not worth a process
WAIT_TIMEOUT_S = 6 * 3600
DONE = "prepared.json"  # written last: its presence marks a complete cache entry

ROW_INDEX, LINE, PROBLEM, DETAIL = "__row_index", "__line", "__problem", "__detail"
FORMAT, NUM_TOKENS = "__format", "__tokens"  # the row's format; its tokens (DPO: chosen + rejected sequences)
STATUS = {
    PROBLEM: datasets.Value("string"),
    DETAIL: datasets.Value("string"),
    ROW_INDEX: datasets.Value("int64"),
    FORMAT: datasets.Value("string"),
    NUM_TOKENS: datasets.Value("int64"),
}
TOKENS = datasets.List(datasets.Value("int32"))
MESSAGES = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
SFT_FEATURES = datasets.Features({"input_ids": TOKENS, "labels": TOKENS, **STATUS})
DPO_FEATURES = datasets.Features({"prompt": MESSAGES, "chosen": MESSAGES, "rejected": MESSAGES, **STATUS})
KTO_FEATURES = datasets.Features(
    {"prompt": MESSAGES, "completion": MESSAGES, "label": datasets.Value("bool"), **STATUS}
)


class DataError(ValueError):
    """A dataset a user can fix: the message names the file and the fix, on one line."""


class BadRow(ValueError):
    """Why one row is unusable; `kind` groups the reasons in the summary."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


@dataclass
class RowReport:
    """What happened to the rows of one source: bad ones (with examples), truncated, dropped as long."""

    source: str
    total: int = 0
    bad_counts: dict[str, int] = field(default_factory=dict)
    examples: list[tuple[int, str, str]] = field(default_factory=list)  # (row index, kind, detail)
    truncated: int = 0
    dropped_long: dict[str, int] = field(default_factory=dict)  # too long | prompt too long
    formats: dict[str, int] = field(default_factory=dict)  # usable rows by format
    tokens: int = 0  # of the usable rows

    @property
    def bad(self) -> int:
        return sum(self.bad_counts.values())

    @property
    def dropped(self) -> int:
        return sum(self.dropped_long.values())

    @property
    def bad_fraction(self) -> float:
        return self.bad / self.total if self.total else 0.0

    def counts(self) -> str:
        return ", ".join(f"{kind}: {count}" for kind, count in sorted(self.bad_counts.items()))

    def long_rows(self) -> str:
        drops = ", ".join(f"{count} {kind}" for kind, count in sorted(self.dropped_long.items()))
        return f"{self.truncated} truncated, {self.dropped} dropped" + (f" ({drops})" if drops else "")

    def summary(self, max_examples: int) -> str:
        lines = [f"{self.source}: {self.total} rows, {self.bad} bad ({self.counts() or 'none'}); "
                 f"long rows: {self.long_rows()}"]  # fmt: skip
        lines += [f"  row {index}: {kind}: {detail}" for index, kind, detail in self.examples[:max_examples]]
        if self.bad > min(max_examples, len(self.examples)):
            lines.append(f"  ... and {self.bad - min(max_examples, len(self.examples))} more")
        return "\n".join(lines)


@dataclass
class PreparedData:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    reports: list[RowReport]
    plan: dict = field(default_factory=dict)  # what data_plan prints: rows, tokens, eval source, packing

    @property
    def packed(self) -> bool:
        return bool(self.plan.get("packed"))


@dataclass
class SftExample:
    messages: list[dict]
    num_prompt_messages: int | None = None  # prompt/completion rows: loss only after these messages


@dataclass
class DpoExample:
    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]


@dataclass
class TextExample:
    text: str  # language modelling: every token trained


@dataclass
class KtoExample:
    prompt: list[dict]
    completion: list[dict]
    label: bool  # true: a desirable completion (thumbs up), false: an undesirable one


@dataclass(frozen=True)
class Source:
    """One data source: a local file, a local directory or a hub dataset (its split), with a column
    renaming and a weight."""

    path: str
    split: str = "train"
    config: str | None = None
    revision: str | None = None
    columns: tuple[tuple[str, str], ...] = ()  # (source column, a format's column)
    weight: float = 1.0

    @property
    def name(self) -> str:
        if is_local(self.path):
            return f"{self.path}[{self.split}]" if Path(self.path).expanduser().is_dir() else self.path
        return f"{self.path}{f'/{self.config}' if self.config else ''}[{self.split}]"


def prepare_sft_data(data_cfg: Any, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreparedData:
    """Tokenized (and optionally packed) SFT train/eval datasets from `cfg.data`."""
    convert = partial(
        sft_convert_batch,
        tokenizer=tokenizer,
        row_format=data_cfg.format,
        max_length=data_cfg.max_length,
        completion_only=data_cfg.completion_only,
        truncation=data_cfg.truncation,
    )
    finish = partial(finish_sft, max_length=data_cfg.max_length, packing=data_cfg.packing)
    return prepare(data_cfg, tokenizer, seed, convert, SFT_FEATURES, finish)


def prepare_dpo_data(data_cfg: Any, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreparedData:
    """Conversational prompt/chosen/rejected train/eval datasets for TRL's DPOTrainer from `cfg.data`."""
    convert = partial(
        dpo_convert_batch,
        tokenizer=tokenizer,
        row_format=data_cfg.format,
        max_length=data_cfg.max_length,
        truncation=data_cfg.truncation,
        truncation_mode=data_cfg.dpo_truncation_mode,
    )
    prepared = prepare(data_cfg, tokenizer, seed, convert, DPO_FEATURES, lambda dataset, *_: dataset)
    check_chat_template_matches_encode_chat(tokenizer, prepared.train[0], data_cfg.chat_template is not None)
    return prepared


def prepare_kto_data(data_cfg: Any, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreparedData:
    """Conversational prompt/completion/label train/eval datasets for TRL's KTOTrainer from `cfg.data`."""
    convert = partial(
        kto_convert_batch,
        tokenizer=tokenizer,
        row_format=data_cfg.format,
        max_length=data_cfg.max_length,
        truncation=data_cfg.truncation,
    )
    prepared = prepare(data_cfg, tokenizer, seed, convert, KTO_FEATURES, lambda dataset, *_: dataset)
    first = prepared.train[0]
    check_chat_template_matches_encode_chat(
        tokenizer, {"prompt": first["prompt"], "chosen": first["completion"]}
    )
    return prepared


# ---------------------------------------------------------------------------------------------
# Once per job, cached


def prepare(data_cfg, tokenizer, seed: int, convert, features, finish) -> PreparedData:
    """Prepare (or wait for, or read) the cache entry of this data config, then check the budgets."""
    train_sources, eval_sources = sources_of(data_cfg)
    key = cache_key(data_cfg, tokenizer, seed, train_sources + eval_sources)
    entry = cache_root(data_cfg) / key
    num_proc = data_cfg.num_proc or default_num_proc()
    build = partial(build_entry, data_cfg=data_cfg, seed=seed, convert=convert, features=features,
                    finish=finish, num_proc=num_proc, train_sources=train_sources, eval_sources=eval_sources)  # fmt: skip
    once_per_job(entry, data_cfg.prepare_on, build)
    meta = json.loads((entry / DONE).read_text())
    reports = [report_from_dict(report) for report in meta["reports"]]
    if is_global_main():
        for report in reports:
            if report.bad or report.truncated or report.dropped:
                logger.warning(report.summary(data_cfg.max_reported_bad_rows))
    for report in reports:
        enforce_bad_row_budget(report, data_cfg.max_bad_fraction)
    if meta["error"]:
        raise DataError(meta["error"])
    splits = datasets.load_from_disk(str(entry / "datasets"))
    return PreparedData(
        train=splits["train"],
        eval=splits["eval"] if "eval" in splits else None,
        reports=reports,
        plan=meta["plan"],
    )


def data_plan(prepared: PreparedData) -> list[str]:
    """The lines every run prints at start: each source (its rows by format, tokens, bad, truncated and
    dropped rows), the training set, and where the eval rows come from."""
    plan = prepared.plan
    tokens = "tokens (chosen + rejected)" if plan.get("kind") == "dpo" else "tokens"
    lines = []
    for report in prepared.reports:
        formats = (
            ", ".join(f"{count} {name}" for name, count in sorted(report.formats.items())) or "none usable"
        )
        lines.append(
            f"[data] {report.source}: {report.total} rows ({formats}), {report.tokens} {tokens}; "
            f"{report.bad} bad, {report.long_rows()}"
        )
    packed = f", packed into {plan['train_sequences']} sequences" if plan["packed"] else ""
    lines.append(f"[data] train: {plan['train_rows']} rows, {plan['train_tokens']} {tokens}{packed}")
    if plan["eval_rows"]:
        lines.append(
            f"[data] eval: {plan['eval_source']}: {plan['eval_rows']} rows, {plan['eval_tokens']} {tokens}"
        )
    else:
        lines.append("[data] eval: none (set data.eval_path or data.eval_fraction to evaluate)")
    return lines


def once_per_job(entry: Path, prepare_on: str, build: Callable[[Path], None]) -> None:
    """Build `entry` in the preparing process unless it exists; other processes wait until it does.

    The entry is built in a private directory and published with one rename, so a reader never
    sees a half-written entry and two nodes preparing into a shared directory do not collide.
    """
    if (entry / DONE).exists():
        return
    if not is_preparer(prepare_on):
        wait_for(entry, prepare_on)
        return
    entry.parent.mkdir(parents=True, exist_ok=True)
    work = entry.with_name(f"{entry.name}.work-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    try:
        build(work)
        try:
            os.rename(work, entry)
        except OSError:
            if not (entry / DONE).exists():  # not a concurrent publisher: a real error
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def is_preparer(prepare_on: str) -> bool:
    rank_variable = "LOCAL_RANK" if prepare_on == "local_main" else "RANK"
    return int(os.environ.get(rank_variable, "0")) == 0


def is_global_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def wait_for(entry: Path, prepare_on: str) -> None:
    preparer = "local rank 0 of this node" if prepare_on == "local_main" else "rank 0"
    start = last_note = time.monotonic()
    while not (entry / DONE).exists():
        if time.monotonic() - start > WAIT_TIMEOUT_S:
            raise DataError(
                f"waited {WAIT_TIMEOUT_S / 3600:.0f} h for {preparer} to prepare {entry}: with "
                "data.prepare_on=global_main, data.cache_dir must be on a filesystem every node sees"
            )
        if time.monotonic() - last_note > 60:
            logger.info("waiting for %s to prepare the data (%s)", preparer, entry)
            last_note = time.monotonic()
        time.sleep(0.5)


def cache_root(data_cfg) -> Path:
    if data_cfg.cache_dir:
        return Path(data_cfg.cache_dir).expanduser()
    return Path(datasets.config.HF_DATASETS_CACHE) / "mixtral_tune_prepared"


def default_num_proc() -> int:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(usable, 32))


def cache_key(data_cfg, tokenizer, seed: int, sources: list["Source"]) -> str:
    """Fingerprint of everything that decides the prepared datasets (not the budgets, not num_proc)."""
    settings = OmegaConf.to_container(data_cfg, resolve=True)
    for key in ("max_bad_fraction", "max_reported_bad_rows", "num_proc", "cache_dir", "prepare_on"):
        settings.pop(key, None)
    payload = {
        "settings": settings,
        "seed": seed,
        "files": [file_identity(source) for source in sources],
        "tokenizer": tokenizer_digest(tokenizer),
        "code": code_digest(),
        "libraries": library_versions(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def file_identity(source: Source) -> list:
    local = Path(source.path).expanduser()
    if local.is_file():
        stat = local.stat()
        return [str(local.resolve()), stat.st_size, stat.st_mtime_ns]
    if local.is_dir():
        files = sorted(path for path in local.rglob("*") if path.is_file())
        stats = [
            [str(path.relative_to(local)), path.stat().st_size, path.stat().st_mtime_ns] for path in files
        ]
        return [str(local.resolve()), source.config, source.split, stats]
    if is_local(source.path):
        raise FileNotFoundError(
            f"data file not found: {source.path} (fix data.path / data.eval_path, or give a hub dataset name)"
        )
    return [source.path, source.config, hub_commit(source), source.split]


def hub_commit(source: Source) -> str | None:
    """The commit a hub dataset's revision points at now (a branch such as the default `main` moves);
    offline (HF_HUB_OFFLINE), the revision as given, which is what datasets then loads from its cache."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return source.revision
    try:
        return huggingface_hub.HfApi().dataset_info(source.path, revision=source.revision).sha
    except (OSError, ValueError) as error:  # huggingface_hub's HTTP and connection errors are OSErrors
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(
            f"could not load hub dataset '{source.path}' split '{source.split}': {first_line}"
        ) from error


def library_versions() -> dict[str, str]:
    """The libraries whose code tokenizes and packs the rows (TRL's pack_dataset, the tokenizers)."""
    return {
        name: importlib.metadata.version(name) for name in ("datasets", "tokenizers", "transformers", "trl")
    }


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [
        type(tokenizer).__name__,
        backend.to_str() if backend is not None else datasets.fingerprint.Hasher.hash(tokenizer),
        str(tokenizer.chat_template),
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def code_digest() -> str:
    """This module and the tokenizer module: a change to either (e.g. to encode_chat) re-prepares."""
    modules = [sys.modules[__name__], mixtral_model.tokenizer]
    return hashlib.sha256("".join(inspect.getsource(module) for module in modules).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Building one cache entry


def build_entry(
    work: Path, *, data_cfg, seed, convert, features, finish, num_proc, train_sources, eval_sources
):
    work.mkdir(parents=True)
    scratch = work / "scratch"
    train_parts, reports = [], []
    for number, source in enumerate(train_sources):
        good, report = convert_source(source, convert, features, scratch / f"train{number}", num_proc, seed)
        train_parts.append(good)
        reports.append(report)
    train = datasets.concatenate_datasets(train_parts)
    if data_cfg.mixture:  # as alignment-handbook: a mixture is shuffled, a single dataset keeps its order
        train = train.shuffle(seed=seed)
    eval_split, error, eval_source = None, None, "none"
    if eval_sources:
        eval_split, report = convert_source(
            eval_sources[0], convert, features, scratch / "eval", num_proc, seed
        )
        reports.append(report)
        eval_source = eval_sources[0].name
    elif data_cfg.eval_fraction > 0:
        if len(train) < 2:
            error = f"data.eval_fraction: only {len(train)} usable row(s), too few to hold any out; set data.eval_path"
        else:
            split = train.train_test_split(test_size=data_cfg.eval_fraction, seed=seed)
            train, eval_split = split["train"], split["test"]
            eval_source = f"data.eval_fraction={data_cfg.eval_fraction} of the training rows (seed {seed})"
    error = error or mixed_text_and_chat(reports)
    language_modelling = any(TEXT in report.formats for report in reports)
    plan = {
        "train_rows": len(train),
        "train_tokens": total_tokens(train),
        "eval_source": eval_source,
        "eval_rows": len(eval_split) if eval_split is not None else 0,
        "eval_tokens": total_tokens(eval_split) if eval_split is not None else 0,
        "packed": bool(data_cfg.get("packing")) or language_modelling,
        "kind": data_cfg.kind,
    }
    splits = {"train": train} | ({"eval": eval_split} if eval_split is not None else {})
    splits = {
        name: finish(
            split.remove_columns([FORMAT, NUM_TOKENS]), scratch / f"finish_{name}", language_modelling
        )
        for name, split in splits.items()
    }
    plan["train_sequences"] = len(splits["train"])
    datasets.DatasetDict(splits).save_to_disk(str(work / "datasets"))
    shutil.rmtree(scratch)
    meta = {"reports": [report_to_dict(report) for report in reports], "error": error, "plan": plan}
    (work / DONE).write_text(json.dumps(meta))


def total_tokens(dataset: datasets.Dataset) -> int:
    return int(pc.sum(dataset.with_format("arrow")[NUM_TOKENS]).as_py() or 0)  # through the indices mapping


def mixed_text_and_chat(reports: list[RowReport]) -> str | None:
    """Text rows are packed and trained on every token: chat rows in the same run would be too."""
    text = {report.source: report.formats[TEXT] for report in reports if TEXT in report.formats}
    chat = {
        report.source: sum(count for name, count in report.formats.items() if name != TEXT)
        for report in reports
        if set(report.formats) - {TEXT}
    }
    if not (text and chat):
        return None
    return (
        f"language-modelling text rows ({', '.join(f'{s}: {n}' for s, n in text.items())}) and chat rows "
        f"({', '.join(f'{s}: {n}' for s, n in chat.items())}) in one run: train them in separate runs "
        "(text rows are packed and trained on every token)"
    )


def convert_source(source: Source, convert, features, scratch: Path, num_proc: int, seed: int):
    """Validated, converted rows of one source (its `weight` fraction of them), and its report."""
    scratch.mkdir(parents=True)
    raw = load_source(source, scratch)
    if source.weight < 1:
        keep = int(len(raw) * source.weight)
        raw = raw.select(np.random.default_rng(seed).permutation(len(raw))[:keep])
    procs = max(1, min(num_proc, len(raw) // MIN_ROWS_PER_PROC))
    converted = raw.map(
        convert,
        batched=True,
        fn_kwargs={"columns": dict(source.columns)},
        remove_columns=raw.column_names,
        features=features,
        num_proc=procs if procs > 1 else None,
        cache_file_name=str(scratch / "converted.arrow"),
        new_fingerprint=hashlib.sha256(f"{scratch}{source}".encode()).hexdigest()[:16],
        desc=f"Preparing {source.name}",
    )
    report = row_report(source.name, converted)
    kept = np.flatnonzero(
        pc.is_in(converted.data.column(PROBLEM), pa.array([KEPT, TRUNCATED])).to_numpy(zero_copy_only=False)
    )
    return converted.select(kept).remove_columns([PROBLEM, DETAIL, ROW_INDEX]), report


def row_report(name: str, converted: datasets.Dataset) -> RowReport:
    problems = converted.data.column(PROBLEM)
    counts = {item["values"].as_py(): item["counts"].as_py() for item in pc.value_counts(problems)}
    report = RowReport(name, total=len(converted), truncated=counts.pop(TRUNCATED, 0))
    counts.pop(KEPT, None)
    report.dropped_long = {kind: counts.pop(kind) for kind in LONG_DROPS if kind in counts}
    report.bad_counts = counts
    usable = pc.is_in(problems, pa.array([KEPT, TRUNCATED]))
    formats = pc.value_counts(pc.filter(converted.data.column(FORMAT), usable))
    report.formats = {item["values"].as_py(): item["counts"].as_py() for item in formats}
    report.tokens = int(pc.sum(pc.filter(converted.data.column(NUM_TOKENS), usable)).as_py() or 0)
    if counts:
        bad_mask = pc.invert(pc.is_in(problems, pa.array([KEPT, TRUNCATED, *LONG_DROPS])))
        first = np.flatnonzero(bad_mask.to_numpy(zero_copy_only=False))[:MAX_KEPT_EXAMPLES]
        rows = converted.select_columns([ROW_INDEX, PROBLEM, DETAIL]).select(first).to_dict()
        report.examples = list(zip(rows[ROW_INDEX], rows[PROBLEM], rows[DETAIL], strict=True))
    return report


def report_to_dict(report: RowReport) -> dict:
    return {**report.__dict__, "examples": [list(example) for example in report.examples]}


def report_from_dict(values: dict) -> RowReport:
    return RowReport(**{**values, "examples": [tuple(example) for example in values["examples"]]})


def enforce_bad_row_budget(report: RowReport, max_bad_fraction: float) -> None:
    if report.total == report.bad + report.dropped:
        if set(report.bad_counts) == {UNKNOWN_FORMAT}:
            raise DataError(
                f"{report.source}: no row fits a format ({report.examples[0][2]}): rename your columns "
                "with data.columns (e.g. data.columns.question=prompt), or set data.format"
            )
        if report.bad:
            raise DataError(
                f"{report.source}: no usable rows ({report.bad} of {report.total} bad: {report.counts()}"
                f"{f'; {report.dropped} too long' if report.dropped else ''}); fix the rows reported above"
            )
        if not report.total:
            raise DataError(f"{report.source}: no rows; point the source at a file or split with data")
        fix = " or use data.truncation=truncate" if TOO_LONG in report.dropped_long else ""
        raise DataError(
            f"{report.source}: no usable rows (all {report.total} dropped as long: {report.long_rows()}); "
            f"raise data.max_length{fix}"
        )
    if report.bad_fraction > max_bad_fraction:
        raise DataError(
            f"{report.source}: {report.bad} of {report.total} rows ({report.bad_fraction:.0%}) are bad "
            f"({report.counts()}), above data.max_bad_fraction={max_bad_fraction}: fix them or raise data.max_bad_fraction"
        )


def finish_sft(
    dataset: datasets.Dataset, scratch: Path, language_modelling: bool, *, max_length: int, packing: bool
) -> datasets.Dataset:
    """Packed rows (TRL's pack_dataset) with data.packing or for text rows, else the rows as they are."""
    if not (packing or language_modelling):
        return dataset
    scratch.mkdir(parents=True)
    return pack_dataset(
        dataset.select_columns(["input_ids", "labels"]),
        max_length,
        strategy="bfd_split" if language_modelling else "bfd",  # text: long rows split, not cut
        map_kwargs={"batch_size": 10000, "cache_file_name": str(scratch / "packed.arrow")},
    )


# ---------------------------------------------------------------------------------------------
# Sources


def sources_of(data_cfg) -> tuple[list[Source], list[Source]]:
    """Train sources (data.mixture, or data.path) and the eval source (data.eval_path), if any.

    data.columns renames the columns of every source; a mixture source's own `columns` go on top.
    The eval source is read with data.config and data.revision when it is the same hub dataset.
    """
    columns = dict(data_cfg.columns or {})
    if data_cfg.mixture:
        train = [
            Source(
                path=str(item.path),
                split=item.split,
                config=item.config,
                revision=item.revision,
                columns=tuple(sorted((columns | dict(item.columns or {})).items())),
                weight=float(item.weight),
            )
            for item in data_cfg.mixture
        ]
    else:
        train = [
            Source(
                path=str(data_cfg.path),
                split=data_cfg.split,
                config=data_cfg.config,
                revision=data_cfg.revision,
                columns=tuple(sorted(columns.items())),
            )
        ]
    if not data_cfg.eval_path:
        return train, []
    same = str(data_cfg.eval_path) == str(data_cfg.path)
    evaluation = Source(
        path=str(data_cfg.eval_path),
        split=data_cfg.eval_split,
        config=data_cfg.config if same else None,
        revision=data_cfg.revision if same else None,
        columns=tuple(sorted(columns.items())),
    )
    return train, [evaluation]


def is_local(path: str) -> bool:
    return Path(path).expanduser().exists() or looks_like_local_path(path)


def load_source(source: Source, scratch: Path) -> datasets.Dataset:
    """A source as a Dataset: `__line` (the JSON text of a row) for .jsonl/.json, the columns otherwise,
    and `__row_index` (the row's position in the source)."""
    local = Path(source.path).expanduser()
    file_type = LOCAL_FORMATS.get(local.suffix.lower(), "") if local.is_file() else None
    if local.is_file() and not file_type:
        raise DataError(
            f"{source.path}: unsupported file type '{local.suffix}'; use .jsonl, .json, .parquet, .csv or "
            ".arrow, a directory (datasets.save_to_disk, or data files), or a hub dataset name"
        )
    line_features = datasets.Features({LINE: datasets.Value("string"), ROW_INDEX: datasets.Value("int64")})
    if file_type == "jsonl":
        return datasets.Dataset.from_generator(
            jsonl_lines, gen_kwargs={"path": str(local)}, features=line_features, cache_dir=str(scratch)
        )
    if file_type == "json":
        rows = read_json(local)
        return datasets.Dataset.from_dict(
            {LINE: [json.dumps(row) for row in rows], ROW_INDEX: list(range(len(rows)))},
            features=line_features,
        )
    if file_type == "parquet":
        dataset = datasets.Dataset.from_parquet(str(local), cache_dir=str(scratch))
    elif file_type == "csv":
        dataset = datasets.Dataset.from_csv(str(local), cache_dir=str(scratch))
    elif file_type == "arrow":
        dataset = datasets.Dataset.from_file(str(local))
    elif local.is_dir() and ((local / "dataset_dict.json").exists() or (local / "state.json").exists()):
        dataset = load_saved(source, local)
    else:  # a hub dataset, or a local folder of data files: datasets infers the builder and the splits
        dataset = load_hub_split(source)
    return dataset.add_column(ROW_INDEX, np.arange(len(dataset)))


def load_saved(source: Source, local: Path) -> datasets.Dataset:
    """A `datasets.save_to_disk` directory: the Dataset, or the source's split of a DatasetDict."""
    saved = datasets.load_from_disk(str(local))
    if not isinstance(saved, datasets.DatasetDict):
        return saved
    if source.split not in saved:
        raise DataError(
            f"{source.path} has no split '{source.split}' (it has {', '.join(saved)}): set data.split "
            "(data.eval_split for data.eval_path, or the mixture source's split)"
        )
    return saved[source.split]


def jsonl_lines(path: str) -> Iterator[dict]:
    with open(path, encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if line.strip():
                yield {LINE: line, ROW_INDEX: index}


def read_json(path: Path) -> list:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}: invalid JSON ({error}); for one object per line, name the file .jsonl"
        ) from error
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of row objects, got {type(rows).__name__}")
    return rows


def load_hub_split(source: Source) -> datasets.Dataset:
    try:
        return datasets.load_dataset(source.path, source.config, split=source.split, revision=source.revision)
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        what = "dataset folder" if Path(source.path).expanduser().is_dir() else "hub dataset"
        raise DataError(
            f"could not load {what} '{source.path}' split '{source.split}': {first_line}"
        ) from error


def rows_of(batch: dict, columns: dict[str, str]) -> Iterator[tuple[int, Any]]:
    """(row index, row) pairs of a batch: parsed JSON lines, or column values, renamed by `columns`;
    a null value is an absent column."""
    indices = batch[ROW_INDEX]
    if LINE in batch:
        for index, line in zip(indices, batch[LINE], strict=True):
            row = parse_json_line(line)
            yield index, present(rename(row, columns)) if isinstance(row, dict) else row
        return
    names = [name for name in batch if name != ROW_INDEX]
    for position, index in enumerate(indices):
        yield index, present(rename({name: batch[name][position] for name in names}, columns))


def rename(row: dict, columns: dict[str, str]) -> dict:
    return {columns.get(key, key): value for key, value in row.items()} if columns else row


def present(row: dict) -> dict:
    return {key: value for key, value in row.items() if value is not None}


def parse_json_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        return BadRow("invalid JSON", str(error))


# ---------------------------------------------------------------------------------------------
# Row conversion (batched map functions)


def sft_convert_batch(
    batch: dict, *, columns, tokenizer, row_format, max_length, completion_only, truncation
) -> dict:
    out = {"input_ids": [], "labels": [], **{key: [] for key in STATUS}}
    for index, row in rows_of(batch, columns):
        name, input_ids, labels, detail = "", [], [], ""
        try:
            name, example = parse_row(row, "sft", row_format)
            input_ids, labels, problem = tokenize_sft_example(
                tokenizer, example, max_length, completion_only, truncation
            )
        except BadRow as reason:
            problem, detail = reason.kind, reason.detail
        out["input_ids"].append(input_ids)
        out["labels"].append(labels)
        append_status(out, problem, detail, index, name, len(input_ids))
    return out


def dpo_convert_batch(
    batch: dict, *, columns, tokenizer, row_format, max_length, truncation, truncation_mode
) -> dict:
    out = {"prompt": [], "chosen": [], "rejected": [], **{key: [] for key in STATUS}}
    for index, row in rows_of(batch, columns):
        name, example, tokens, detail = "", DpoExample([], [], []), 0, ""
        try:
            name, example = parse_row(row, "dpo", row_format)
            problem, tokens = dpo_length_outcome(tokenizer, example, max_length, truncation, truncation_mode)
        except BadRow as reason:
            problem, detail = reason.kind, reason.detail
        out["prompt"].append(example.prompt)
        out["chosen"].append(example.chosen)
        out["rejected"].append(example.rejected)
        append_status(out, problem, detail, index, name, tokens)
    return out


def kto_convert_batch(batch: dict, *, columns, tokenizer, row_format, max_length, truncation) -> dict:
    out = {"prompt": [], "completion": [], "label": [], **{key: [] for key in STATUS}}
    for index, row in rows_of(batch, columns):
        name, example, tokens, detail = "", KtoExample([], [], False), 0, ""
        try:
            name, example = parse_row(row, "kto", row_format)
            # TRL's KTO collator cuts long rows as DPO's keep_start does (the prompt kept, the completion cut);
            # the pair counts the one sequence twice: halved below
            problem, tokens = dpo_length_outcome(
                tokenizer, DpoExample(example.prompt, example.completion, example.completion),
                max_length, truncation, "keep_start",
            )  # fmt: skip
            tokens //= 2
        except BadRow as reason:
            problem, detail = reason.kind, reason.detail
        out["prompt"].append(example.prompt)
        out["completion"].append(example.completion)
        out["label"].append(example.label)
        append_status(out, problem, detail, index, name, tokens)
    return out


def append_status(out: dict, problem: str, detail: str, index: int, name: str, tokens: int) -> None:
    for key, value in ((PROBLEM, problem), (DETAIL, detail), (ROW_INDEX, index), (FORMAT, name),
                       (NUM_TOKENS, tokens if problem in (KEPT, TRUNCATED) else 0)):  # fmt: skip
        out[key].append(value)


def parse_row(row: Any, stage: str, row_format: str = "auto") -> tuple[str, Any]:
    """(format name, example) of a row: the first format of FORMATS for `stage` whose required
    columns the row has (only `row_format` unless auto), or BadRow."""
    row = require_object(row)
    candidates = [fmt for fmt in FORMATS if fmt.stage == stage and row_format in ("auto", fmt.name)]
    for fmt in candidates:
        if all(column in row for column in fmt.required):
            return fmt.name, fmt.parse(row)
    if len(candidates) == 1:
        missing = ", ".join(f"'{column}'" for column in candidates[0].required if column not in row)
        raise BadRow("missing field", f"{missing} ({candidates[0].describe()})")
    found = ", ".join(sorted(row)) or "none"
    accepted = "; ".join(fmt.describe() for fmt in candidates)
    raise BadRow(UNKNOWN_FORMAT, f"columns found: {found}; {stage} formats: {accepted}")


def parse_messages_row(row: dict) -> SftExample:
    messages = parse_messages(row, "messages")
    require_conversation(messages, "messages")
    if messages[-1]["role"] != "assistant":
        raise BadRow("broken alternation", "'messages' must end with an assistant message")
    return SftExample(messages)


def parse_prompt_completion_row(row: dict) -> SftExample:
    prompt = parse_turns(row, "prompt", "user")
    completion = parse_turns(row, "completion", "assistant")
    require_conversation(prompt + completion, "prompt + completion")
    return SftExample(prompt + completion, num_prompt_messages=len(prompt))


def parse_sharegpt_row(row: dict) -> SftExample:
    """ShareGPT `conversations` of {from, value} turns (with SHAREGPT_ROLES), an optional `system` column."""
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise BadRow(
            "wrong type", f"'conversations' must be a non-empty list of turns, got {type(turns).__name__}"
        )
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise BadRow("missing field", f"'conversations'[{index}] must have 'from' and 'value'")
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise BadRow(
                "unknown role",
                f"'conversations'[{index}].from={turn['from']!r} (known: {', '.join(SHAREGPT_ROLES)})",
            )
        messages.append(
            {"role": role, "content": require_text(turn["value"], f"'conversations'[{index}].value")}
        )
    if "system" in row and messages[0]["role"] != "system":
        system = require_text(row["system"], "'system'", allow_empty=True)
        messages = ([{"role": "system", "content": system}] if system else []) + messages
    require_conversation(messages, "conversations")
    if messages[-1]["role"] != "assistant":
        raise BadRow("broken alternation", "'conversations' must end with an assistant turn")
    return SftExample(messages)


def parse_alpaca_row(row: dict) -> SftExample:
    """Alpaca: the user turn is `instruction` and `input` joined by a newline (empty parts left out), as
    LLaMA-Factory's AlpacaDatasetConverter; `output` is the assistant turn, `system` the system prompt."""
    parts = [
        require_text(row[key], f"'{key}'", allow_empty=True) for key in ("instruction", "input") if key in row
    ]
    user = "\n".join(part for part in parts if part)
    if not user.strip():
        raise BadRow("empty text", "'instruction' and 'input' are empty")
    system = require_text(row["system"], "'system'", allow_empty=True) if "system" in row else ""
    messages = [{"role": "system", "content": system}] if system else []
    messages += [
        {"role": "user", "content": user},
        {"role": "assistant", "content": require_text(row["output"], "'output'")},
    ]
    return SftExample(messages)


def parse_text_row(row: dict) -> TextExample:
    return TextExample(require_text(row["text"], "'text'"))


def parse_dpo_row(row: dict) -> DpoExample:
    """A DPO row as prompt messages + chosen/rejected assistant messages, or BadRow."""
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


def parse_kto_row(row: dict) -> KtoExample:
    """An unpaired KTO row (TRL's convention: `prompt`, `completion`, boolean `label`), or BadRow."""
    if not isinstance(row["label"], bool):
        raise BadRow(
            "wrong type", f"'label' must be true (desirable) or false (undesirable), got {row['label']!r}"
        )
    prompt = parse_turns(row, "prompt", "user")
    completion = strip_prompt(prompt, parse_turns(row, "completion", "assistant"))
    if not prompt or prompt[-1]["role"] != "user":
        raise BadRow("broken alternation", "the prompt must end with a user message")
    if not completion:
        raise BadRow("empty text", "'completion' has no assistant message after the prompt")
    require_conversation(prompt + completion, "prompt + completion")
    if completion[-1]["role"] != "assistant":
        raise BadRow("broken alternation", "'completion' must end with an assistant message")
    return KtoExample(prompt, completion, row["label"])


@dataclass(frozen=True)
class RowFormat:
    """One row format: the pipeline it feeds, the columns that identify it, and its parser."""

    name: str
    stage: str  # sft | dpo | kto: data.kind
    required: tuple[str, ...]
    optional: tuple[str, ...]
    parse: Callable[[dict], Any]

    def describe(self) -> str:
        optional = f" [{', '.join(self.optional)}]" if self.optional else ""
        return f"{self.name} ({', '.join(self.required)}{optional})"


TEXT, UNKNOWN_FORMAT = "text", "unknown format"
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
}
# Detection order: the first format whose required columns a row has. A new row kind is one entry.
FORMATS = (
    RowFormat("messages", "sft", ("messages",), (), parse_messages_row),
    RowFormat("sharegpt", "sft", ("conversations",), ("system",), parse_sharegpt_row),
    RowFormat("alpaca", "sft", ("instruction", "output"), ("input", "system"), parse_alpaca_row),
    RowFormat("prompt_completion", "sft", ("prompt", "completion"), (), parse_prompt_completion_row),
    RowFormat(TEXT, "sft", ("text",), (), parse_text_row),
    RowFormat("preference", "dpo", ("chosen", "rejected"), ("prompt",), parse_dpo_row),
    RowFormat("unpaired", "kto", ("prompt", "completion", "label"), (), parse_kto_row),
)


def format_names(stage: str) -> tuple[str, ...]:
    return tuple(fmt.name for fmt in FORMATS if fmt.stage == stage)


def format_columns(stage: str) -> tuple[str, ...]:
    """Every column a format of `stage` reads: what data.columns may rename a column to."""
    return tuple(
        dict.fromkeys(c for fmt in FORMATS if fmt.stage == stage for c in fmt.required + fmt.optional)
    )


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


def require_text(value: Any, what: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise BadRow("wrong type", f"{what} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BadRow("empty text", f"{what} is empty")
    return value


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
    """The chat rules of mixtral_model.tokenizer (optional system message first, then user/assistant
    alternating from user), as a bad row."""
    try:
        validate_conversation(messages)
    except ValueError as error:
        raise BadRow("broken alternation", f"{what}: {error}") from None


def tokenize_sft_example(
    tokenizer: PreTrainedTokenizerBase,
    example: SftExample,
    max_length: int,
    completion_only: bool,
    truncation: str = "truncate",
) -> tuple[list[int], list[int], str]:
    """(input_ids, labels, outcome) of one conversation, encoded by `encode_conversation` (a text row:
    `encode_text`, every token trained, never cut: packing splits it).

    The prompt is everything before the first assistant token (before the completion for
    prompt/completion rows). A longer row than max_length is cut after max_length tokens
    (truncate: the prompt stays whole, or the row is dropped when the prompt alone fills
    max_length) or dropped (drop); a dropped row comes back with no tokens.
    """
    if isinstance(example, TextExample):
        input_ids = encode_text(tokenizer, example.text)
        return input_ids, list(input_ids), KEPT
    encoded = encode_conversation(tokenizer, example.messages)
    input_ids, trained = encoded["input_ids"], encoded["assistant_mask"]
    if example.num_prompt_messages is not None:
        prompt_length = len(
            encode_conversation(tokenizer, example.messages[: example.num_prompt_messages])["input_ids"]
        )
        trained = [0] * prompt_length + trained[prompt_length:]
    else:
        prompt_length = trained.index(1)
    outcome = KEPT
    if len(input_ids) > max_length:
        if truncation == "drop":
            return [], [], TOO_LONG
        if prompt_length >= max_length:
            return [], [], PROMPT_TOO_LONG
        input_ids, trained, outcome = input_ids[:max_length], trained[:max_length], TRUNCATED
    if not completion_only:
        return input_ids, list(input_ids), outcome
    return input_ids, [t if m else IGNORE_INDEX for t, m in zip(input_ids, trained, strict=True)], outcome


def encode_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> dict:
    """`input_ids` and `assistant_mask` of a conversation in the run's chat template: Mixtral-Instruct's
    (`encode_chat`), or a user's data.chat_template (its `{% generation %}` marks, via transformers)."""
    if tokenizer.chat_template == CHAT_TEMPLATE:
        return encode_chat(tokenizer, messages)
    return mixtral_model.tokenizer.encode_conversation(tokenizer, messages)


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """A language-modelling row as TRL's SFTTrainer tokenizes it: the EOS token appended to the text
    unless it ends with it, then the tokenizer (which adds BOS)."""
    if not text.endswith(tokenizer.eos_token):
        text += tokenizer.eos_token
    return tokenizer(text)["input_ids"]


def dpo_length_outcome(
    tokenizer: PreTrainedTokenizerBase,
    example: DpoExample,
    max_length: int,
    truncation: str,
    truncation_mode: str,
) -> tuple[str, int]:
    """(outcome, tokens of the chosen and rejected sequences): KEPT, TRUNCATED (TRL's collator will
    cut it with `truncation_mode`) or a long-row drop."""
    lengths = [
        len(encode_conversation(tokenizer, example.prompt + c)["input_ids"])
        for c in (example.chosen, example.rejected)
    ]
    if max(lengths) <= max_length:
        return KEPT, sum(lengths)
    if truncation == "drop":
        return TOO_LONG, 0
    if (
        truncation_mode == "keep_start"
        and len(encode_conversation(tokenizer, example.prompt)["input_ids"]) >= max_length
    ):
        return PROMPT_TOO_LONG, 0  # TRL drops it too: keep_start would leave no completion token
    return TRUNCATED, sum(lengths)


def check_chat_template_matches_encode_chat(
    tokenizer: PreTrainedTokenizerBase, row: dict, user_template: bool = False
) -> None:
    """DPOTrainer tokenizes with the chat template; it must give the ids SFT trained on (encode_chat, or
    with a user's data.chat_template, the template's own ids)."""
    conversation = row["prompt"] + row["chosen"]
    encode = encode_conversation if user_template else encode_chat
    expected = encode(tokenizer, conversation)["input_ids"]
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
