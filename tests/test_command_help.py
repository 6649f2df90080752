"""`mixtral-tune sft --help` / `dpo --help`: every config group with every shipped option, the recipes of the
stage, the chat templates, and main keys whose examples compose against the schema."""

import dataclasses

import pytest

from mixtral_tune import cli
from mixtral_tune.command_help import GROUPS, main_keys
from mixtral_tune.config import compose, schema_keys, trl_config_class
from mixtral_tune.shipped import CONFIG_DIR, RECIPE_DIR


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_help_lists_every_group_option_recipe_and_template(stage, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main([stage, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for group in ("model", "data", "peft", "deepspeed", "trainer"):
        assert f"  {group}:" in text
        options = [path.stem for path in (CONFIG_DIR / group).glob("*.yaml")]
        assert options
        for option in options:
            assert f" {option} " in text or f"*{option} " in text, f"{group}={option} missing from --help"
    for path in RECIPE_DIR.rglob("*.yaml"):
        recipe = str(path.relative_to(RECIPE_DIR).with_suffix(""))
        assert (f"  {recipe}\n" in text) == path.stem.startswith(stage), recipe
    assert "chatml, zephyr" in text
    for key, example in main_keys(stage).items():
        assert f"  {key} " in text and f"e.g. {example[:40]}" in text


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_every_main_key_is_a_key_and_its_example_composes(stage):
    fields = {field.name for field in dataclasses.fields(trl_config_class(stage))}
    known = set(schema_keys())
    assert set(GROUPS) == {"model", "data", "peft", "deepspeed", "trainer"}
    for key, example in main_keys(stage).items():
        assert key in known or key.removeprefix("trainer.") in fields, key
        assert example.startswith(f"{key}=")
        compose(stage, [example])  # a wrong type or an unknown key raises ConfigError
