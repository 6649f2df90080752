"""Typed Hydra configuration of the pipelines (SFT, DPO, KTO, ORPO, CPO/SimPO): schema, composition, validation.

The schema below is registered with Hydra's ConfigStore and composed with the groups in `configs/`
(`model`, `data`, `peft`, `deepspeed`, `trainer`) from the primary configs `configs/<stage>.yaml`
(`mixtral_tune/shipped.py` finds them, installed or in a checkout). Struct mode
rejects unknown keys and OmegaConf rejects wrong types at compose time; `validate` adds the
cross-field checks. Both fail before any model is built, with a one-line `ConfigError` naming the
key and the fix.

Recipes live in `recipes/<model>/<name>.yaml` and are selected with `+recipe=<model>/<name>`, or
`+recipe=PATH.yaml` for a recipe file anywhere: every recipe file is registered in the ConfigStore as
an option of the group `recipe` at the global package, so it can override group choices
(`override /peft: qlora`) and any value. Command-line overrides still win over the recipe:
`+recipe=tiny/sft max_steps=5 peft=lora`. `deepspeed=` takes a group name or a DeepSpeed JSON file.

The `trainer` section is TRL's own: its keys are the fields of the stage's TRL config (TRL 1.16:
`SFTConfig`, `DPOConfig`, `KTOConfig`, and the experimental `ORPOConfig` and `CPOConfig` of
`trl.experimental`) and reach them unchanged, so every TRL option works (`trainer.loss_weights=[1,0.5]`,
`trainer.eval_strategy=epoch`); a key the stage's config lacks fails with the closest TRL name.
"""

import dataclasses
import difflib
import enum
import functools
import hashlib
import importlib.util
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from mixtral_model.hub_weights import looks_like_local_path
from mixtral_tune.chat_template import ChatTemplateError, template_text, template_tokens
from mixtral_tune.cli import COMMANDS
from mixtral_tune.shipped import CONFIG_DIR, DATA_DIR, recipe_files
from mixtral_tune.training.resume import checkpoint_problem, checkpoint_step, latest_complete_checkpoint

# The pipelines: the commands of `mixtral-tune` (mixtral_tune/cli.py) that have a primary config.
STAGES = tuple(command for command in COMMANDS if (CONFIG_DIR / f"{command}.yaml").is_file())
# The rows each pipeline trains on (data.kind): ORPO and CPO/SimPO take DPO's preference rows.
STAGE_DATA_KINDS = {"sft": "sft", "dpo": "dpo", "kto": "kto", "orpo": "dpo", "cpo": "dpo"}
DATA_KINDS = ("sft", "dpo", "kto")
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}  # name -> torch dtype
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
PEFT_METHODS = ("none", "lora", "qlora", "esft")
ADAPTER_METHODS = ("lora", "qlora")  # methods that train PEFT adapters (the rest train weights in place)
QUANT_TYPES = ("nf4", "fp4")
REPORT_TO_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard"}  # extras in pyproject.toml
SFT_LOSS_TYPES = ("nll", "dft")  # TRL 1.16 SFTTrainer
DATA_TRUNCATION = ("truncate", "drop")
DPO_TRUNCATION_MODES = ("keep_start", "keep_end")
DATA_PREPARE_ON = ("local_main", "global_main")
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")  # TRL 1.16 KTOTrainer
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")  # TRL 1.16 experimental CPOTrainer
LORA_TARGET_MODULES = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "experts": ["w1", "w2", "w3"],
    "both": ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"],
}
ROUTER_MODULES = ["gate"]
ROUTER_BALANCE = ("micro_batch", "global_batch")
ROUTER_ALERT = ("off", "warn", "stop")


class ConfigError(ValueError):
    """A configuration a user can fix: the message names the key and the fix, on one line."""


@dataclass
class ArchitectureConfig:
    """Shape of the network: used for random init, and checked against a loaded checkpoint."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    max_position_embeddings: int = 32768
    rope_theta: float = 1.0e6


@dataclass
class ModelConfig:
    name_or_path: str | None = None  # hub name or local dir; null = random init from `architecture`
    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    tokenizer: str | None = None  # null = the Mixtral tokenizer built offline by `load_tokenizer()`
    dtype: str = "bfloat16"
    attn_implementation: str = "sdpa"
    expert_parallel_size: int = 1
    router_aux_loss_coef: float = 0.02
    router_jitter_noise: float = 0.0
    router_z_loss_coef: float = 0.0
    # aux-loss load fractions: micro_batch (each forward's, transformers') | global_batch (the whole
    # optimizer step's, over every rank and accumulated micro-batch: mixtral_parallel/global_balance.py)
    router_balance: str = "micro_batch"


@dataclass
class RouterWatchConfig:
    """Router health alerts and routing drift (mixtral_tune/training/router_health.py)."""

    alert: str = "warn"  # off | warn (one line, training goes on) | stop (one line, exit status 3)
    min_load: float = 0.25  # an expert's share below min_load x the balanced share 1/num_experts ...
    max_load: float = 3.0  # ... or above max_load x 1/num_experts ...
    min_entropy: float = 0.1  # ... or a layer's router entropy below this fraction of ln(num_experts) ...
    patience: int = 5  # ... for this many consecutive logged training steps raises the alert
    drift: bool = True  # at each evaluation: share of tokens whose top-k experts changed, and router KL


@dataclass
class DataSourceConfig:
    """One source of data.mixture (alignment-handbook `dataset_mixture` semantics)."""

    path: str = MISSING  # a data file, a directory, or a hub dataset name (as data.path)
    config: str | None = None  # hub dataset config (subset) name
    revision: str | None = None  # hub dataset revision (branch, tag or commit)
    split: str = "train"  # hub datasets and directories with splits
    columns: dict[str, str] = field(
        default_factory=dict
    )  # rename, over data.columns: source column -> format column
    weight: float = 1.0  # fraction of this source's rows used, drawn with trainer.seed


@dataclass
class DataConfig:
    # .jsonl/.json/.parquet/.csv/.arrow file, a directory (save_to_disk, or data files), or a hub
    # dataset name; null with mixture
    path: str | None = MISSING
    kind: str = MISSING  # the rows' pipeline: sft | dpo (also for orpo and cpo: preference rows) | kto
    format: str = "auto"  # auto (each row's own, from its columns) | a name of mixtral_tune/data.py FORMATS
    columns: dict[str, str] = field(default_factory=dict)  # rename: source column -> format column
    split: str = "train"  # hub datasets and directories with splits
    config: str | None = None  # hub dataset config (subset) name
    revision: str | None = None  # hub dataset revision (branch, tag or commit)
    mixture: list[DataSourceConfig] = field(default_factory=list)  # several sources instead of `path`
    eval_path: str | None = None  # eval source (as path); a data group's is dropped with the group's data
    eval_split: str = "test"  # split of eval_path (hub datasets and directories with splits)
    eval_fraction: float = 0.0  # held out from the training rows (path or mixture) when no eval_path
    max_length: int = 2048
    truncation: str = "truncate"  # longer rows: truncate (keep the prompt, cut the completion) | drop
    dpo_truncation_mode: str = "keep_start"  # DPO: TRL DPOConfig.truncation_mode (keep_start | keep_end)
    packing: bool = False  # SFT only
    completion_only: bool = True  # SFT: loss on assistant tokens only
    max_bad_fraction: float = 0.1
    max_reported_bad_rows: int = 5
    num_proc: int | None = None  # preparation worker processes; null = the CPUs this process may use (<= 32)
    cache_dir: str | None = None  # prepared datasets; null = $HF_DATASETS_CACHE/mixtral_tune_prepared
    prepare_on: str = "local_main"  # local_main: local rank 0 of each node prepares | global_main: rank 0
    # null = Mixtral-Instruct's format | chatml | zephyr | a Jinja file | an inline Jinja string
    # (mixtral_tune/chat_template.py); assistant-only loss from its {% generation %} marks
    chat_template: str | None = None
    chat_template_tokens: list[str] | None = (
        None  # tokens to add for the template; null = a shipped one's own
    )


@dataclass
class QuantConfig:
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    quant_storage: str = "bfloat16"  # must equal compute_dtype under ZeRO-3


@dataclass
class PeftConfig:
    method: str = "none"
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: str = "both"  # attention | experts | both
    train_router: bool = False  # train the router weights fully (PEFT modules_to_save); never LoRA-wrapped
    # `mixtral-tune esft-select` output: train (peft=esft) or LoRA only those experts
    esft_selection: str | None = None
    quant: QuantConfig = field(default_factory=QuantConfig)


@dataclass
class EvaluationConfig:
    """What runs at each evaluation besides TRL's metrics (evaluation needs trainer.eval_steps and eval data)."""

    sample_prompts: int = (
        0  # greedy completions of this many eval prompts, on the console and trackers; 0 = off
    )
    sample_max_new_tokens: int = 64
    # stop after this many evaluations without improving trainer.metric_for_best_model (transformers'
    # EarlyStoppingCallback; needs trainer.load_best_model_at_end=true); null = off
    early_stopping_patience: int | None = None
    early_stopping_threshold: float = 0.0  # the least improvement that counts


@dataclass
class TrainConfig:
    stage: str = MISSING  # sft | dpo | kto | orpo | cpo: which pipeline this config is for
    output_dir: str = MISSING
    max_steps: int = MISSING  # -1 = train for trainer.num_train_epochs
    resume: Any = False  # false | true (latest checkpoint in output_dir) | path to a checkpoint dir
    resume_allow_changes: list[str] = field(default_factory=list)  # keys a resume may change (RESUME_CHANGES)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # DeepSpeed JSON as a dict; {} = off
    trainer: dict[str, Any] = field(default_factory=dict)  # the stage's TRL config fields, by TRL's names
    router: RouterWatchConfig = field(default_factory=RouterWatchConfig)


# Keys of TRL's configs that the pipelines set from elsewhere in the config: the key to use instead.
TRAINER_KEYS_SET_ELSEWHERE = {
    "output_dir": "output_dir",
    "max_steps": "max_steps",
    "deepspeed": "deepspeed (a group name or a JSON file)",
    "bf16": "model.dtype",
    "fp16": "model.dtype",
    "use_cpu": "nothing (chosen from the hardware)",
    "router_aux_loss_coef": "model.router_aux_loss_coef",
    "max_length": "data.max_length",
    "packing": "data.packing",
    "padding_free": "data.packing",
    "truncation_mode": "data.dpo_truncation_mode",
    "dataset_kwargs": "nothing (mixtral_tune/data.py prepares the rows)",
    "dataset_num_proc": "data.num_proc",
    "remove_unused_columns": "nothing (the prepared data needs every column)",
    "logging_nan_inf_filter": "nothing (off: a NaN or infinite loss is logged as such and stops training)",
    "resume_from_checkpoint": "resume",
}
TRAINS, OBSERVES = "trains", "observes"
# What a value changed between a checkpoint's run and its resume does, for every key of the schema.
# TRAINS: it changes what is being trained (model and architecture, tokenizer and template, PEFT
# method, rank and targets, quantization, data sources and processing, optimisation, global batch):
# a resume refuses it unless the key is listed in `resume_allow_changes`. OBSERVES: it only extends
# or watches the run (its length, logging, evaluation, saving, trackers, where outputs and caches go,
# how data preparation runs): allowed, and recorded in OUTPUT_DIR/run_config_history.yaml.
# `trainer` and `deepspeed` are free-form: a `trainer.KEY` row names a TRL field that observes, and
# every other trainer key (and every DeepSpeed key) trains. `world_size` is the launch's, not a key.
RESUME_CHANGES = {
    "stage": TRAINS,
    "output_dir": OBSERVES,
    "max_steps": OBSERVES,
    "resume": OBSERVES,
    "resume_allow_changes": OBSERVES,
    "world_size": TRAINS,
    **{f"model.{key}": TRAINS for key in ("name_or_path", "tokenizer", "dtype", "attn_implementation",
       "expert_parallel_size", "router_aux_loss_coef", "router_jitter_noise", "router_z_loss_coef",
       "router_balance")},
    # router health alerts watch the run (warn, or stop it without a final model)
    **{f"router.{key}": OBSERVES for key in ("alert", "min_load", "max_load", "min_entropy", "patience",
       "drift")},
    **{f"model.architecture.{item.name}": TRAINS for item in dataclasses.fields(ArchitectureConfig)},
    **{f"data.{key}": TRAINS for key in ("path", "kind", "format", "columns", "split", "config", "revision",
       "mixture", "eval_fraction", "max_length", "truncation", "dpo_truncation_mode", "packing",
       "completion_only")},
    **{f"data.{key}": TRAINS for key in ("chat_template", "chat_template_tokens")},
    # sample generations watch the run; early stopping may end it sooner
    **{f"evaluation.{item.name}": OBSERVES for item in dataclasses.fields(EvaluationConfig)},
    **{f"data.{key}": OBSERVES for key in ("eval_path", "eval_split", "max_bad_fraction",
       "max_reported_bad_rows", "num_proc", "cache_dir", "prepare_on")},
    **{f"peft.{key}": TRAINS for key in ("method", "r", "alpha", "dropout", "targets", "train_router", "esft_selection")},
    **{f"peft.quant.{item.name}": TRAINS for item in dataclasses.fields(QuantConfig)},
    "deepspeed": TRAINS,
    "trainer": TRAINS,
    **{f"trainer.{key}": OBSERVES for key in (
        "num_train_epochs", "logging_steps", "logging_strategy", "logging_first_step",
        "logging_nan_inf_filter", "log_level", "eval_steps", "eval_strategy", "eval_on_start", "eval_delay",
        "per_device_eval_batch_size", "eval_accumulation_steps", "save_steps", "save_strategy",
        "save_total_limit", "report_to", "run_name", "project", "trackio_space_id", "disable_tqdm",
        "push_to_hub", "hub_model_id", "hub_strategy", "hub_private_repo", "hub_always_push",
        "include_num_input_tokens_seen", "activation_checkpointing", "activation_checkpointing_kwargs",
        "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
        "dataloader_prefetch_factor", "metric_for_best_model", "greater_is_better", "load_best_model_at_end",
    )},
}  # fmt: skip


def resume_change_kind(key: str) -> str | None:
    """TRAINS or OBSERVES for a dotted config key (its row in RESUME_CHANGES, or its free-form section's);
    None for a key the schema does not have."""
    section = key.partition(".")[0]
    if key in RESUME_CHANGES:
        return RESUME_CHANGES[key]
    return RESUME_CHANGES[section] if section in ("trainer", "deepspeed") and "." in key else None


# Names users bring from older transformers/TRL or from earlier versions of these configs.
TRAINER_ALIASES = {
    "warmup_ratio": "warmup_steps",  # transformers 5: a float in [0, 1) is a ratio of the total steps
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


@functools.cache
def register_configs() -> None:
    """Register the schema, every recipe file (as group `recipe`) and the `${data_dir:}` resolver
    (the bundled demo data, wherever the package is installed)."""
    OmegaConf.register_new_resolver("data_dir", lambda: str(DATA_DIR), replace=True)
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    for name, path in recipe_files().items():
        group, _, option = f"recipe/{name}".rpartition("/")
        store.store(group=group, name=option, node=OmegaConf.load(path), package="_global_")


def register_file_option(group: str, path: str) -> str:
    """Register a user's file (recipe YAML, DeepSpeed JSON) as an option of `group`; return its name."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise ConfigError(f"{group}={path}: no such file; give a {group} name or an existing file")
    try:
        node = (
            OmegaConf.create(json.loads(file.read_text())) if group == "deepspeed" else OmegaConf.load(file)
        )
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{group}={path} is not valid YAML: {error.problem}{where}; fix the file") from None
    except (ValueError, OmegaConfBaseException, yaml.YAMLError) as error:
        problem = str(error).splitlines()[0]
        raise ConfigError(f"{group}={path} is not a valid {file.suffix[1:]} file: {problem}") from error
    stem = "".join(c if c.isalnum() or c in "_-" else "_" for c in file.stem)
    name = f"{stem}-{hashlib.sha1(str(file).encode()).hexdigest()[:8]}"
    package = "_global_" if group == "recipe" else group
    ConfigStore.instance().store(group=f"{group}/file", name=name, node=node, package=package)
    return f"file/{name}"


def is_file_option(value: str) -> bool:
    """A file path, not a group option name (`tiny/sft`, `zero3`): a YAML/JSON name or an explicit path."""
    return value.endswith((".yaml", ".yml", ".json")) or value.startswith(("/", ".", "~"))


def rewrite_overrides(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """Hydra overrides with user files registered as options, and every `trainer.KEY=` made `++`
    (set or add: any TRL option can be given; the check against TRL's fields comes after)."""
    rewritten = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and key.lstrip("+") in ("recipe", "deepspeed") and is_file_option(value):
            override = f"{key}={register_file_option(key.lstrip('+'), value)}"
        elif sep and key.lstrip("+").startswith("trainer."):
            name = key.lstrip("+").removeprefix("trainer.").removeprefix("dpo.")
            override = f"++trainer.{TRAINER_ALIASES.get(name, name)}={value}"
        rewritten.append(override)
    return rewritten


def normalize_trainer(cfg: DictConfig) -> None:
    """TRL's names in `trainer`: the aliases above renamed, the nested `dpo:` section of older
    configs flattened (DPOConfig's fields are at the top of its section)."""
    trainer = cfg.trainer
    with open_dict(cfg):
        nested = trainer.pop("dpo", None)
        if nested is not None:
            for key, value in nested.items():
                trainer[key] = value
        for old, new in TRAINER_ALIASES.items():
            if old in trainer:  # the shipped groups use TRL's names: an old name is the user's choice
                trainer[new] = trainer.pop(old)
        if cfg.get("stage") == "dpo" and isinstance(trainer.get("loss_type"), str):
            trainer.loss_type = [trainer.loss_type]  # DPOConfig's loss_type is a list (losses combine)


def compose(config_name: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose `configs/<config_name>.yaml` with Hydra overrides; composition errors become ConfigError."""
    register_configs()
    GlobalHydra.instance().clear()
    overrides = rewrite_overrides(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(describe_composition_error(error)) from error
    with open_dict(cfg):
        data_group = cfg.pop("hydra").runtime.choices.get("data")
    normalize_trainer(cfg)
    drop_eval_of_replaced_data(cfg, data_group, overrides)
    return cfg


def drop_eval_of_replaced_data(cfg: DictConfig, data_group: str | None, overrides: list[str]) -> None:
    """Eval follows the data: a data group's eval_path belongs to that group's training data. When the
    training data was replaced (data.path or data.mixture set by a recipe or the command line) and the
    eval source is still the group's, it is dropped (eval then comes from data.eval_fraction, or
    nowhere), unless the command line names data.eval_path itself."""
    group_file = CONFIG_DIR / "data" / f"{data_group}.yaml"
    if "data" not in cfg or OmegaConf.is_missing(cfg.data, "path") or not group_file.is_file():
        return
    if not cfg.data.eval_path:
        return
    if any(override.lstrip("+").startswith("data.eval_path=") for override in overrides):
        return
    group = OmegaConf.load(group_file)

    def mixture_paths(data) -> list[str]:
        return [str(source.path) for source in data.get("mixture") or []]

    same_data = group.get("path") == cfg.data.path and mixture_paths(group) == mixture_paths(cfg.data)
    if not same_data and group.get("eval_path") == cfg.data.eval_path:
        cfg.data.eval_path = None


def load_config(config_name: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose and validate the config of pipeline `config_name` (one of STAGES), or raise ConfigError."""
    cfg = compose(config_name, overrides)
    if cfg.stage != config_name:
        raise ConfigError(
            f"this config is for the {cfg.stage} pipeline (stage={cfg.stage}, set by the recipe): "
            f"launch it with mixtral-tune {cfg.stage} (or ./launch.sh {cfg.stage})"
        )
    validate(cfg)
    return cfg


def describe_composition_error(error: Exception) -> str:
    """One line naming the key and the fix, from Hydra's and OmegaConf's multi-line errors."""
    cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else error
    key = getattr(cause, "full_key", None)
    if isinstance(cause, OmegaConfBaseException) and key:
        problem = str(cause).splitlines()[0]
        if "not in" in problem and key.startswith("deepspeed."):
            return f"'{key}' is not in the selected DeepSpeed config: add it with +{key}=..."
        if "not in" in problem:
            return f"unknown key '{key}'{suggest_key(key)}: check its spelling against mixtral_tune/config.py"
        if "Missing mandatory value" in problem:
            return f"'{key}' must be set: pass {key}=... or pick a recipe that sets it"
        return (
            f"bad value for '{key}': {problem}; pass a value of the type declared in mixtral_tune/config.py"
        )
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "Could not find 'recipe/" in lines[0]:
        return f"{lines[0]}; available recipes: {', '.join(recipe_files())}"
    if "Could not find" in lines[0]:
        options = [
            line for line in lines[1:] if not line.startswith(("Available", "Config search", "provider="))
        ]
        return f"{lines[0]}; available: {', '.join(options)}"
    return " ".join(lines)


def suggest_key(key: str) -> str:
    """' (did you mean X?)' for the closest schema key: same section first, then anywhere."""
    parent, _, name = key.rpartition(".")
    known = schema_keys()
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == parent}
    anywhere = {k.rpartition(".")[2]: k for k in known}
    for names, cutoff in ((siblings, 0.6), (anywhere, 0.8)):
        close = difflib.get_close_matches(name, names, n=1, cutoff=cutoff)
        if close:
            return f" (did you mean '{names[close[0]]}'?)"
    return ""


def schema_keys(schema: type = None, prefix: str = "") -> list[str]:
    """Full names of every leaf key of the schema (DeepSpeed's free-form dict counts as one)."""
    keys = []
    for item in dataclasses.fields(schema or TrainConfig):
        name = f"{prefix}{item.name}"
        keys += schema_keys(item.type, f"{name}.") if dataclasses.is_dataclass(item.type) else [name]
    return keys


def validate(cfg: DictConfig) -> None:
    """Cross-field checks on a composed config; raise ConfigError on the first problem found."""
    for check in (
        check_required_values,
        check_stage,
        check_steps_and_resume,
        check_model,
        check_router,
        check_expert_parallel,
        check_attention,
        check_data,
        check_peft,
        check_deepspeed,
        check_trainer,
    ):
        check(cfg)


def check_required_values(cfg: DictConfig) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"'{missing[0]}' must be set: pass {missing[0]}=... or pick a recipe that sets it")


def check_stage(cfg: DictConfig) -> None:
    require_choice("stage", cfg.stage, STAGES)
    kind = STAGE_DATA_KINDS[cfg.stage]
    if cfg.data.kind == kind:
        return
    takers = [stage for stage, rows in STAGE_DATA_KINDS.items() if rows == cfg.data.kind]
    other = (
        f"or run a pipeline that trains on them (mixtral-tune {'|'.join(takers)})"
        if takers
        else f"there is no {cfg.data.kind} pipeline (pipelines: {', '.join(STAGES)})"
    )
    raise ConfigError(
        f"data.kind={cfg.data.kind} does not fit the {cfg.stage} pipeline: use data.kind={kind} "
        f"with {kind.upper()} rows; {other}"
    )


def check_steps_and_resume(cfg: DictConfig) -> None:
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        raise ConfigError(
            f"max_steps={cfg.max_steps}: use a positive number of steps, or -1 for trainer.num_train_epochs"
        )
    resume = resume_checkpoint(cfg)
    if isinstance(resume, str) and not Path(resume).is_dir():
        raise ConfigError(
            f"resume={resume}: no such checkpoint directory; pass resume=true or an existing checkpoint path"
        )
    if isinstance(resume, str):
        check_resume_path(resume)
    for key in cfg.resume_allow_changes:
        if resume_change_kind(key) is None:
            raise ConfigError(
                f"resume_allow_changes: '{key}' is not a config key{suggest_key(key)}: list keys such as "
                "peft.r or trainer.learning_rate"
            )
    if resume is True and not latest_complete_checkpoint(cfg.output_dir):
        raise ConfigError(
            f"resume=true but output_dir={cfg.output_dir} has no complete checkpoint-* directory; "
            "drop resume or point it at a checkpoint"
        )


def check_resume_path(resume: str) -> None:
    """resume=PATH gets the checks resume=true applies to the checkpoints it picks from."""
    problem = checkpoint_problem(Path(resume))
    if problem is None:
        return
    latest = latest_complete_checkpoint(resume)
    hint = (
        f"pass resume={latest} (its newest complete checkpoint)"
        if latest
        else "pass a complete checkpoint-<step> directory, or resume=true"
    )
    if checkpoint_step(Path(resume).resolve()) is None:
        raise ConfigError(f"resume={resume} is not a checkpoint-<step> directory: {hint}")
    raise ConfigError(f"resume={resume} cannot be resumed from: {problem}; {hint}")


def saved_config(cfg: DictConfig) -> DictConfig:
    """`cfg` as a run saves it (run_config.yaml): every value resolved, except those that read the
    environment (`${oc.env:...}`, which may hold secrets) or resolve to what such a value read: those
    stay as written, as Hydra's own saved config keeps its interpolations."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    env_values = set()

    def reads_env(raw_value, value) -> None:
        if isinstance(raw_value, dict | list):
            for key in raw_value if isinstance(raw_value, dict) else range(len(raw_value)):
                reads_env(raw_value[key], value[key])
        elif isinstance(raw_value, str) and "oc.env" in raw_value and value not in (None, ""):
            env_values.add(str(value))

    def keep(raw_value, value):
        if isinstance(raw_value, dict):
            return {key: keep(raw_value[key], value[key]) for key in raw_value}
        if isinstance(raw_value, list):
            return [keep(r, v) for r, v in zip(raw_value, value, strict=True)]
        if isinstance(raw_value, str) and "${" in raw_value and any(e in str(value) for e in env_values):
            return raw_value
        return value

    reads_env(raw, resolved)
    return OmegaConf.create(keep(raw, resolved))


def trainer_keys_read_from_env(cfg: DictConfig) -> dict[str, str]:
    """trainer.* keys whose value reads the environment, with the value as written (`${oc.env:...}`)."""
    saved = OmegaConf.to_container(saved_config(cfg).trainer, resolve=False)
    resolved = OmegaConf.to_container(cfg.trainer, resolve=True)
    return {key: value for key, value in saved.items() if value != resolved[key]}


def resume_checkpoint(cfg: DictConfig) -> bool | str:
    """`resume` as the pipelines use it: False, True (latest in output_dir) or a checkpoint path."""
    resume = cfg.resume
    if isinstance(resume, str) and resume.lower() in ("true", "false"):
        return resume.lower() == "true"
    if isinstance(resume, bool) or (isinstance(resume, str) and resume):
        return resume
    raise ConfigError(
        f"resume={resume!r}: use resume=true, resume=false or resume=PATH to a checkpoint directory"
    )


def check_model(cfg: DictConfig) -> None:
    model, arch = cfg.model, cfg.model.architecture
    require_choice("model.dtype", model.dtype, tuple(DTYPES))
    if (
        model.name_or_path
        and looks_like_local_path(model.name_or_path)
        and not Path(model.name_or_path).expanduser().exists()
    ):
        raise ConfigError(
            f"model.name_or_path={model.name_or_path} does not exist: fix the path, or use a hub name"
        )
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "num_local_experts", "num_experts_per_tok", "max_position_embeddings"):  # fmt: skip
        require_positive(f"model.architecture.{key}", arch[key])
    if arch.hidden_size % arch.num_attention_heads:
        raise ConfigError(
            f"model.architecture.hidden_size={arch.hidden_size} is not divisible by "
            f"num_attention_heads={arch.num_attention_heads}: pick sizes that divide"
        )
    if arch.num_attention_heads % arch.num_key_value_heads:
        raise ConfigError(
            f"model.architecture.num_attention_heads={arch.num_attention_heads} is not a multiple of "
            f"num_key_value_heads={arch.num_key_value_heads}: pick a divisor for the KV heads"
        )
    if arch.num_experts_per_tok > arch.num_local_experts:
        raise ConfigError(
            f"model.architecture.num_experts_per_tok={arch.num_experts_per_tok} exceeds "
            f"num_local_experts={arch.num_local_experts}: route to at most that many experts"
        )
    for key in ("router_aux_loss_coef", "router_jitter_noise", "router_z_loss_coef"):
        if model[key] < 0:
            raise ConfigError(f"model.{key}={model[key]} is negative: use 0 to disable it")


def check_router(cfg: DictConfig) -> None:
    require_choice("model.router_balance", cfg.model.router_balance, ROUTER_BALANCE)
    watch = cfg.router
    require_choice("router.alert", watch.alert, ROUTER_ALERT)
    require_positive("router.patience", watch.patience)
    if not 0.0 <= watch.min_load < 1.0:
        raise ConfigError(
            f"router.min_load={watch.min_load} must be within [0, 1): it is a multiple of the balanced share"
        )
    if watch.max_load <= 1.0:
        raise ConfigError(
            f"router.max_load={watch.max_load} must be above 1: it is a multiple of the balanced share"
        )
    if not 0.0 <= watch.min_entropy < 1.0:
        raise ConfigError(
            f"router.min_entropy={watch.min_entropy} must be within [0, 1): it is a fraction of ln(num_experts)"
        )


def check_architecture_matches(cfg: DictConfig, model_config: Any) -> None:
    """Raise ConfigError when a checkpoint's config (loaded without weights) differs from model.architecture."""
    expected = OmegaConf.to_container(cfg.model.architecture)
    found = {key: getattr(model_config, key, None) for key in expected}
    found["rope_theta"] = (getattr(model_config, "rope_parameters", None) or {}).get(
        "rope_theta", found["rope_theta"]
    )
    # A checkpoint trained with a template's added tokens (data.chat_template_tokens) has them in its vocabulary.
    added = len(template_tokens(cfg.data)) if cfg.data.chat_template else 0
    if found["vocab_size"] is not None and 0 <= found["vocab_size"] - expected["vocab_size"] <= added:
        found["vocab_size"] = expected["vocab_size"]
    for key, value in expected.items():
        if found[key] is not None and found[key] != value:
            raise ConfigError(
                f"model.architecture.{key}={value} but {cfg.model.name_or_path} has {found[key]}: "
                "fix the model group (configs/model/) or pick the matching one"
            )


def check_expert_parallel(cfg: DictConfig) -> None:
    """The EP layout (checked where the model code checks it, named by its config key), then what a
    launch with expert parallelism needs."""
    from mixtral_parallel.expert_parallel import validate_expert_parallel

    size = cfg.model.expert_parallel_size
    try:
        validate_expert_parallel(size, cfg.model.architecture.num_local_experts, world_size())
    except ValueError as error:
        raise ConfigError(f"model.{error}") from None
    if size == 1:
        return
    if not cfg.deepspeed:
        raise ConfigError(
            f"model.expert_parallel_size={size} needs DeepSpeed (deepspeed=zero2 or zero3): plain data "
            "parallelism would average the gradients of different experts"
        )


def check_attention(cfg: DictConfig) -> None:
    implementation = cfg.model.attn_implementation
    require_choice("model.attn_implementation", implementation, ATTN_IMPLEMENTATIONS)
    if implementation != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
        raise ConfigError(
            "model.attn_implementation=flash_attention_2 needs a CUDA GPU and the flash-attn package "
            "(pip install -e '.[gpu]'): use model.attn_implementation=sdpa otherwise"
        )
    if cfg.model.dtype == "float32":
        raise ConfigError(
            "model.attn_implementation=flash_attention_2 runs in bf16/fp16: set model.dtype=bfloat16"
        )


def check_data(cfg: DictConfig) -> None:
    data = cfg.data
    require_choice("data.kind", data.kind, DATA_KINDS)
    require_positive("data.max_length", data.max_length)
    require_choice("data.truncation", data.truncation, DATA_TRUNCATION)
    require_choice("data.dpo_truncation_mode", data.dpo_truncation_mode, DPO_TRUNCATION_MODES)
    require_choice("data.prepare_on", data.prepare_on, DATA_PREPARE_ON)
    if data.num_proc is not None:
        require_positive("data.num_proc", data.num_proc)
    if data.packing and data.kind != "sft":
        raise ConfigError(f"data.packing=true is for SFT data only: set data.packing=false for {cfg.stage}")
    if cfg.stage in ("kto", "orpo", "cpo") and data.dpo_truncation_mode != "keep_start":
        raise ConfigError(
            f"data.dpo_truncation_mode={data.dpo_truncation_mode}: TRL's {cfg.stage.upper()} trainer keeps the "
            "prompt and cuts the completion (keep_start) only; set data.dpo_truncation_mode=keep_start"
        )
    if not 0.0 <= data.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction={data.max_bad_fraction} must be within [0, 1]")
    if not 0.0 <= data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={data.eval_fraction} must be within [0, 1)")
    if data.eval_path and data.eval_fraction > 0:
        raise ConfigError(
            "data.eval_path and data.eval_fraction are both set: keep one of them (set the other to null/0)"
        )
    if bool(data.path) == bool(data.mixture):
        raise ConfigError(
            "data.path and data.mixture: set exactly one of them (data.path=null when data.mixture lists the sources)"
        )
    check_chat_template(cfg)
    for key in ("path", "eval_path"):
        require_data_file(f"data.{key}", data[key])
    check_data_format(data)
    for number, source in enumerate(data.mixture):
        require_data_file(f"data.mixture[{number}].path", source.path)
        if not 0.0 < source.weight <= 1.0:
            raise ConfigError(
                f"data.mixture[{number}].weight={source.weight} must be within (0, 1]: it is the fraction of "
                "that source's rows used"
            )
        check_columns(f"data.mixture[{number}].columns", source.columns, data.kind)


def check_data_format(data: DictConfig) -> None:
    """data.format names a row format of the pipeline (mixtral_tune/data.py FORMATS); data.columns
    renames columns to columns those formats read."""
    from mixtral_tune.data import format_names

    require_choice("data.format", data.format, ("auto", *format_names(data.kind)))
    check_columns("data.columns", data.columns, data.kind)


def check_columns(key: str, columns: DictConfig, kind: str) -> None:
    from mixtral_tune.data import format_columns

    for column, target in columns.items():
        require_choice(f"{key}.{column}", target, format_columns(kind))


def check_chat_template(cfg: DictConfig) -> None:
    """data.chat_template names a template that exists; SFT's loss mask needs its {% generation %} marks;
    tokens it adds must be trainable (peft=esft trains only the selected experts)."""
    from trl.chat_template_utils import has_generation_markers

    data = cfg.data
    if data.chat_template is not None and template_tokens(data) and cfg.peft.method == "esft":
        raise ConfigError(
            f"data.chat_template={data.chat_template} adds tokens ({', '.join(template_tokens(data))}) whose "
            "embeddings peft=esft would leave untrained: use peft=lora (or none), or a template without new tokens"
        )
    if data.chat_template is None:
        if data.chat_template_tokens:
            raise ConfigError(
                "data.chat_template_tokens is set but data.chat_template is null (Mixtral-Instruct's format "
                "needs no new tokens): set data.chat_template, or drop data.chat_template_tokens"
            )
        return
    try:
        text = template_text(data.chat_template)
    except ChatTemplateError as error:
        raise ConfigError(str(error)) from None
    if data.kind == "sft" and not has_generation_markers(text):
        raise ConfigError(
            "data.chat_template has no {% generation %} ... {% endgeneration %} marks around the assistant "
            "text (TRL's convention): add them, so the SFT loss knows which tokens to train on"
        )
    for token in data.chat_template_tokens or []:
        if not token or token != token.strip():
            raise ConfigError(f"data.chat_template_tokens: {token!r} is empty or has surrounding whitespace")


def require_data_file(key: str, value: str | None) -> None:
    if value and looks_like_local_path(value) and not Path(value).expanduser().exists():
        raise ConfigError(f"{key}={value} does not exist: fix the path, or give a hub dataset name")
    if value and looks_like_local_path(value) and is_blank_file(Path(value).expanduser()):
        raise ConfigError(f"{key}={value} is empty (no rows): point it at a file with data")


def is_blank_file(path: Path, scan_bytes: int = 1 << 20) -> bool:
    """Whether a file holds nothing but whitespace (read only when it is at most `scan_bytes` long);
    a directory source is never blank here (its files are read by mixtral_tune/data.py)."""
    if not path.is_file():
        return False
    size = path.stat().st_size
    return size == 0 or (size <= scan_bytes and not path.read_bytes().strip())


def check_esft(cfg: DictConfig) -> None:
    """peft.esft_selection: required by peft=esft, restricts LoRA's expert targets, meaningless otherwise."""
    peft = cfg.peft
    if peft.method == "esft" and not peft.esft_selection:
        raise ConfigError(
            "peft=esft needs peft.esft_selection=FILE: write one with `mixtral-tune esft-select +recipe=...`"
        )
    if not peft.esft_selection:
        return
    if peft.method == "none":
        raise ConfigError(
            "peft.esft_selection is set but peft=none trains every weight: use peft=esft (or lora)"
        )
    if peft.method in ADAPTER_METHODS and peft.targets == "attention":
        raise ConfigError(
            "peft.esft_selection restricts LoRA on experts, but peft.targets=attention has none: "
            "use peft.targets=experts (or both)"
        )
    from mixtral_tune.esft import SelectionError, load_selection

    arch = cfg.model.architecture
    try:
        load_selection(peft.esft_selection, arch.num_hidden_layers, arch.num_local_experts)
    except SelectionError as error:
        raise ConfigError(str(error)) from error


def uses_adapters(cfg: DictConfig) -> bool:
    """Whether the run trains PEFT adapters (LoRA/QLoRA) rather than weights in place."""
    return cfg.peft.method in ADAPTER_METHODS


def check_peft(cfg: DictConfig) -> None:
    peft = cfg.peft
    require_choice("peft.method", peft.method, PEFT_METHODS)
    check_esft(cfg)
    if peft.method in ("none", "esft"):
        return
    require_positive("peft.r", peft.r)
    require_positive("peft.alpha", peft.alpha)
    require_choice("peft.targets", peft.targets, tuple(LORA_TARGET_MODULES))
    if not 0.0 <= peft.dropout < 1.0:
        raise ConfigError(f"peft.dropout={peft.dropout} must be within [0, 1)")
    if peft.method == "qlora":
        check_qlora(cfg)


def check_qlora(cfg: DictConfig) -> None:
    quant = cfg.peft.quant
    require_choice("peft.quant.quant_type", quant.quant_type, QUANT_TYPES)
    require_choice("peft.quant.compute_dtype", quant.compute_dtype, tuple(DTYPES))
    require_choice("peft.quant.quant_storage", quant.quant_storage, (*DTYPES, "uint8"))
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "peft=qlora needs the bitsandbytes package: pip install bitsandbytes, or use peft=lora"
        )
    if zero_stage(cfg) == 3 and quant.quant_storage != quant.compute_dtype:
        raise ConfigError(
            f"peft=qlora with ZeRO-3 needs peft.quant.quant_storage == peft.quant.compute_dtype "
            f"(got {quant.quant_storage} vs {quant.compute_dtype}): set peft.quant.quant_storage={quant.compute_dtype}"
        )
    if offloads_parameters(cfg):
        raise ConfigError(
            "peft=qlora with deepspeed offload_param is not supported (bitsandbytes 4-bit weights are not "
            "offloaded by DeepSpeed; untested): use deepspeed=zero3 or deepspeed=zero2_offload"
        )


def check_deepspeed(cfg: DictConfig) -> None:
    if not cfg.deepspeed:
        return
    stage = zero_stage(cfg)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_optimization.stage={stage}: use 0, 1, 2 or 3")
    if offloads_parameters(cfg) and stage != 3:
        raise ConfigError("deepspeed offload_param needs ZeRO stage 3: use deepspeed=zero3_offload")
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            "deepspeed=... needs the deepspeed package: pip install deepspeed, or use deepspeed=none"
        )
    check_deepspeed_agrees_with_trainer(cfg)


def check_deepspeed_agrees_with_trainer(cfg: DictConfig) -> None:
    """A value a DeepSpeed JSON sets (not "auto") must equal the setting it mirrors, as the HF Trainer
    requires: say which, now, instead of a multi-line error once the data is prepared."""
    compute_dtype = cfg.peft.quant.compute_dtype if cfg.peft.method == "qlora" else cfg.model.dtype
    mirrors = {
        "train_micro_batch_size_per_gpu": (
            "trainer.per_device_train_batch_size",
            "per_device_train_batch_size",
        ),
        "gradient_accumulation_steps": ("trainer.gradient_accumulation_steps", "gradient_accumulation_steps"),
        "gradient_clipping": ("trainer.max_grad_norm", "max_grad_norm"),
        "optimizer.params.lr": ("trainer.learning_rate", "learning_rate"),
    }
    for ds_key, (key, trainer_key) in mirrors.items():
        value = OmegaConf.select(cfg.deepspeed, ds_key)
        expected = trainer_value(cfg, trainer_key)
        if value not in (None, "auto") and value != expected:
            raise ConfigError(
                f'deepspeed {ds_key}={value} but {key}={expected}: make them equal, or write "auto" in the JSON'
            )
    for precision in ("bf16", "fp16"):
        enabled = OmegaConf.select(cfg.deepspeed, f"{precision}.enabled")
        expected = compute_dtype == {"bf16": "bfloat16", "fp16": "float16"}[precision]
        if enabled not in (None, "auto") and bool(enabled) != expected:
            raise ConfigError(
                f"deepspeed {precision}.enabled={enabled} but model.dtype={cfg.model.dtype}: set the dtype to "
                f'match, or write "auto" in the JSON'
            )


@functools.cache
def trl_config_class(stage: str) -> type:
    """TRL's argument class of a pipeline (imported on first use: TRL is slow to import)."""
    import trl

    if stage == "orpo":
        from trl.experimental.orpo import ORPOConfig

        return ORPOConfig
    if stage == "cpo":
        from trl.experimental.cpo import CPOConfig

        return CPOConfig
    return {"sft": trl.SFTConfig, "dpo": trl.DPOConfig, "kto": trl.KTOConfig}[stage]


def trainer_value(cfg: DictConfig, key: str) -> Any:
    """`trainer.KEY`, or TRL's default for it when the config leaves it out."""
    if key in cfg.trainer:
        return cfg.trainer[key]
    default = next(f for f in dataclasses.fields(trl_config_class(cfg.stage)) if f.name == key).default
    return None if default is dataclasses.MISSING else default


def activation_checkpointing_kwargs(trainer: dict | DictConfig) -> dict:
    """`trainer.activation_checkpointing_kwargs` (a mapping, or the JSON string TrainingArguments also takes)
    over the pipelines' non-reentrant default, key by key: transformers' `every_n_layers` and `offload`,
    and torch.utils.checkpoint's own keys."""
    value = trainer.get("activation_checkpointing_kwargs") or {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ConfigError(f"trainer.activation_checkpointing_kwargs is not JSON: {error}") from None
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if not isinstance(value, dict):
        raise ConfigError(
            f"trainer.activation_checkpointing_kwargs={value!r}: give a mapping, e.g. '{{every_n_layers: 2}}'"
        )
    return {"use_reentrant": False} | value


def report_to(cfg: DictConfig) -> list[str]:
    """`trainer.report_to` as a list of integrations ([] for none); a single name is accepted."""
    value = trainer_value(cfg, "report_to")
    names = [value] if isinstance(value, str) else list(value or [])
    return [] if names in (["none"], []) else names


def check_trainer(cfg: DictConfig) -> None:
    """Every key a field of TRL's SFTConfig/DPOConfig with a value of its type, then our ranges."""
    config_class = trl_config_class(cfg.stage)
    fields = {item.name: item for item in dataclasses.fields(config_class)}
    hints = typing.get_type_hints(config_class)
    for key, value in cfg.trainer.items():
        if key in TRAINER_KEYS_SET_ELSEWHERE:
            raise ConfigError(
                f"trainer.{key} is set from {TRAINER_KEYS_SET_ELSEWHERE[key]}: use that instead"
            )
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
            hint = f" (did you mean 'trainer.{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown key 'trainer.{key}'{hint}: trainer.* takes the fields of TRL's {config_class.__name__}"
            )
        if not value_fits(value, hints[key]):
            raise ConfigError(
                f"bad value for 'trainer.{key}': {value!r} is not {type_name(hints[key])} "
                f"(the type of {config_class.__name__}.{key})"
            )
    value = functools.partial(trainer_value, cfg)
    if cfg.max_steps == -1 and value("num_train_epochs") <= 0:
        raise ConfigError(
            f"trainer.num_train_epochs={value('num_train_epochs')} with max_steps=-1 trains nothing (final/ would "
            "be the untrained model): give a positive number of epochs, or max_steps=N"
        )
    if value("learning_rate") <= 0:
        raise ConfigError(f"trainer.learning_rate={value('learning_rate')} must be positive")
    if value("warmup_steps") < 0:
        raise ConfigError(
            f"trainer.warmup_steps={value('warmup_steps')}: use a number of steps, or a ratio in [0, 1)"
        )
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "logging_steps", "save_steps"):  # fmt: skip
        require_positive(f"trainer.{key}", value(key))
    for key in ("save_total_limit", "eval_steps"):
        if value(key) is not None:
            require_positive(f"trainer.{key}", value(key))
    every = activation_checkpointing_kwargs(cfg.trainer).get("every_n_layers", 1)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigError(
            f"trainer.activation_checkpointing_kwargs.every_n_layers={every!r} must be a whole number >= 1 "
            "(1 checkpoints every layer, 2 every 2nd, ...)"
        )
    check_evaluation(cfg)
    check_report_to(cfg)
    STAGE_CHECKS[cfg.stage](cfg)


def check_evaluation(cfg: DictConfig) -> None:
    strategy = trainer_value(cfg, "eval_strategy") if "eval_strategy" in cfg.trainer else None
    if strategy not in (None, "no") and not (cfg.data.eval_path or cfg.data.eval_fraction > 0):
        raise ConfigError(
            f"trainer.eval_strategy={strategy} but there is no evaluation data: set data.eval_path or "
            "data.eval_fraction, or trainer.eval_strategy=no"
        )
    if strategy == "steps" and trainer_value(cfg, "eval_steps") is None:
        raise ConfigError("trainer.eval_strategy=steps needs trainer.eval_steps=N")
    check_evaluation_extras(cfg)


def evaluates(cfg: DictConfig) -> bool:
    """Whether the run evaluates: eval data and an eval schedule (as pipeline.training_kwargs sets it)."""
    has_data = bool(cfg.data.eval_path or cfg.data.eval_fraction > 0)
    strategy = cfg.trainer.get("eval_strategy") or (
        "steps" if cfg.trainer.get("eval_steps") is not None else "no"
    )
    return has_data and strategy != "no"


def check_evaluation_extras(cfg: DictConfig) -> None:
    """evaluation.*: sample generations and early stopping need evaluations; early stopping also needs
    transformers' best-model tracking (EarlyStoppingCallback asserts it once training starts)."""
    extras = cfg.evaluation
    if extras.sample_prompts < 0:
        raise ConfigError(f"evaluation.sample_prompts={extras.sample_prompts}: use a count >= 0 (0 = off)")
    require_positive("evaluation.sample_max_new_tokens", extras.sample_max_new_tokens)
    wanted = [key for key, on in (("sample_prompts", extras.sample_prompts > 0),
                                  ("early_stopping_patience", extras.early_stopping_patience is not None)) if on]  # fmt: skip
    if wanted and not evaluates(cfg):
        raise ConfigError(
            f"evaluation.{wanted[0]} acts at each evaluation, but this run does not evaluate: set "
            "trainer.eval_steps=N and eval data (data.eval_path or data.eval_fraction)"
        )
    if extras.sample_prompts > 0 and cfg.stage == "sft" and not cfg.data.completion_only:
        raise ConfigError(
            "evaluation.sample_prompts needs data.completion_only=true: a prompt is the tokens before a row's "
            "first trained token"
        )
    if extras.early_stopping_patience is None:
        return
    require_positive("evaluation.early_stopping_patience", extras.early_stopping_patience)
    if not trainer_value(cfg, "load_best_model_at_end"):
        raise ConfigError(
            "evaluation.early_stopping_patience needs trainer.load_best_model_at_end=true (and "
            "trainer.metric_for_best_model, default eval loss): add them"
        )
    eval_steps, save_steps = trainer_value(cfg, "eval_steps"), trainer_value(cfg, "save_steps")
    if cfg.trainer.get("eval_strategy", "steps") == "steps" and save_steps % eval_steps:
        raise ConfigError(
            f"trainer.load_best_model_at_end needs trainer.save_steps ({save_steps}) to be a multiple of "
            f"trainer.eval_steps ({eval_steps}): checkpoints must exist at evaluations"
        )


def check_report_to(cfg: DictConfig) -> None:
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    for name in report_to(cfg):
        require_choice("trainer.report_to", name, (*INTEGRATION_TO_CALLBACK, "none"))
        package = REPORT_TO_PACKAGES.get(name, name)
        if importlib.util.find_spec(package) is None:
            extra = (
                f"pip install 'mixtral-tune[{name}]'"
                if name in REPORT_TO_PACKAGES
                else f"pip install {package}"
            )
            raise ConfigError(
                f"trainer.report_to={name} needs the {package} package: {extra}, or drop {name}"
            )


def check_dpo_loss(cfg: DictConfig) -> None:
    """DPO loss settings TRL would only reject once the models are built."""
    loss_types = list(trainer_value(cfg, "loss_type"))
    for loss_type in loss_types:
        require_choice("trainer.loss_type", loss_type, DPO_LOSS_TYPES)
    check_beta(cfg)
    smoothing = trainer_value(cfg, "label_smoothing")
    if "exo_pair" in loss_types and smoothing <= 0:
        raise ConfigError(
            "trainer.loss_type=exo_pair needs trainer.label_smoothing > 0: pass trainer.label_smoothing=1e-3 "
            "(the EXO paper's value)"
        )
    if "robust" in loss_types and not 0.0 <= smoothing < 0.5:
        raise ConfigError(
            f"trainer.loss_type=robust needs trainer.label_smoothing in [0, 0.5), got {smoothing}"
        )
    weights = trainer_value(cfg, "loss_weights")
    if weights is not None and len(weights) != len(loss_types):
        raise ConfigError(
            f"trainer.loss_weights has {len(weights)} weights for {len(loss_types)} loss types: give one per loss"
        )
    divergence_losses = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
    divergence = trainer_value(cfg, "f_divergence_type")
    if divergence != "reverse_kl" and not set(loss_types) <= divergence_losses:
        raise ConfigError(
            f"trainer.f_divergence_type={divergence} works only with loss types {', '.join(sorted(divergence_losses))}: "
            "change trainer.loss_type or use f_divergence_type=reverse_kl"
        )


def check_sft_loss(cfg: DictConfig) -> None:
    require_choice("trainer.loss_type", trainer_value(cfg, "loss_type"), SFT_LOSS_TYPES)


def check_beta(cfg: DictConfig) -> None:
    if trainer_value(cfg, "beta") <= 0:
        raise ConfigError(f"trainer.beta={trainer_value(cfg, 'beta')} must be positive")


def check_kto_loss(cfg: DictConfig) -> None:
    """KTO settings TRL's KTOTrainer would only reject once the models are built."""
    loss_type = trainer_value(cfg, "loss_type")
    require_choice("trainer.loss_type", loss_type, KTO_LOSS_TYPES)
    check_beta(cfg)
    for key in ("desirable_weight", "undesirable_weight"):
        require_positive(f"trainer.{key}", trainer_value(cfg, key))
    if loss_type == "kto" and trainer_value(cfg, "per_device_train_batch_size") < 2:
        raise ConfigError(
            "trainer.loss_type=kto estimates its KL term from the other rows of each micro-batch: set "
            "trainer.per_device_train_batch_size >= 2 (or trainer.loss_type=apo_zero_unpaired)"
        )
    if loss_type == "kto" and trainer_value(cfg, "train_sampling_strategy") != "sequential":
        raise ConfigError(
            "trainer.loss_type=kto pairs each row with its neighbours for the KL term, so rows must be read in "
            "order: set trainer.train_sampling_strategy=sequential (shuffle the data file instead)"
        )


def check_cpo_loss(cfg: DictConfig) -> None:
    """CPO/SimPO settings TRL's CPOTrainer would only reject once the model is built."""
    require_choice("trainer.loss_type", trainer_value(cfg, "loss_type"), CPO_LOSS_TYPES)
    check_beta(cfg)
    if trainer_value(cfg, "cpo_alpha") < 0:
        raise ConfigError(
            f"trainer.cpo_alpha={trainer_value(cfg, 'cpo_alpha')} must be >= 0 (0: no NLL term)"
        )


# The loss settings of each pipeline, checked after the fields common to every TRL config.
STAGE_CHECKS = {
    "sft": check_sft_loss,
    "dpo": check_dpo_loss,
    "kto": check_kto_loss,
    "orpo": check_beta,
    "cpo": check_cpo_loss,
}


def value_fits(value: Any, annotation: Any) -> bool:
    """Whether a composed value can be passed for a field annotated `annotation` (unknown types pass)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(value_fits(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str or (isinstance(annotation, type) and issubclass(annotation, enum.Enum)):
        return isinstance(value, str)
    if annotation is list or origin is list:
        return isinstance(value, ListConfig | list)
    if annotation is dict or origin is dict:
        return isinstance(value, DictConfig | dict)
    return True


def type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def zero_stage(cfg: DictConfig) -> int:
    """ZeRO stage of the DeepSpeed dict; 0 when DeepSpeed is off."""
    stage = cfg.deepspeed.get("zero_optimization", {}).get("stage", 0) if cfg.deepspeed else 0
    if isinstance(stage, bool) or not isinstance(stage, int):
        raise ConfigError(
            f"deepspeed zero_optimization.stage={stage!r} is not a whole number: write 0, 1, 2 or 3 in the JSON"
        )
    return stage


def offloads_parameters(cfg: DictConfig) -> bool:
    zero = cfg.deepspeed.get("zero_optimization", {}) if cfg.deepspeed else {}
    return zero.get("offload_param", {}).get("device", "none") != "none"


def deepspeed_dict(cfg: DictConfig) -> dict | None:
    """The DeepSpeed config for `TrainingArguments(deepspeed=...)`, or None when DeepSpeed is off."""
    return OmegaConf.to_container(cfg.deepspeed, resolve=True) if cfg.deepspeed else None


def lora_target_modules(cfg: DictConfig) -> list[str]:
    """Module names LoRA wraps for `peft.targets` (never the router)."""
    return list(LORA_TARGET_MODULES[cfg.peft.targets])


def lora_modules_to_save(cfg: DictConfig) -> list[str]:
    """Modules trained in full next to the adapters: the router with peft.train_router=true, else none."""
    return list(ROUTER_MODULES) if cfg.peft.train_router else []


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def require_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value} is not supported: choose one of {', '.join(choices)}")


def require_positive(key: str, value: int | float) -> None:
    if value <= 0:
        raise ConfigError(f"{key}={value} must be positive")
