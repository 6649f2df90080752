"""The `mixtral-tune` command: one entry point for the pipelines (SFT, DPO, KTO, ORPO, CPO/SimPO), the
export and the demo.

    mixtral-tune sft +recipe=tiny/sft max_steps=3            (Hydra overrides, as train/sft.py takes them)
    mixtral-tune dpo +recipe=tiny/dpo model.name_or_path=outputs/tiny-sft/final
    mixtral-tune kto +recipe=tiny/kto model.name_or_path=outputs/tiny-sft/final
    mixtral-tune orpo +recipe=tiny/orpo
    mixtral-tune cpo +recipe=tiny/simpo                       (SimPO is CPO's loss_type=simpo, as in TRL)
    mixtral-tune export OUTPUT_DIR/final EXPORT_DIR
    mixtral-tune demo --seed 1

`python -m mixtral_tune COMMAND ...` is the same; under torchrun use `torchrun ... -m mixtral_tune.sft ...`
(or `torchrun ... $(which mixtral-tune) sft ...`). A command's module is imported only when it runs,
so `--help` answers at once.
"""

import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

from mixtral_tune.shipped import recipe_files

COMMANDS = {
    "sft": "supervised fine-tuning (TRL SFTTrainer): +recipe=NAME|FILE.yaml [key=value ...] [--print-config]",
    "dpo": "DPO alignment (TRL DPOTrainer): +recipe=NAME|FILE.yaml [key=value ...] [--print-config]",
    "kto": "KTO alignment on unpaired feedback (TRL KTOTrainer): +recipe=NAME|FILE.yaml [key=value ...]",
    "orpo": "ORPO, no reference model (TRL experimental ORPOTrainer): +recipe=NAME|FILE.yaml [key=value ...]",
    "cpo": "CPO and SimPO (trainer.loss_type=simpo; TRL experimental CPOTrainer): +recipe=NAME|FILE.yaml [...]",
    "esft-select": "score experts on the recipe's data, write the ESFT selection: +recipe=NAME [--score gate|token] [--threshold P]",
    "export": "merge a LoRA/QLoRA adapter into its base, shard by shard: ADAPTER_DIR EXPORT_DIR [--base PATH]",
    "demo": "the tiny SFT -> DPO demo on CPU, with held-out evaluation: [--output-dir DIR] [--seed S]",
}

MODULES = {"esft-select": "esft"}  # commands whose module has another name


def usage() -> str:
    lines = [f"usage: mixtral-tune {{{','.join(COMMANDS)}}} [ARGS ...]", ""]
    lines += [f"  {name:<12} {text}" for name, text in COMMANDS.items()]
    lines += [
        "",
        "`mixtral-tune COMMAND --help` shows a command's arguments.",
        f"Shipped recipes (+recipe=NAME): {', '.join(recipe_files())}",
    ]
    return "\n".join(lines)


def package_version() -> str:
    try:
        return version("mixtral-tune")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    """Run `mixtral-tune COMMAND ARGS`; return the exit status (errors a user can fix exit 2)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"mixtral-tune {package_version()}")
        return 0
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command '{command}': use one of {', '.join(COMMANDS)} (mixtral-tune --help)",
              file=sys.stderr)  # fmt: skip
        return 2
    importlib.import_module(f"mixtral_tune.{MODULES.get(command, command)}").main(args)
    return 0
