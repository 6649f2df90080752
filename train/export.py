"""Merge a LoRA/QLoRA adapter into its base model and write a hub-layout checkpoint.

    python train/export.py OUTPUT_DIR/final EXPORT_DIR [--base PATH] [--dtype bfloat16]

The base comes from the adapter's `adapter_config.json` (`base_model_name_or_path`) unless --base is
given; it is loaded unquantized in --dtype, the adapter merged in, and the result written as sharded
safetensors with the tokenizer, loadable by transformers' MixtralForCausalLM and by ours.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import peft  # noqa: E402

from mixtral_model import MixtralForCausalLM, load_tokenizer  # noqa: E402
from train.model_factory import DTYPES  # noqa: E402


def adapter_base(adapter_dir: Path, base: str | None) -> str:
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{adapter_dir} is not a PEFT adapter (no adapter_config.json): nothing to merge"
        )
    return base or json.loads(config_file.read_text())["base_model_name_or_path"]


def merge_adapter(
    adapter_dir: Path, export_dir: Path, base: str | None = None, dtype: str = "float32"
) -> None:
    if export_dir.exists() and any(export_dir.iterdir()):
        raise FileExistsError(f"export directory {export_dir} is not empty: choose a new one")
    model = MixtralForCausalLM.from_pretrained(adapter_base(adapter_dir, base), dtype=DTYPES[dtype])
    merged = peft.PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(export_dir, max_shard_size="5GB")
    load_tokenizer(adapter_dir).save_pretrained(export_dir)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter_dir", type=Path)
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--base", help="base checkpoint (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args(argv)
    try:
        merge_adapter(args.adapter_dir, args.export_dir, args.base, args.dtype)
    except (FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"merged {args.adapter_dir} into {args.export_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
