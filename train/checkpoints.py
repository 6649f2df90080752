"""Which checkpoint a run resumes from.

The HF Trainer writes `checkpoint-<step>/` in this order: model, optimizer and scheduler, RNG
states, then `trainer_state.json`, and only then deletes older checkpoints. A checkpoint is complete
when its `trainer_state.json` parses and names its own step, so one cut short by a crash or
`kill -9` is never chosen, and the previous complete one is still on disk.
"""

import json
from pathlib import Path

TRAINER_STATE = "trainer_state.json"


def checkpoint_step(path: Path) -> int | None:
    prefix, _, step = path.name.partition("-")
    return int(step) if prefix == "checkpoint" and step.isdigit() else None


def is_complete_checkpoint(path: Path) -> bool:
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return False
    return state.get("global_step") == checkpoint_step(path)


def latest_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The complete `checkpoint-<step>` directory with the highest step in output_dir, if any."""
    candidates = [
        (step, path)
        for path in Path(output_dir).glob("checkpoint-*")
        if (step := checkpoint_step(path)) is not None and is_complete_checkpoint(path)
    ]
    return str(max(candidates)[1]) if candidates else None
