"""Config layer: every shipped recipe composes and validates, the CLI contract works on each of them,
and unknown keys, wrong types and impossible combinations fail with one line naming the key."""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mixtral_model.hub_weights import looks_like_local_path
from mixtral_tune import config as config_module
from mixtral_tune.config import (
    STAGE_DATA_KINDS,
    ConfigError,
    check_architecture_matches,
    compose,
    deepspeed_dict,
    load_config,
    lora_modules_to_save,
    lora_target_modules,
    resume_checkpoint,
    validate,
)
from mixtral_tune.shipped import RECIPE_DIR, recipe_files
from mixtral_tune.training.resume import latest_complete_checkpoint, mark_checkpoint_complete

RECIPES = sorted(recipe_files())
EXPECTED_RECIPES = {
    "tiny/sft",
    "tiny/dpo",
    "mixtral-8x7b/sft_full_zero3",
    "mixtral-8x7b/sft_qlora",
    "mixtral-8x7b/dpo_qlora",
    "mixtral-8x7b/dpo_qlora_zero3",
    "mixtral-8x7b/sft_full_ep",
    "mixtral-8x7b/sft_lora_ep",
    "mixtral-8x7b/dpo_lora_ep",
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
def test_recipe_composes_and_validates(recipe, monkeypatch):
    cfg = compose_recipe(recipe)
    # validated as launched: an expert-parallel recipe (EP=8) on the 8 ranks its header names
    monkeypatch.setenv("WORLD_SIZE", str(cfg.model.expert_parallel_size))
    validate(cfg)
    assert cfg.stage == stage_of(recipe) and cfg.data.kind == STAGE_DATA_KINDS[cfg.stage]
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
        mark_checkpoint_complete(output_dir / f"checkpoint-{step}")
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
    if deepspeed == "none":
        with pytest.raises(ConfigError, match="model.expert_parallel_size=2 needs DeepSpeed"):
            validate(cfg)
    else:
        validate(cfg)  # EP=2 under ZeRO-2 (full fine-tune) and ZeRO-3 (LoRA), resuming: tests/test_resume.py


def test_command_line_beats_recipe_group_choice():
    cfg = compose_recipe("mixtral-8x7b/sft_qlora", "peft=lora", "deepspeed=zero3")
    assert cfg.peft.method == "lora"
    assert config_module.zero_stage(cfg) == 3


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.hiden_size=64", "model.hiden_size"),
        ("outptu_dir=/tmp/x", "outptu_dir"),
        ("trainer.beta=0.1", "trainer.beta"),  # a DPOConfig field: not an SFT option
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


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "two"])
def test_every_n_layers_must_be_a_whole_number_from_1(value):
    """transformers checkpoints the layers whose index % every_n_layers == 0, at the first training step:
    0 divides by zero there, "two" fails there, and -1 or 1.5 pick layers that are not every n-th."""
    override = f"+trainer.activation_checkpointing_kwargs={{every_n_layers: {value}}}"
    message = config_error("sft", ["+recipe=tiny/sft", override])
    assert "trainer.activation_checkpointing_kwargs.every_n_layers" in message, message


def test_unknown_key_suggests_the_closest_schema_key():
    message = config_error("sft", ["+recipe=tiny/sft", "trainer.learning_rat=1e-4"])
    assert "did you mean 'trainer.learning_rate'" in message
    message = config_error("dpo", ["+recipe=tiny/dpo", "trainer.label_smothing=0.1"])
    assert "did you mean 'trainer.label_smoothing'" in message and "DPOConfig" in message
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
        ("dpo", ["+recipe=tiny/dpo", "trainer.loss_type=kto"], "trainer.loss_type"),
        ("dpo", ["+recipe=tiny/dpo", "trainer.loss_type=exo_pair"], "trainer.label_smoothing"),
        (
            "dpo",
            ["+recipe=tiny/dpo", "trainer.loss_type=[sigmoid,sft]", "trainer.loss_weights=[1.0]"],
            "trainer.loss_weights",
        ),  # fmt: skip
        ("sft", ["trainer.report_to=mlflow"], "trainer.report_to"),
        ("sft", ["trainer.output_dir=/tmp/x"], "trainer.output_dir"),
        ("sft", ["trainer.loss_type=exo_pair"], "trainer.loss_type"),
        ("sft", ["data.eval_path=null", "trainer.eval_strategy=epoch"], "trainer.eval_strategy"),
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
    """Against transformers' MixtralConfig defaults, which its docstring gives as mistralai/Mixtral-8x7B-v0.1's
    (32 layers, hidden 4096, intermediate 14336, 8 experts, top-2, 32/8 heads, 32000 tokens, rope_theta 1e6)."""
    import transformers

    arch, published = (
        compose_recipe("mixtral-8x7b/sft_qlora").model.architecture,
        transformers.MixtralConfig(),
    )
    for field in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_local_experts",
                  "num_experts_per_tok", "num_attention_heads", "num_key_value_heads", "vocab_size"):  # fmt: skip
        assert arch[field] == getattr(published, field), field
    assert arch.rope_theta == published.rope_parameters["rope_theta"]


def test_a_recipe_file_outside_the_repository_composes_like_a_shipped_one(tmp_path):
    recipe = tmp_path / "elsewhere" / "my.recipe v2.yaml"
    recipe.parent.mkdir()
    recipe.write_text(
        "defaults:\n  - override /peft: lora\n  - _self_\n"
        "stage: sft\noutput_dir: outputs/mine\nmax_steps: 3\ntrainer:\n  learning_rate: 1.0e-4\n"
    )
    cfg = load_config("sft", [f"+recipe={recipe}", "peft.r=4"])  # one argument, as a shell passes it
    assert (cfg.peft.method, cfg.peft.r, cfg.max_steps, cfg.trainer.learning_rate) == ("lora", 4, 3, 1.0e-4)
    assert cfg.trainer.per_device_train_batch_size == 4  # the rest from the trainer group
    assert "no such file" in config_error("sft", [f"+recipe={tmp_path / 'missing.yaml'}"])


def test_a_deepspeed_json_file_is_used_as_given_and_checked(tmp_path):
    ds = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": {
            "stage": 3,
            "offload_param": {"device": "cpu"},
            "stage3_param_persistence_threshold": 7,
        },
    }
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(ds))
    cfg = load_config("sft", [f"deepspeed={path}"])
    assert deepspeed_dict(cfg) == ds and config_module.zero_stage(cfg) == 3
    # the same one-line checks as the shipped groups, with the stage read from the JSON
    assert "offload_param" in config_error("sft", [f"deepspeed={path}", "peft=qlora"])
    path.write_text(json.dumps({**ds, "zero_optimization": {**ds["zero_optimization"], "stage": 2}}))
    assert "offload_param needs ZeRO stage 3" in config_error("sft", [f"deepspeed={path}"])
    # values the JSON fixes must equal the trainer settings they mirror (the HF Trainer's rule)
    path.write_text(json.dumps({**ds, "train_micro_batch_size_per_gpu": 2}))
    assert "trainer.per_device_train_batch_size=4" in config_error("sft", [f"deepspeed={path}"])
    load_config("sft", [f"deepspeed={path}", "trainer.per_device_train_batch_size=2"])
    path.write_text(json.dumps({**ds, "bf16": {"enabled": True}}))
    assert "model.dtype=float32" in config_error("sft", [f"deepspeed={path}"])
    path.write_text("{not json")
    assert "not a valid json file" in config_error("sft", [f"deepspeed={path}"])


def test_trainer_keys_are_trl_names_and_older_names_still_work():
    cfg = load_config("dpo", ["+recipe=tiny/dpo", "trainer.warmup_ratio=0.2", "trainer.dpo.beta=0.3",
                              "trainer.gradient_checkpointing=true"])  # fmt: skip
    assert (cfg.trainer.warmup_steps, cfg.trainer.beta, cfg.trainer.activation_checkpointing) == (
        0.2,
        0.3,
        True,
    )
    assert not {"warmup_ratio", "dpo", "gradient_checkpointing"} & set(cfg.trainer)
    for form in ("trainer", "+trainer", "++trainer"):  # set or add, whatever Hydra habit is used
        assert (
            load_config("dpo", ["+recipe=tiny/dpo", f"{form}.beta=0.5", f"{form}.ld_alpha=0.5"]).trainer.beta
            == 0.5
        )
    assert list(cfg.trainer.loss_type) == ["sigmoid"]


def test_print_config_prints_the_resolved_config_and_exits(tmp_path, capsys):
    from mixtral_tune.pipeline import config_from_argv

    for flags in (["--print-config"], ["--cfg", "job"]):
        with pytest.raises(SystemExit) as exited:
            config_from_argv("sft", ["+recipe=tiny/sft", "trainer.learning_rate=1e-4", *flags])
        assert exited.value.code == 0
        out = capsys.readouterr().out
        printed = OmegaConf.create(out[out.index("stage: sft") :])  # after any library start-up line
        assert printed.trainer.learning_rate == 1e-4 and printed.data.path.endswith("sft_train.jsonl")


def test_trl_only_options_reach_the_trainer_arguments(tmp_path):
    from mixtral_tune.dpo import dpo_arguments
    from mixtral_tune.sft import sft_arguments

    sft = sft_arguments(
        load_config(
            "sft",
            [
                "+recipe=tiny/sft",
                f"output_dir={tmp_path}",
                "trainer.neftune_noise_alpha=5",
                "trainer.eval_strategy=epoch",
                "trainer.report_to=[tensorboard]",
            ],
        )  # fmt: skip
    )
    assert (sft.neftune_noise_alpha, sft.eval_strategy, sft.report_to) == (5, "epoch", ["tensorboard"])
    recipe_rate = OmegaConf.load(RECIPE_DIR / "tiny" / "sft.yaml").trainer.learning_rate
    assert (sft.output_dir, sft.learning_rate, sft.activation_checkpointing) == (
        str(tmp_path),
        recipe_rate,
        False,
    )
    dpo = dpo_arguments(
        load_config(
            "dpo",
            [
                "+recipe=tiny/dpo",
                "trainer.loss_type=[exo_pair,sft]",
                "trainer.loss_weights=[1.0,0.5]",
                "trainer.label_smoothing=1e-3",
                "model.router_aux_loss_coef=0.05",
            ],
        )  # fmt: skip
    )
    assert (dpo.loss_type, dpo.loss_weights, dpo.label_smoothing) == (["exo_pair", "sft"], [1.0, 0.5], 1e-3)
    # The aux coefficient reaches the loss by one road, the model config (mixtral_tune/training/objective.py): TRL's
    # own copy stays unset, or the objective mixin refuses the run.
    assert (dpo.beta, dpo.router_aux_loss_coef, dpo.max_length) == (0.1, None, 64)


def test_a_saved_run_config_is_a_recipe_that_composes_the_same_config(tmp_path):
    cfg = load_config("dpo", ["+recipe=tiny/dpo", "peft=lora", "trainer.loss_type=ipo", "trainer.beta=0.2"])
    OmegaConf.save(cfg, tmp_path / "run_config.yaml", resolve=True)  # as save_final writes it
    again = load_config("dpo", [f"+recipe={tmp_path / 'run_config.yaml'}"])
    assert OmegaConf.to_container(again, resolve=True) == OmegaConf.to_container(cfg, resolve=True)


def test_one_rule_tells_local_paths_from_hub_names(rows_file, tmp_path, monkeypatch):
    """mixtral_model.hub_weights.looks_like_local_path, used for models, tokenizers and data alike."""
    for hub_name in ("mistralai/Mixtral-8x7B-v0.1", "HuggingFaceH4/ultrachat_200k", "gpt2"):
        assert not looks_like_local_path(hub_name), hub_name
    for path in ("/abs/dir", "./dir", "../dir", "~/dir", ".cache/dir", "outputs/tiny-sft/final", "rows.jsonl",
                 "train.parquet", tmp_path):  # fmt: skip
        assert looks_like_local_path(path), path
    # A relative path with no ./ is caught before any model is built, and ~ is expanded.
    message = config_error("sft", ["+recipe=tiny/sft", "model.name_or_path=outputs/no-such-run/final"])
    assert message.startswith("model.name_or_path=outputs/no-such-run/final does not exist")
    rows = Path(rows_file("sft"))
    monkeypatch.setenv("HOME", str(rows.parent))
    cfg = load_config("sft", ["+recipe=tiny/sft", f"data.path='~/{rows.name}'", "data.eval_path=null"])
    assert cfg.data.path == f"~/{rows.name}"
