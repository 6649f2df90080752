"""Config layer: every shipped recipe composes and validates, the CLI contract works on each of them,
and unknown keys, wrong types and impossible combinations fail with one line naming the key."""

import json

import pytest
from omegaconf import OmegaConf

from train import config as config_module
from train.checkpoints import latest_complete_checkpoint
from train.config import (
    RECIPE_DIR,
    ConfigError,
    check_architecture_matches,
    compose,
    deepspeed_dict,
    load_config,
    lora_modules_to_save,
    lora_target_modules,
    recipe_files,
    resume_checkpoint,
    validate,
)

RECIPES = sorted(recipe_files())
EXPECTED_RECIPES = {
    "tiny/sft",
    "tiny/dpo",
    "mixtral-8x7b/sft_full_zero3",
    "mixtral-8x7b/sft_qlora",
    "mixtral-8x7b/dpo_qlora",
    "mixtral-8x7b/dpo_qlora_zero3",
}


def stage_of(recipe: str) -> str:
    return OmegaConf.load(RECIPE_DIR / f"{recipe}.yaml").stage


def compose_recipe(recipe: str, *overrides: str):
    return compose(stage_of(recipe), [f"+recipe={recipe}", *overrides])


def config_error(config_name: str, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(config_name, overrides)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


@pytest.fixture
def rows_file(tmp_path):
    """A one-row data file of each kind, for data.path overrides."""

    def write(kind: str) -> str:
        row = (
            {"messages": [{"role": "user", "content": "Copy: a"}, {"role": "assistant", "content": "a"}]}
            if kind == "sft"
            else {"prompt": "Copy: a", "chosen": "a", "rejected": "b"}
        )
        path = tmp_path / f"{kind}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        return str(path)

    return write


def test_the_expected_recipes_ship():
    assert EXPECTED_RECIPES <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_and_validates(recipe):
    cfg = compose_recipe(recipe)
    validate(cfg)
    assert cfg.stage == stage_of(recipe) == cfg.data.kind
    assert cfg.max_steps == -1 or cfg.max_steps > 0


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_opens_with_its_launch_command_and_hardware(recipe):
    lines = (RECIPE_DIR / f"{recipe}.yaml").read_text().splitlines()
    assert lines[0].startswith("# Launch:") and f"./launch.sh {stage_of(recipe)} +recipe={recipe}" in lines[0]
    assert lines[1].startswith("# Hardware:")


# Each combination carries every override of the CLI contract once; the three of them cover every
# choice of `peft` and `deepspeed` and every form of `resume` (latest, path, off).
CONTRACT_COMBINATIONS = [("none", "zero2", "latest"), ("lora", "zero3", "path"), ("qlora", "none", "off")]


@pytest.mark.parametrize("peft, deepspeed, resume", CONTRACT_COMBINATIONS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_cli_contract_overrides_work_on_every_recipe(
    recipe, peft, deepspeed, resume, rows_file, tmp_path, monkeypatch
):
    monkeypatch.setenv("WORLD_SIZE", "2")
    output_dir = tmp_path / "run"
    for step in (5, 20):
        (output_dir / f"checkpoint-{step}").mkdir(parents=True)
        (output_dir / f"checkpoint-{step}" / "trainer_state.json").write_text(
            json.dumps({"global_step": step})
        )
    resume_value = {"latest": "true", "path": str(output_dir / "checkpoint-5"), "off": "false"}[resume]
    data_path = rows_file(stage_of(recipe))
    cfg = config_module.compose(
        stage_of(recipe),
        [
            f"+recipe={recipe}",
            f"output_dir={output_dir}",
            "max_steps=7",
            f"data.path={data_path}",
            f"peft={peft}",
            f"deepspeed={deepspeed}",
            "model.expert_parallel_size=2",
            f"resume={resume_value}",
        ],
    )
    assert (cfg.output_dir, cfg.max_steps, cfg.data.path) == (str(output_dir), 7, data_path)
    assert cfg.peft.method == peft
    assert config_module.zero_stage(cfg) == {"none": 0, "zero2": 2, "zero3": 3}[deepspeed]
    assert (deepspeed_dict(cfg) is None) == (deepspeed == "none")
    assert cfg.model.expert_parallel_size == 2
    expected_resume = {"latest": True, "path": str(output_dir / "checkpoint-5"), "off": False}[resume]
    assert resume_checkpoint(cfg) == expected_resume
    assert latest_complete_checkpoint(cfg.output_dir) == str(output_dir / "checkpoint-20")
    if peft == "none" or deepspeed == "none":
        with pytest.raises(ConfigError, match="model.expert_parallel_size=2"):
            validate(cfg)  # EP=2 is refused without DeepSpeed, and a full fine-tune under EP cannot resume
    else:
        validate(cfg)  # EP=2 with LoRA under ZeRO-3, resuming


@pytest.mark.parametrize(
    "overrides",
    [["peft=none", "deepspeed=zero3"], ["peft=lora", "deepspeed=zero2"], ["peft=qlora", "deepspeed=zero2"]],
)
def test_expert_parallel_resume_outside_zero3_adapters_is_one_line(overrides, tmp_path, monkeypatch):
    """Resume under EP is proven only for LoRA/QLoRA under ZeRO-3 (tests/test_pipelines.py): a ZeRO-2
    EP=2 LoRA run resumed at rel 1.2e-4 from the uninterrupted losses, so the rest is refused."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    cfg = compose_recipe("tiny/sft", *overrides, "model.expert_parallel_size=2", "resume=true",
                         f"output_dir={tmp_path}")  # fmt: skip
    with pytest.raises(ConfigError, match="model.expert_parallel_size=2 with resume needs") as caught:
        validate(cfg)
    assert "\n" not in str(caught.value)


def test_command_line_beats_recipe_group_choice():
    cfg = compose_recipe("mixtral-8x7b/sft_qlora", "peft=lora", "deepspeed=zero3")
    assert cfg.peft.method == "lora"
    assert config_module.zero_stage(cfg) == 3


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.hiden_size=64", "model.hiden_size"),
        ("outptu_dir=/tmp/x", "outptu_dir"),
        ("trainer.dpo.gamma=1", "trainer.dpo.gamma"),
    ],
)
def test_unknown_key_fails_naming_it(override, key):
    assert key in config_error("sft", ["+recipe=tiny/sft", override])


@pytest.mark.parametrize(
    "override, key",
    [
        ("max_steps=many", "max_steps"),
        ("model.expert_parallel_size=two", "model.expert_parallel_size"),
        ("data.packing=maybe", "data.packing"),
        ("trainer.learning_rate=fast", "trainer.learning_rate"),
    ],
)
def test_wrong_type_fails_naming_the_key(override, key):
    assert key in config_error("sft", ["+recipe=tiny/sft", override])


def test_unknown_key_suggests_the_closest_schema_key():
    message = config_error("sft", ["+recipe=tiny/sft", "trainer.learning_rat=1e-4"])
    assert "did you mean 'trainer.learning_rate'" in message
    assert "+deepspeed.foo=" in config_error("sft", ["deepspeed=zero2", "deepspeed.foo=1"])


def test_unknown_recipe_and_group_option_fail_with_the_choices():
    message = config_error("sft", ["+recipe=tiny/nope"])
    assert "recipe/tiny/nope" in message and "tiny/sft" in message
    message = config_error("sft", ["+recipe=tiny/sft", "peft=qlroa"])
    assert "peft/qlroa" in message and "qlora" in message


@pytest.mark.parametrize(
    "config_name, overrides, key",
    [
        (
            "sft",
            ["deepspeed=zero3", "peft=qlora", "peft.quant.quant_storage=uint8"],
            "peft.quant.quant_storage",
        ),
        ("sft", ["peft=qlora", "deepspeed=zero3_offload"], "offload_param"),
        ("sft", ["model.attn_implementation=flash_attention_2"], "model.attn_implementation"),
        ("sft", ["model.attn_implementation=fast"], "model.attn_implementation"),
        ("sft", ["model.expert_parallel_size=3"], "model.expert_parallel_size"),
        ("sft", ["model.expert_parallel_size=4"], "world size"),
        ("sft", ["model.architecture.num_key_value_heads=3"], "num_key_value_heads"),
        ("sft", ["model.architecture.num_experts_per_tok=5"], "num_experts_per_tok"),
        ("dpo", ["+recipe=tiny/dpo", "data.packing=true"], "data.packing"),
        ("dpo", ["+recipe=tiny/dpo", "data=demo_sft"], "data.kind"),
        ("sft", ["data.eval_fraction=0.1"], "data.eval_path"),
        ("sft", ["data.path=./missing.jsonl"], "data.path"),
        ("sft", ["model.name_or_path=./no/such/model"], "model.name_or_path"),
        ("sft", ["max_steps=0"], "max_steps"),
        ("sft", ["resume=true", "output_dir=/nonexistent/run"], "resume"),
        ("sft", ["resume=/nonexistent/checkpoint-1"], "resume"),
        ("sft", ["resume=5"], "resume"),
        ("sft", ["data.max_bad_fraction=1.5"], "data.max_bad_fraction"),
        ("sft", ["peft=lora", "peft.targets=router"], "peft.targets"),
        ("dpo", ["+recipe=tiny/dpo", "trainer.dpo.loss_type=kto"], "trainer.dpo.loss_type"),
        ("sft", ["trainer.report_to=mlflow"], "trainer.report_to"),
        (
            "sft",
            ["deepspeed=zero2", "+deepspeed.zero_optimization.offload_param.device=cpu"],
            "offload_param",
        ),
    ],
)
def test_impossible_combination_fails_naming_the_key(config_name, overrides, key):
    message = config_error(config_name, overrides)
    assert key in message


def test_a_recipe_launched_with_the_other_pipeline_names_the_right_one():
    assert "./launch.sh dpo" in config_error("sft", ["+recipe=tiny/dpo"])
    assert "./launch.sh sft" in config_error("dpo", ["+recipe=mixtral-8x7b/sft_qlora"])


def test_qlora_without_bitsandbytes_fails_naming_the_package(monkeypatch):
    real_find_spec = config_module.importlib.util.find_spec
    monkeypatch.setattr(
        config_module.importlib.util,
        "find_spec",
        lambda name: None if name == "bitsandbytes" else real_find_spec(name),
    )
    assert "bitsandbytes" in config_error("sft", ["+recipe=mixtral-8x7b/sft_qlora"])


def test_missing_required_value_names_it():
    assert "data.path" in config_error("sft", ["data.path=???"])


def test_resume_accepts_booleans_written_as_strings():
    cfg = compose("sft", ["+recipe=tiny/sft"])
    for text, expected in (("True", True), ("false", False)):
        cfg.resume = text
        assert resume_checkpoint(cfg) is expected


def test_deepspeed_groups_follow_the_hf_auto_conventions():
    for choice in ("zero2", "zero3", "zero2_offload", "zero3_offload"):
        ds = deepspeed_dict(compose("sft", [f"deepspeed={choice}"]))
        assert ds["train_micro_batch_size_per_gpu"] == "auto"
        assert ds["gradient_accumulation_steps"] == "auto"
        assert ds["bf16"]["enabled"] == "auto"
        assert ds["zero_optimization"]["stage"] == int(choice[4])
    offload = deepspeed_dict(compose("sft", ["deepspeed=zero3_offload"]))
    assert offload["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert offload["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_lora_never_targets_the_router_unless_asked():
    cfg = compose("sft", ["peft=lora"])
    for targets in ("attention", "experts", "both"):
        cfg.peft.targets = targets
        assert "gate" not in lora_target_modules(cfg)
    assert lora_modules_to_save(cfg) == []
    cfg.peft.train_router = True
    assert lora_modules_to_save(cfg) == ["gate"]


def test_a_checkpoint_with_another_architecture_is_refused_naming_the_key():
    from mixtral_model import MixtralConfig

    cfg = compose("sft", ["model.name_or_path=some/checkpoint"])
    arch = OmegaConf.to_container(cfg.model.architecture)
    check_architecture_matches(cfg, MixtralConfig(**arch))
    with pytest.raises(ConfigError, match="model.architecture.num_local_experts=4 but some/checkpoint has 8"):
        check_architecture_matches(cfg, MixtralConfig(**{**arch, "num_local_experts": 8}))


def test_mixtral_8x7b_model_group_matches_the_published_architecture():
    arch = compose_recipe("mixtral-8x7b/sft_qlora").model.architecture
    assert (arch.num_hidden_layers, arch.hidden_size, arch.intermediate_size) == (32, 4096, 14336)
    assert (arch.num_local_experts, arch.num_experts_per_tok) == (8, 2)
    assert (arch.num_attention_heads, arch.num_key_value_heads, arch.vocab_size) == (32, 8, 32000)
    assert arch.rope_theta == 1.0e6
