"""Pieces both pipelines share: config from the command line, output-directory safety, wandb,
trainer arguments, the random-init base, DeepSpeed/expert-parallel wiring, and the final save.

Order matters and is the same in both entry points: everything a user can get wrong (config, data
files and rows, parallel combination) is checked before a model is built or an output written.
"""

import os  # noqa: I001  (mixtral_model.quiet comes before deepspeed)
import shutil
import sys
from pathlib import Path

from mixtral_model import quiet  # noqa: F401  (first: drops start-up messages nobody can act on)
import deepspeed
import torch
import transformers
from huggingface_hub import HfApi
from omegaconf import DictConfig, OmegaConf

from mixtral_model import MixtralConfig, load_tokenizer
from mixtral_model.tokenizer import save_for_serving
from mixtral_parallel.deepspeed_moe import check_parallel_combination, prepare_for_deepspeed
from mixtral_tune.training.reporting import RunSummaryCallback, use_lean_console
from mixtral_tune.training.resume import latest_complete_checkpoint
from mixtral_tune.config import (
    ConfigError,
    activation_checkpointing_kwargs,
    check_architecture_matches,
    deepspeed_dict,
    load_config,
    report_to,
    resume_checkpoint,
    trainer_value,
    uses_adapters,
    zero_stage,
)
from mixtral_tune.data import DataError, data_plan
from mixtral_tune.model_card import write_generation_config, write_model_card
from mixtral_tune.training.model_factory import build_model, write_random_init

USAGE = """usage: {script} +recipe=NAME|FILE.yaml [deepspeed=NAME|FILE.json] [key=value ...] [--print-config]
  --print-config (or --cfg job): print the resolved, validated config and exit (see README: CLI)"""


def config_from_argv(stage: str, argv: list[str]) -> DictConfig:
    """Compose and validate `configs/<stage>.yaml` with the command-line overrides, or exit with one line."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(USAGE.format(script=f"mixtral-tune {stage}"))
        sys.exit(0)
    print_only, argv = split_print_config_flag(argv)
    try:
        cfg = load_config(stage, argv)
        if print_only:
            print(OmegaConf.to_yaml(cfg, resolve=True), end="")
            sys.exit(0)
        check_parallel_combination(zero_stage(cfg), cfg.model.expert_parallel_size, uses_adapters(cfg))
        check_checkpoint_architecture(cfg)
        check_output_dir(cfg)
        check_hub_access(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        fail(error)
    return cfg


def split_print_config_flag(argv: list[str]) -> tuple[bool, list[str]]:
    """(whether --print-config or --cfg job was given, the other arguments)."""
    rest, flagged = [], False
    for arg in argv:
        if arg in ("--print-config", "--cfg=job") or (arg == "job" and rest[-1:] == ["--cfg"]):
            flagged = True
            rest = rest[:-1] if arg == "job" else rest
        else:
            rest.append(arg)
    return flagged, rest


def fail(error: Exception) -> None:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def check_checkpoint_architecture(cfg: DictConfig) -> None:
    """The checkpoint's config.json (no weights) agrees with model.architecture, which the checks use."""
    if not cfg.model.name_or_path:
        return
    try:
        checkpoint = MixtralConfig.from_pretrained(cfg.model.name_or_path)
    except OSError as error:
        raise ConfigError(
            f"model.name_or_path={cfg.model.name_or_path}: cannot read its config.json "
            f"({str(error).splitlines()[0]}); check the path, or the network for a hub name"
        ) from error
    check_architecture_matches(cfg, checkpoint)


def check_output_dir(cfg: DictConfig) -> None:
    """Never train over an existing run unless resuming it."""
    output = Path(cfg.output_dir)
    if resume_checkpoint(cfg) is False and (
        latest_complete_checkpoint(output) or (output / "final").exists()
    ):
        raise ConfigError(
            f"output_dir={output} already holds a run: pass resume=true to continue it, or a new output_dir"
        )


def check_hub_access(cfg: DictConfig) -> None:
    """trainer.push_to_hub needs the Hub and a login: find out now, not after training."""
    if not trainer_value(cfg, "push_to_hub"):
        return
    try:
        HfApi().whoami()
    except Exception as error:  # offline mode, no network, no token: all end the same way
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(
            f"trainer.push_to_hub=true but the Hugging Face Hub is not usable here ({reason}): "
            "log in with `hf auth login` where the network allows, or drop trainer.push_to_hub"
        ) from error


def resume_path(cfg: DictConfig) -> str | None:
    resume = resume_checkpoint(cfg)
    if resume is True:
        found = latest_complete_checkpoint(cfg.output_dir, warn=True)
        if found is None:
            fail(ConfigError(f"resume=true but {cfg.output_dir} has no complete checkpoint to resume from"))
        return found
    return resume or None


def configure_wandb(cfg: DictConfig) -> None:
    """wandb logs offline unless an API key is configured; WANDB_MODE set by the user always wins."""
    if "wandb" not in report_to(cfg):
        return
    if not os.environ.get("WANDB_API_KEY") and not (Path.home() / ".netrc").exists():
        os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_PROJECT", "mixtral-tune")
    os.environ.setdefault("WANDB_DIR", str(Path(cfg.output_dir)))
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)


def training_kwargs(cfg: DictConfig) -> dict:
    """Arguments for TRL's SFTConfig/DPOConfig: the `trainer` section as it is (TRL's names) over
    the pipelines' defaults, then what is set from the rest of the config (never from `trainer`)."""
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer.pop("activation_checkpointing_kwargs", None)  # in `defaults`, joined with ours
    compute_dtype = cfg.peft.quant.compute_dtype if cfg.peft.method == "qlora" else cfg.model.dtype
    has_eval_data = bool(cfg.data.eval_path or cfg.data.eval_fraction > 0)
    if not has_eval_data:
        trainer.pop("eval_steps", None)
    defaults = dict(
        activation_checkpointing_kwargs=activation_checkpointing_kwargs(cfg.trainer),
        logging_first_step=True,
        eval_strategy="steps" if trainer.get("eval_steps") is not None else "no",
        save_strategy="steps",
        data_seed=trainer.get("seed", 42),
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,
    )
    set_elsewhere = dict(
        output_dir=cfg.output_dir,
        max_steps=cfg.max_steps,
        report_to=report_to(cfg),
        bf16=compute_dtype == "bfloat16",
        fp16=compute_dtype == "float16",
        use_cpu=not torch.cuda.is_available(),
        deepspeed=deepspeed_dict(cfg),
        remove_unused_columns=False,
    )
    return defaults | trainer | set_elsewhere


def prepare_base_checkpoint(cfg: DictConfig, tokenizer) -> None:
    """Random init (no model.name_or_path): rank 0 writes OUTPUT_DIR/base while the others wait."""
    if cfg.model.name_or_path:
        return
    distributed = torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:
        write_random_init(cfg, tokenizer, Path(cfg.output_dir) / "base", cfg.trainer.seed)
    if distributed:
        torch.distributed.barrier()


def wire_deepspeed(model, cfg: DictConfig):
    """MoE-aware DeepSpeed preparation (expert groups, ZeRO-3 leaf modules); no-op without DeepSpeed."""
    if not cfg.deepspeed:
        return model
    model, _ = prepare_for_deepspeed(model, deepspeed_dict(cfg))
    return model


def start_distributed(cfg: DictConfig) -> None:
    """Under torchrun with DeepSpeed, its comm layer (and torch.distributed) before any model is
    loaded: zero.Init sizes its partitions by DeepSpeed's world size, which reads 1 until then."""
    if cfg.deepspeed and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        deepspeed.init_distributed()


def build_model_and_args(cfg: DictConfig, tokenizer, make_args, build):
    """The trainer arguments and the prepared model, in the order the parallel layout needs.

    Without expert parallelism the arguments come first: under ZeRO-3 they make from_pretrained
    partition parameters as it loads (zero.Init). With expert parallelism the model is loaded (and
    made expert-parallel: model_factory.load_model) before the arguments exist, so zero.Init cannot
    spread every expert over all ranks before a rank keeps its own (DeepSpeed partitions the dense
    parameters, and each expert over its expert-data-parallel group, when the trainer starts).
    """
    start_distributed(cfg)
    if cfg.model.expert_parallel_size == 1:
        args = make_args()
        _ = args.device  # torch.distributed up (torchrun without DeepSpeed) before rank 0 writes the base
        prepare_base_checkpoint(cfg, tokenizer)
        return wire_deepspeed(build_seeded(build, cfg), cfg), args
    prepare_base_checkpoint(cfg, tokenizer)
    model = wire_deepspeed(build_seeded(build, cfg), cfg)
    return model, make_args()


def build_seeded(build, cfg: DictConfig):
    """The model built from trainer.seed on every rank: new LoRA adapters start the same in every run.
    (DeepSpeed's start-up broadcast copies rank 0's dense parameters to the other ranks, but under
    expert parallelism each rank keeps its own experts' adapters, so their init must not depend on
    the RNG state a rank happens to be in.)"""
    transformers.set_seed(cfg.trainer.seed)
    return build(cfg)


def report_data(prepared, cfg: DictConfig) -> None:
    """The data plan, then the bad and long rows of each source (rank 0); text rows switch packing on."""
    if prepared.packed and not cfg.data.packing:
        cfg.data.packing = True  # SFTConfig(padding_free=...) follows; run_config.yaml records it
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print("\n".join(data_plan(prepared)), flush=True)
    for report in prepared.reports:
        if report.bad or report.truncated or report.dropped:
            print(report.summary(cfg.data.max_reported_bad_rows), flush=True)


def save_final(trainer, cfg: DictConfig, tokenizer) -> str:
    """The final adapter or model with its tokenizer in OUTPUT_DIR/final (gathered under ZeRO-3)."""
    final = str(Path(cfg.output_dir) / "final")
    trainer.save_model(final)
    if trainer.args.should_save:
        save_for_serving(tokenizer, final)
        OmegaConf.save(cfg, Path(final) / "run_config.yaml", resolve=True)
        trainer.state.save_to_json(str(Path(final) / "trainer_state.json"))
        write_generation_config(Path(final), tokenizer)
        if cfg.peft.esft_selection:  # which experts were trained, beside the weights
            shutil.copyfile(cfg.peft.esft_selection, Path(final) / "esft_selection.json")
        is_adapter = (Path(final) / "adapter_config.json").exists()
        write_model_card(Path(final), cfg, trainer.state.log_history, is_adapter)
        if trainer.args.push_to_hub:
            HfApi().upload_folder(
                repo_id=trainer.hub_model_id, folder_path=final, commit_message="final model"
            )
    return final


def load_data_or_exit(prepare, data_cfg, tokenizer, seed: int):
    try:
        return prepare(data_cfg, tokenizer, seed)
    except (DataError, FileNotFoundError) as error:
        fail(error)


def run(stage: str, argv: list[str], prepare_data, make_args, trainer_class, reference_model=None) -> str:
    """One pipeline run, in the order every entry point follows; returns OUTPUT_DIR/final.

    config (validated) -> tokenizer and data (validated) -> trainer arguments and model (ordered for
    the parallel layout) -> train (resumable) -> OUTPUT_DIR/final.
    """
    trainer, cfg, tokenizer = build_trainer(
        stage, argv, prepare_data, make_args, trainer_class, reference_model
    )
    trainer.train(resume_from_checkpoint=resume_path(cfg))
    return save_final(trainer, cfg, tokenizer)


def build_trainer(stage: str, argv: list[str], prepare_data, make_args, trainer_class, reference_model=None):
    """The trainer `run` trains, with its composed config and tokenizer (steps before training)."""
    cfg = config_from_argv(stage, argv)
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    data = load_data_or_exit(prepare_data, cfg.data, tokenizer, cfg.trainer.seed)
    report_data(data, cfg)
    configure_wandb(cfg)
    model, args = build_model_and_args(cfg, tokenizer, lambda: make_args(cfg), build_model)
    extra = {"ref_model": reference_model(cfg)} if reference_model else {}
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=[RunSummaryCallback(cfg.output_dir)],
        **extra,
    )
    trainer.enable_router_stats(model)
    use_lean_console(trainer)
    return trainer, cfg, tokenizer
