"""The preparation cache's key (mixtral_tune/data.py cache_key) changes with every input that decides the
prepared rows: the tokenizer (vocabulary, chat template, special tokens), this code, the file's contents
and mtime, a hub dataset's revision and the commit it points at, the library versions, the seed and
every data setting except the four that do not decide rows (budgets, num_proc, cache_dir, prepare_on).
One end-to-end check: a tokenizer change makes the next prepare tokenize again."""

import dataclasses
import json
import os
import sys
from pathlib import Path

import huggingface_hub
import pytest
from omegaconf import OmegaConf

import mixtral_tune.data as data_module
from mixtral_model import load_tokenizer
from mixtral_tune.config import DataConfig, DataSourceConfig
from mixtral_tune.data import cache_key, prepare_sft_data, sources_of

NOT_IN_KEY = {"max_bad_fraction", "max_reported_bad_rows", "num_proc", "cache_dir", "prepare_on"}
# a value other than the default for each data setting that decides rows
CHANGED = {
    "kind": "dpo",
    "format": "alpaca",
    "columns": {"question": "prompt"},
    "config": "subset",
    "revision": "v2",
    "split": "validation",
    "eval_split": "dev",
    "eval_fraction": 0.2,
    "max_length": 48,
    "truncation": "drop",
    "dpo_truncation_mode": "keep_end",
    "packing": True,
    "completion_only": False,
    "chat_template": "chatml",
    "chat_template_tokens": ["<|im_start|>", "<|im_end|>"],
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture
def rows(tmp_path) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(6)))
    return path


def config(path, **overrides):
    return OmegaConf.structured(DataConfig(path=str(path), **{"kind": "sft", "max_length": 64, **overrides}))


def key(cfg, tokenizer, seed=0) -> str:
    train, evaluation = sources_of(cfg)
    return cache_key(cfg, tokenizer, seed, train + evaluation)


def test_every_data_setting_that_decides_rows_is_in_the_key(tokenizer, rows):
    fields = {f.name for f in dataclasses.fields(DataConfig)} - {"path", "mixture", "eval_path"}
    assert fields == set(CHANGED) | NOT_IN_KEY, "a new data setting: add it to CHANGED or NOT_IN_KEY"
    base = key(config(rows), tokenizer)
    for name, value in CHANGED.items():
        assert key(config(rows, **{name: value}), tokenizer) != base, name
    for name, value in {"max_bad_fraction": 0.5, "max_reported_bad_rows": 1, "num_proc": 3,
                        "cache_dir": "/elsewhere", "prepare_on": "global_main"}.items():  # fmt: skip
        assert key(config(rows, **{name: value}), tokenizer) == base, name
    assert key(config(rows), tokenizer, seed=1) != base
    assert key(config(rows, eval_path=str(rows)), tokenizer) != base


def test_mixture_sources_settings_are_in_the_key(tokenizer, rows):
    def mixture(**item):
        source = DataSourceConfig(**{"path": str(rows), **item})
        return OmegaConf.structured(DataConfig(path=None, mixture=[source], kind="sft", max_length=64))

    base = key(mixture(), tokenizer)
    for item in ({"weight": 0.5}, {"columns": {"prompt": "completion"}}, {"split": "other"}):
        assert key(mixture(**item), tokenizer) != base, item


def test_the_tokenizer_is_in_the_key(tokenizer, rows):
    base = key(config(rows), tokenizer)
    assert key(config(rows), load_tokenizer()) == base  # the same tokenizer built again: the same key

    grown = load_tokenizer()
    grown.add_tokens(["<extra_token>"])
    assert key(config(rows), grown) != base
    templated = load_tokenizer()
    templated.chat_template = templated.chat_template.replace("[INST]", "[INST] ")
    assert key(config(rows), templated) != base
    padded = load_tokenizer()
    padded.pad_token = "</s>"
    assert key(config(rows), padded) != base


def test_file_contents_and_mtime_are_in_the_key(tokenizer, rows):
    base = key(config(rows), tokenizer)
    stat = rows.stat()
    text = rows.read_text()
    rows.write_text(text.replace("q0", "q9"))  # same size, other contents
    assert rows.stat().st_size == stat.st_size
    os.utime(rows, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert key(config(rows), tokenizer) != base
    os.utime(rows, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the old mtime and size: read as unchanged
    assert key(config(rows), tokenizer) == base


def test_code_and_library_versions_are_in_the_key(tokenizer, rows, monkeypatch):
    base = key(config(rows), tokenizer)
    real_getsource = data_module.inspect.getsource
    for module_name in ("mixtral_tune.data", "mixtral_model.tokenizer"):
        edited = sys.modules[module_name]
        monkeypatch.setattr(
            data_module.inspect,
            "getsource",
            lambda module, edited=edited: real_getsource(module) + ("# edited" if module is edited else ""),
        )
        assert key(config(rows), tokenizer) != base, module_name
    monkeypatch.setattr(data_module.inspect, "getsource", real_getsource)
    real_version = data_module.importlib.metadata.version
    for library in ("datasets", "tokenizers", "transformers", "trl"):
        monkeypatch.setattr(
            data_module.importlib.metadata,
            "version",
            lambda name, library=library: real_version(name) + (".post1" if name == library else ""),
        )
        assert key(config(rows), tokenizer) != base, library


def test_hub_revision_and_the_commit_it_points_at_are_in_the_key(tokenizer, monkeypatch):
    """Online, a branch is resolved to its commit (huggingface_hub's dataset_info, answered here without
    the network); offline, the revision as given."""
    cfg = config("some-org/some-set")
    commits = {"main": "a" * 40, "v2": "b" * 40}
    asked = []

    class FakeApi:
        def dataset_info(self, repo_id, revision=None):
            asked.append((repo_id, revision))
            return huggingface_hub.hf_api.DatasetInfo(id=repo_id, sha=commits[revision or "main"])

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    before = key(cfg, tokenizer)
    assert asked == [("some-org/some-set", None)]
    commits["main"] = "c" * 40  # the branch moved
    assert key(cfg, tokenizer) != before

    def pinned(revision):
        source = DataSourceConfig(path="some-org/some-set", revision=revision)
        return OmegaConf.structured(DataConfig(path=None, mixture=[source], kind="sft", max_length=64))

    assert key(pinned("v2"), tokenizer) != key(pinned("main"), tokenizer)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert key(pinned("v2"), tokenizer) != key(pinned("main"), tokenizer)


def test_a_tokenizer_change_prepares_again(tokenizer, rows, tmp_path, monkeypatch):
    cfg = config(rows, cache_dir=str(tmp_path / "cache"))
    prepare_sft_data(cfg, tokenizer, seed=0)
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    grown = load_tokenizer()
    grown.add_tokens(["<extra_token>"])
    prepare_sft_data(cfg, grown, seed=0)
    assert len(sorted(p.name for p in (tmp_path / "cache").iterdir())) == len(entries) + 1
