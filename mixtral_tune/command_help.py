"""`mixtral-tune sft --help` / `dpo --help`: the recipes, config groups and main keys of a pipeline.

Built from what ships, so it cannot drift from it: the recipes of the stage (recipes/), every option
of every config group (configs/GROUP/*.yaml, with the first line of its header comment), the shipped
chat templates (configs/chat_templates/), the stage's
default choices (configs/STAGE.yaml), and the values the main keys take in the composed default config.
The main keys and their examples are listed in MAIN_KEYS; tests/test_command_help.py composes every
example and checks every key against the schema.
"""

from omegaconf import OmegaConf

from mixtral_tune.chat_template import shipped_templates
from mixtral_tune.shipped import CONFIG_DIR, recipe_files

GROUPS = ("model", "data", "peft", "deepspeed", "trainer")
GROUP_FILES = {"deepspeed": "or a DeepSpeed JSON file: deepspeed=ds.json"}
# The keys a first run sets, with one example each (stage-specific examples in STAGE_EXAMPLES).
MAIN_KEYS = {
    "output_dir": "output_dir=outputs/my-run",
    "max_steps": "max_steps=500",
    "resume": "resume=true",
    "model.name_or_path": "model.name_or_path=mistralai/Mixtral-8x7B-Instruct-v0.1",
    "model.dtype": "model.dtype=bfloat16",
    "data.path": "data.path=my_data.jsonl",
    "data.eval_path": "data.eval_path=my_eval.jsonl",
    "data.eval_fraction": "data.eval_fraction=0.05",
    "data.max_length": "data.max_length=4096",
    "data.chat_template": "data.chat_template=chatml",
    "peft.r": "peft.r=32",
    "peft.targets": "peft.targets=experts",
    "trainer.learning_rate": "trainer.learning_rate=1e-4",
    "trainer.per_device_train_batch_size": "trainer.per_device_train_batch_size=2",
    "trainer.gradient_accumulation_steps": "trainer.gradient_accumulation_steps=8",
    "trainer.eval_steps": "trainer.eval_steps=100",
    "trainer.report_to": "trainer.report_to=none",
    "evaluation.sample_prompts": "evaluation.sample_prompts=4",
    "evaluation.early_stopping_patience": "evaluation.early_stopping_patience=3",
}
STAGE_EXAMPLES = {
    "sft": {"data.packing": "data.packing=true"},
    "dpo": {"trainer.beta": "trainer.beta=0.05"},
}
TRL_CONFIGS = {"sft": "SFTConfig", "dpo": "DPOConfig"}


def main_keys(stage: str) -> dict[str, str]:
    return MAIN_KEYS | STAGE_EXAMPLES.get(stage, {})


def group_options(group: str) -> dict[str, str]:
    """Option name -> the first line of its header comment, for every shipped option of `group`."""
    options = {}
    for path in sorted((CONFIG_DIR / group).glob("*.yaml")):
        first = path.read_text(encoding="utf-8").splitlines()[:1]
        options[path.stem] = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
    return options


def default_choices(stage: str) -> dict[str, str]:
    """Group -> the option configs/STAGE.yaml picks."""
    choices = {}
    for item in OmegaConf.load(CONFIG_DIR / f"{stage}.yaml").defaults:
        if not isinstance(item, str):
            choices.update(OmegaConf.to_container(item))
    return choices


def stage_recipes(stage: str) -> list[str]:
    return [name for name, path in recipe_files().items() if OmegaConf.load(path).get("stage") == stage]


def example_recipe(stage: str) -> str:
    """The stage's single-GPU QLoRA recipe when one ships (the first real job), else its first recipe."""
    recipes = stage_recipes(stage)
    return next((name for name in recipes if name.endswith("_qlora")), recipes[0] if recipes else "NAME")


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def help_text(stage: str, usage: str) -> str:
    """The --help page of pipeline `stage` (`usage`: its usage lines)."""
    from mixtral_tune.config import compose  # composing the defaults shows the values a run starts from

    cfg = compose(stage)
    defaults = default_choices(stage)
    lines = [usage, "", f"Recipes for {stage} (+recipe=NAME, or +recipe=FILE.yaml):"]
    lines += [f"  {name}" for name in stage_recipes(stage)]
    lines += ["", "Config groups (GROUP=OPTION; * = the default before a recipe):"]
    for group in GROUPS:
        options = group_options(group)
        lines.append(f"  {group}:" + (f"  ({GROUP_FILES[group]})" if group in GROUP_FILES else ""))
        for option, about in options.items():
            mark = "*" if defaults.get(group) == option else " "
            lines.append(shorten(f"   {mark}{option:<24} {about}", 110))
        example = next((o for o in options if o != defaults.get(group)), None)
        if example:
            lines.append(f"    e.g. {group}={example}")
    templates = ", ".join(shipped_templates())
    lines += [
        "",
        f"Chat templates (data.chat_template=NAME|FILE.jinja; null = Mixtral-Instruct's format): {templates}",
        "",
        "Main keys (key=value; default before a recipe, then an example):",
    ]
    for key, example in main_keys(stage).items():
        value = OmegaConf.select(cfg, key, default=None)
        shown = (
            "null"
            if value is None
            else str(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)
        )
        lines.append(shorten(f"  {key:<36} {shown:<14} e.g. {example}", 110))
    lines += [
        "",
        f"Every key: mixtral_tune/config.py (the schema); trainer.* takes any field of TRL's {TRL_CONFIGS[stage]}.",
        f"Example: mixtral-tune {stage} +recipe={example_recipe(stage)} "
        f"{main_keys(stage)['data.path']} output_dir=outputs/my-run --print-config",
    ]
    return "\n".join(lines)
