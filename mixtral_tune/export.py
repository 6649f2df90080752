"""Merge a LoRA/QLoRA adapter into its base checkpoint, one safetensors shard at a time.

    mixtral-tune export OUTPUT_DIR/final EXPORT_DIR [--base PATH] [--dtype bfloat16]

The base comes from the adapter's `adapter_config.json` (`base_model_name_or_path`) unless --base is
given; for a QLoRA adapter that is the original-precision checkpoint it was quantized from at load,
so the merge lands on the unquantized weights. Each base shard is read on its own, every LoRA pair
of that shard applied in float32 (W += scaling * B @ A), the result cast to the base's dtype (or
--dtype) and written under the same shard name, with the index, config, tokenizer and
generation config alongside: memory holds about one shard plus the adapter, never the whole model.
The result is a hub-layout checkpoint that transformers' MixtralForCausalLM and ours load.
"""

import argparse  # noqa: I001  (mixtral_model.quiet is imported first)
import json
import math
import shutil
import sys
from pathlib import Path

import torch

from mixtral_model import quiet  # noqa: F401  (before PEFT: drops start-up messages nobody can act on)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mixtral_tune.config import DTYPES
from mixtral_tune.run_dir import OutputDirError, require_complete_final

ADAPTER_PREFIX = "base_model.model."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")  # fmt: skip


class ExportError(ValueError):
    """An export a user can fix; the message names the file and the fix."""


def adapter_base(adapter_dir: Path, base: str | None) -> str:
    require_complete_final("adapter_dir", adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{adapter_dir} is not a PEFT adapter (no adapter_config.json): nothing to merge"
        )
    return base or json.loads(config_file.read_text())["base_model_name_or_path"]


def local_checkpoint(base: str) -> Path:
    """The base checkpoint's directory: a local path, or the hub snapshot (weights and config only)."""
    if Path(base).is_dir():
        return Path(base)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(base, allow_patterns=["*.safetensors", "*.json"]))


def shard_files(base_dir: Path) -> dict[str, list[str]]:
    """Shard file name -> the tensor names it holds, from the index (or the single model.safetensors)."""
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        shards: dict[str, list[str]] = {}
        for name, shard in json.loads(index.read_text())["weight_map"].items():
            shards.setdefault(shard, []).append(name)
        return shards
    single = base_dir / "model.safetensors"
    if not single.is_file():
        raise ExportError(
            f"{base_dir} has no model.safetensors(.index.json): export needs a safetensors base"
        )
    with safe_open(single, "pt") as f:
        return {single.name: list(f.keys())}


def lora_scalings(config: dict, module_names: set[str]) -> dict[str, float]:
    """scaling = alpha / r (alpha / sqrt(r) with rsLoRA) per adapted module, with rank/alpha patterns."""
    from peft.utils.other import get_pattern_key

    scalings = {}
    for module in module_names:
        r = config["rank_pattern"].get(get_pattern_key(config["rank_pattern"] or {}, module), config["r"])
        alpha = config["alpha_pattern"].get(
            get_pattern_key(config["alpha_pattern"] or {}, module), config["lora_alpha"]
        )
        scalings[module] = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    return scalings


def read_adapter(adapter_dir: Path) -> tuple[dict[str, tuple], dict[str, torch.Tensor]]:
    """(base weight name -> (A, B, scaling), base weight name -> full replacement from modules_to_save)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or config.get("target_parameters"):
        raise ExportError(
            f"{adapter_dir}: only plain LoRA adapters on linear modules merge here (no DoRA, no "
            "target_parameters); merge with PEFT's merge_and_unload instead"
        )
    if config.get("bias", "none") != "none" or config.get("fan_in_fan_out"):
        raise ExportError(
            f"{adapter_dir}: LoRA bias/fan_in_fan_out adapters are not supported by this export"
        )
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    replaced = {}
    for key, tensor in weights.items():
        name = key.removeprefix(ADAPTER_PREFIX)
        for part in ("lora_A", "lora_B"):
            if f".{part}." in name:
                module = name.split(f".{part}.")[0]
                pairs.setdefault(module, {})[part] = tensor
                break
        else:
            replaced[name] = tensor
    scalings = lora_scalings(config, set(pairs))
    loras = {f"{module}.weight": (p["lora_A"], p["lora_B"], scalings[module]) for module, p in pairs.items()}
    return loras, replaced


def merge_adapter(
    adapter_dir: Path, export_dir: Path, base: str | None = None, dtype: str | None = None
) -> None:
    """Write base + adapter to `export_dir`, shard by shard (see the module docstring)."""
    if export_dir.exists() and any(export_dir.iterdir()):
        raise FileExistsError(f"export directory {export_dir} is not empty: choose a new one")
    base_dir = local_checkpoint(adapter_base(adapter_dir, base))
    loras, replaced = read_adapter(adapter_dir)
    shards = shard_files(base_dir)
    known = {name for names in shards.values() for name in names}
    missing = sorted((set(loras) | set(replaced)) - known)
    if missing:
        raise ExportError(
            f"the adapter changes {missing[0]}, which {base_dir} does not have: pass the adapter's base with --base"
        )
    export_dir.mkdir(parents=True, exist_ok=True)
    out_dtype = DTYPES[dtype] if dtype else None
    for shard, names in shards.items():
        merged = {}
        with safe_open(base_dir / shard, "pt") as f:
            for name in names:
                weight = replaced[name] if name in replaced else f.get_tensor(name)
                target = out_dtype or weight.dtype
                if name in loras:
                    a, b, scaling = loras[name]
                    weight = weight.float().addmm_(b.float(), a.float(), alpha=scaling)
                merged[name] = weight.to(target).contiguous() if weight.is_floating_point() else weight
        save_file(merged, export_dir / shard, metadata={"format": "pt"})
        del merged
    copy_metadata(base_dir, adapter_dir, export_dir, dtype)


def copy_metadata(base_dir: Path, adapter_dir: Path, export_dir: Path, dtype: str | None) -> None:
    """Index and config from the base (dtype updated), tokenizer and generation config from the adapter."""
    if (base_dir / "model.safetensors.index.json").is_file():
        shutil.copy(base_dir / "model.safetensors.index.json", export_dir)
    config = json.loads((base_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    if dtype:
        config["dtype"] = dtype
    (export_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        source = adapter_dir / name if (adapter_dir / name).is_file() else base_dir / name
        if source.is_file():
            shutil.copy(source, export_dir / name)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="mixtral-tune export", description=__doc__.splitlines()[0])
    parser.add_argument("adapter_dir", type=Path)
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--base", help="base checkpoint (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="output dtype (default: the base's)")
    args = parser.parse_args(argv)
    try:
        merge_adapter(args.adapter_dir, args.export_dir, args.base, args.dtype)
    except (FileNotFoundError, FileExistsError, ExportError, OutputDirError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"merged {args.adapter_dir} into {args.export_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
