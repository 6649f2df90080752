"""Strict hub-layout checkpoint loading.

PreTrainedModel.from_pretrained does the reading (single-file or sharded safetensors, meta-device
init, DeepSpeed zero.Init, bitsandbytes); this mixin turns its warnings into errors: a missing,
unexpected or wrongly shaped key, or an unreadable file, stops the load with the key named,
instead of leaving random weights in place.
"""

from pathlib import Path

from safetensors import SafetensorError


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: names the offending keys or file."""


def _describe(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_loading_info(info: dict, path) -> None:
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing keys: {_describe(info['missing_keys'])}")
    if info.get("unexpected_keys"):
        problems.append(f"unexpected keys: {_describe(info['unexpected_keys'])}")
    if info.get("mismatched_keys"):
        mismatched = [
            f"{key} {tuple(found)} != expected {tuple(want)}" for key, found, want in info["mismatched_keys"]
        ]
        problems.append(f"wrongly shaped keys: {_describe(mismatched)}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match the model config: " + "; ".join(problems))


def looks_like_local_path(name_or_path) -> bool:
    """A hub id is `name` or `namespace/name`; anything else (absolute, ./, ~, deeper) is a local path."""
    text = str(name_or_path)
    return not isinstance(name_or_path, str) or text.startswith(("/", ".", "~")) or text.count("/") > 1


def check_checkpoint_path(name_or_path) -> None:
    if looks_like_local_path(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"checkpoint directory {name_or_path} does not exist: check the path")


class CheckpointLoadingMixin:
    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, *args, output_loading_info: bool = False, **kwargs
    ):
        check_checkpoint_path(pretrained_model_name_or_path)
        try:
            # Mismatched shapes come back in the loading info, so the error below can name them.
            model, info = super().from_pretrained(
                pretrained_model_name_or_path,
                *args,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
                **kwargs,
            )
        except SafetensorError as error:
            raise CheckpointError(
                f"cannot read checkpoint {pretrained_model_name_or_path}: {error}"
            ) from error
        check_loading_info(info, pretrained_model_name_or_path)
        return (model, info) if output_loading_info else model
