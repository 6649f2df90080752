"""Strict hub-layout checkpoint loading.

PreTrainedModel.from_pretrained does the reading (single-file or sharded safetensors, meta-device
init, DeepSpeed zero.Init, bitsandbytes); this mixin turns its warnings into errors: a missing,
unexpected or wrongly shaped key, or an unreadable file, stops the load with the key named,
instead of leaving random weights in place.
"""

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
        mismatched = [f"{key} {tuple(found)} != expected {tuple(want)}" for key, found, want in info["mismatched_keys"]]
        problems.append(f"wrongly shaped keys: {_describe(mismatched)}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match the model config: " + "; ".join(problems))


class CheckpointLoadingMixin:
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, output_loading_info: bool = False, **kwargs):
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        except (SafetensorError, OSError) as error:
            if "does not appear to have a file named" in str(error) or "is not a local folder" in str(error):
                raise
            raise CheckpointError(f"cannot read checkpoint {pretrained_model_name_or_path}: {error}") from error
        check_loading_info(info, pretrained_model_name_or_path)
        return (model, info) if output_loading_info else model
