"""Helpers the data tests share (tests/test_data.py, tests/test_data_formats.py): a data config and a
JSONL file of rows."""

import json
from pathlib import Path

from omegaconf import OmegaConf

from mixtral_tune.config import DataConfig


def data_cfg(path, kind="sft", **overrides):
    """The `data` section for one file at `path`, max_length 64 unless overridden."""
    return OmegaConf.structured(DataConfig(path=str(path), kind=kind, **{"max_length": 64, **overrides}))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
