"""A run's saved config, and what a resume may change in it.

A run writes OUTPUT_DIR/run_config.yaml when it starts training and never rewrites it. Every start and
every resume appends an entry to OUTPUT_DIR/run_config_history.yaml: when, the checkpoint continued,
the world size, and each key whose value changed (old and new). The config a checkpoint was trained
with is run_config.yaml with the history's changes applied in order. A resume compares it with the
new config: a change of a key that TRAINS (mixtral_tune/config.py RESUME_CHANGES) is refused unless the
key is in `resume_allow_changes`; every accepted change is printed and recorded in the history.
"""

import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from mixtral_tune.config import (
    OBSERVES,
    ConfigError,
    resume_change_kind,
    trainer_value,
    world_size,
)
from mixtral_tune.config import (
    saved_config as config_as_saved,
)

RUN_CONFIG = "run_config.yaml"
HISTORY = "run_config_history.yaml"
NOT_COMPARED = ("resume", "resume_allow_changes")  # how this launch resumes, not what the run is


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested mapping (lists are values)."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def comparable(cfg: DictConfig, keys: set[str]) -> dict[str, Any]:
    """The config's resolved values by dotted key; `trainer.KEY` keys it leaves out at TRL's default."""
    flat = flatten(OmegaConf.to_container(cfg, resolve=True))
    for key in keys - flat.keys():
        section, _, name = key.partition(".")
        flat[key] = trainer_value(cfg, name) if section == "trainer" and name else None
    return {key: value for key, value in flat.items() if key not in NOT_COMPARED}


def read_history(run_dir: Path) -> list[dict]:
    path = run_dir / HISTORY
    return (yaml.safe_load(path.read_text()) or []) if path.is_file() else []


def saved_config(run_dir: Path) -> tuple[DictConfig | None, int | None]:
    """The config the run in run_dir last trained with, and its world size (None for either not saved)."""
    if not (run_dir / RUN_CONFIG).is_file():
        return None, None
    cfg = OmegaConf.load(run_dir / RUN_CONFIG)
    size = None
    for entry in read_history(run_dir):
        for key, change in (entry.get("changes") or {}).items():
            if key != "world_size":
                OmegaConf.update(cfg, key, change["to"], force_add=True)
        size = entry.get("world_size", size)
    return cfg, size


def config_changes(checkpoint: str | Path, cfg: DictConfig) -> dict[str, dict] | None:
    """{key: {from, to}} for every value that differs from the checkpoint's run (world size included);
    None when that run saved no config."""
    saved, saved_size = saved_config(Path(checkpoint).resolve().parent)
    if saved is None:
        return None
    keys = set(flatten(OmegaConf.to_container(saved))) | set(flatten(OmegaConf.to_container(cfg)))
    old, new = comparable(saved, keys), comparable(cfg, keys)
    changes = {
        key: {"from": old.get(key), "to": new.get(key)}
        for key in sorted(keys)
        if old.get(key) != new.get(key)
    }
    if saved_size is not None and saved_size != world_size():
        changes["world_size"] = {"from": saved_size, "to": world_size()}
    return changes


def check_resume_changes(cfg: DictConfig, checkpoint: str | Path) -> None:
    """Refuse, with one line naming the keys, changes that alter what is trained and were not allowed."""
    changes = config_changes(checkpoint, cfg) or {}
    refused = [
        key for key in changes if resume_change_kind(key) != OBSERVES and key not in cfg.resume_allow_changes
    ]
    if refused:
        listed = ", ".join(f"{key} ({changes[key]['from']} -> {changes[key]['to']})" for key in refused)
        raise ConfigError(
            f"resume from {checkpoint}: these changes alter what is trained: {listed}; restore them, start a "
            f"new output_dir, or allow them with resume_allow_changes=[{','.join(refused)}]"
        )


def describe(changes: dict[str, dict]) -> str:
    return "; ".join(f"{key}: {change['from']} -> {change['to']}" for key, change in changes.items())


def record_run(cfg: DictConfig, checkpoint: str | None) -> None:
    """Print what a resume continues and what changed; write run_config.yaml on a fresh start and
    append this launch to the history (first rank only; each file replaced whole, never half-written)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    output = Path(cfg.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    entry = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "world_size": world_size()}
    if checkpoint is None:
        write_atomically(output / RUN_CONFIG, OmegaConf.to_yaml(config_as_saved(cfg)))
        write_atomically(output / HISTORY, yaml.safe_dump([entry | {"started": True}], sort_keys=False))
        return
    changes = config_changes(checkpoint, cfg)
    print(f"[resume] continuing {checkpoint}", flush=True)
    if changes is None:
        print(f"warning: no {RUN_CONFIG} beside {checkpoint}: its config cannot be compared", file=sys.stderr)
    else:
        print(f"[resume] config changes: {describe(changes) or 'none'}", flush=True)
    source = Path(checkpoint).resolve().parent
    if not (output / RUN_CONFIG).is_file():
        if changes is not None and source != output.resolve():  # a new output_dir continues another run
            write_atomically(output / RUN_CONFIG, (source / RUN_CONFIG).read_text())
            if (source / HISTORY).is_file():
                write_atomically(output / HISTORY, (source / HISTORY).read_text())
        else:
            write_atomically(output / RUN_CONFIG, OmegaConf.to_yaml(config_as_saved(cfg)))
    entry |= {"resumed_from": str(checkpoint), "changes": changes or {}}
    history = read_history(output) + [entry]
    write_atomically(output / HISTORY, yaml.safe_dump(history, sort_keys=False))


def write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)
