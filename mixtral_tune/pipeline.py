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
from transformers import EarlyStoppingCallback
from omegaconf import DictConfig, OmegaConf

from mixtral_model import MixtralConfig, load_tokenizer
from mixtral_model.tokenizer import save_for_serving
from mixtral_parallel.deepspeed_moe import check_parallel_combination, prepare_for_deepspeed
from mixtral_tune.training.divergence import DivergenceCallback
from mixtral_tune.training.reporting import RunSummaryCallback, use_lean_console
from mixtral_tune.training.samples import SampleGenerationsCallback
from mixtral_compat.transformers import load_checkpoint_weights, planned_optimizer_steps
from mixtral_tune.training.router_health import add_router_callbacks
from mixtral_tune.training.safe_load import checkpoint_problem_on_any_rank, load_checkpoint_file
from mixtral_compat.deepspeed import route_checkpoint_engine_loads
from mixtral_compat.torch import clear_stale_extension_locks
from mixtral_tune import run_dir
from mixtral_tune.training.resume import (
    checkpoint_step,
    keep_environment_out_of_saved_args,
    latest_complete_checkpoint,
)
from mixtral_tune.config import (
    ConfigError,
    activation_checkpointing_kwargs,
    check_architecture_matches,
    deepspeed_dict,
    load_config,
    report_to,
    saved_config,
    trainer_keys_read_from_env,
    resume_checkpoint,
    trainer_value,
    uses_adapters,
    world_size,
    zero_stage,
)
from mixtral_tune.chat_template import ChatTemplateError, use_chat_template
from mixtral_tune.command_help import help_text
from mixtral_tune.data import DataError, data_plan
from mixtral_tune.run_config import check_resume_changes, record_run
from mixtral_tune.model_card import write_generation_config, write_model_card
from mixtral_tune.training.model_factory import build_model, expert_parallel_layout, write_random_init

USAGE = """usage: {script} +recipe=NAME|FILE.yaml [deepspeed=NAME|FILE.json] [key=value ...] [--print-config]
  --print-config (or --cfg job): print the resolved, validated config and exit (see README: CLI)"""


def config_from_argv(stage: str, argv: list[str]) -> DictConfig:
    """Compose and validate `configs/<stage>.yaml` with the command-line overrides, or exit with one line."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(help_text(stage, USAGE.format(script=f"mixtral-tune {stage}")))
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
        check_launcher(cfg)
        check_resume(cfg)
        check_hub_access(cfg)
        own_output_dir(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as error:  # OutputDirError is a ValueError
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
    sys.stderr.write(f"error: {error}\n")  # one write: the ranks' lines do not interleave
    sys.stderr.flush()
    run_dir.release_every_output_dir()
    sys.exit(2)


def check_checkpoint_architecture(cfg: DictConfig) -> None:
    """The checkpoint's config.json (no weights) agrees with model.architecture, which the checks use."""
    if not cfg.model.name_or_path:
        return
    if Path(cfg.model.name_or_path).is_dir():
        run_dir.require_complete_final("model.name_or_path", cfg.model.name_or_path)
    try:
        checkpoint = MixtralConfig.from_pretrained(cfg.model.name_or_path)
    except OSError as error:
        raise ConfigError(
            f"model.name_or_path={cfg.model.name_or_path}: cannot read its config.json "
            f"({str(error).splitlines()[0]}); check the path, or the network for a hub name"
        ) from error
    check_architecture_matches(cfg, checkpoint)


def check_output_dir(cfg: DictConfig) -> None:
    """Never train over an existing run unless resuming it; an output_dir that can be made and written."""
    output = Path(cfg.output_dir)
    check_writable_dir(output)
    if resume_checkpoint(cfg) is False and (
        latest_complete_checkpoint(output) or (output / "final").exists()
    ):
        raise ConfigError(
            f"output_dir={output} already holds a run: pass resume=true to continue it, or a new output_dir"
        )


def check_writable_dir(output: Path) -> None:
    """output_dir is (or can be made) a directory this process may write: no file in its way."""
    existing = output.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"output_dir={output}: {existing} is a file, not a directory; pick another output_dir"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"output_dir={output}: {existing} is not writable by this user; pick another output_dir"
        )


# What torchrun (and every launcher DeepSpeed supports) sets; without them DeepSpeed looks for MPI.
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def check_launcher(cfg: DictConfig) -> None:
    """DeepSpeed runs under a distributed launcher, even for one process."""
    if cfg.deepspeed and not all(name in os.environ for name in LAUNCHER_ENV):
        raise ConfigError(
            f"deepspeed=... needs a distributed launcher: run torchrun --nproc_per_node=N -m mixtral_tune.{cfg.stage} "
            f"... (N=1 for one process), or ./launch.sh {cfg.stage} ...; or drop deepspeed (deepspeed=none)"
        )


def check_resume(cfg: DictConfig) -> None:
    """A resumed run changes nothing that alters what is trained, unless resume_allow_changes lists it."""
    resume = resume_checkpoint(cfg)
    checkpoint = latest_complete_checkpoint(cfg.output_dir) if resume is True else resume
    if checkpoint:
        check_resume_changes(cfg, checkpoint)


def own_output_dir(cfg: DictConfig) -> None:
    """OUTPUT_DIR/base fits this run (or is rebuilt), then this run holds OUTPUT_DIR until it ends
    (mixtral_tune/run_dir.py). Last of the checks: every rank refuses the same way before it."""
    run_dir.check_random_init_base(cfg, resuming=resume_checkpoint(cfg) is not False)
    run_dir.take_output_dir(cfg.output_dir)


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


def paired_preference_kwargs(cfg: DictConfig) -> dict:
    """training_kwargs for ORPO and CPO: their batches hold chosen_/rejected_input_ids and no input_ids,
    so the Trainer would log 0 tokens seen; counting them is off unless trainer.* asks for it."""
    kwargs = training_kwargs(cfg)
    if "include_num_input_tokens_seen" not in cfg.trainer:
        kwargs["include_num_input_tokens_seen"] = "no"
    return kwargs


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
        logging_nan_inf_filter=False,  # a NaN loss is logged as NaN (training stops: training/divergence.py)
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
        if run_dir.base_mismatch(cfg):  # one a run of other settings left: checked rebuildable at start-up
            shutil.rmtree(Path(cfg.output_dir) / "base")
        write_random_init(cfg, tokenizer, Path(cfg.output_dir) / "base", cfg.trainer.seed)
    if distributed:
        torch.distributed.barrier()


def wire_deepspeed(model, cfg: DictConfig, expert_parallel):
    """MoE-aware DeepSpeed preparation (expert groups, ZeRO-3 leaf modules); no-op without DeepSpeed."""
    if not cfg.deepspeed:
        return model
    model, _ = prepare_for_deepspeed(model, deepspeed_dict(cfg), expert_parallel)
    return model


def start_distributed(cfg: DictConfig) -> None:
    """Under torchrun with DeepSpeed, its comm layer (and torch.distributed) before any model is
    loaded: zero.Init sizes its partitions by DeepSpeed's world size, which reads 1 until then.

    First, on one process per machine, build locks of DeepSpeed's JIT-compiled ops left by a killed
    run are removed (DeepSpeed would wait on them forever), each named in one line."""
    if cfg.deepspeed and os.environ.get("LOCAL_RANK", "0") == "0":
        for lock in clear_stale_extension_locks():
            print(f"mixtral_tune: removed {lock}, a build lock of a DeepSpeed op left by a killed process")
    if cfg.deepspeed and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        deepspeed.init_distributed()


def build_model_and_args(cfg: DictConfig, tokenizer, make_args, build):
    """The prepared model, the trainer arguments and the expert-parallel layout (None without expert
    parallelism: `model_factory.expert_parallel_layout`, created once here and handed on), in the
    order the parallel layout needs.

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
        return wire_deepspeed(build_seeded(build, cfg, tokenizer, None), cfg, None), args, None
    prepare_base_checkpoint(cfg, tokenizer)
    expert_parallel = expert_parallel_layout(cfg)
    model = wire_deepspeed(build_seeded(build, cfg, tokenizer, expert_parallel), cfg, expert_parallel)
    return model, make_args(), expert_parallel


def build_seeded(build, cfg: DictConfig, tokenizer, expert_parallel):
    """The model built from trainer.seed on every rank: new LoRA adapters start the same in every run.
    (DeepSpeed's start-up broadcast copies rank 0's dense parameters to the other ranks, but under
    expert parallelism each rank keeps its own experts' adapters, so their init must not depend on
    the RNG state a rank happens to be in.)"""
    transformers.set_seed(cfg.trainer.seed)
    return build(cfg, tokenizer, expert_parallel)


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
    """The final adapter or model with its tokenizer in OUTPUT_DIR/final (gathered under ZeRO-3),
    staged in OUTPUT_DIR/.final.staging, marked complete, then renamed (mixtral_tune/run_dir.py)."""
    final, staged = Path(cfg.output_dir) / "final", run_dir.staging_dir(cfg.output_dir)
    if trainer.args.should_save:
        shutil.rmtree(staged, ignore_errors=True)  # left by a run killed while saving
    trainer.save_model(str(staged))
    if trainer.args.should_save:
        save_for_serving(tokenizer, str(staged))
        OmegaConf.save(saved_config(cfg), staged / "run_config.yaml")
        keep_environment_out_of_saved_args(trainer.args, trainer.args_from_environment, staged)
        trainer.state.save_to_json(str(staged / "trainer_state.json"))
        write_generation_config(staged, tokenizer)
        if cfg.peft.esft_selection:  # which experts were trained, beside the weights
            shutil.copyfile(cfg.peft.esft_selection, staged / "esft_selection.json")
        is_adapter = (staged / "adapter_config.json").exists()
        write_model_card(staged, cfg, trainer.state.log_history, is_adapter)
        run_dir.put_final_in_place(staged, final)
        if trainer.args.push_to_hub:
            HfApi().upload_folder(
                repo_id=trainer.hub_model_id, folder_path=str(final), commit_message="final model"
            )
    return str(final)


def tokenizer_for(cfg: DictConfig):
    """The run's tokenizer: model.tokenizer (or Mixtral's) in data.chat_template's format, or exit with one line."""
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    try:
        use_chat_template(tokenizer, cfg.data)
    except ChatTemplateError as error:
        fail(error)
    return tokenizer


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
    checkpoint = checked_resume_path(cfg)
    if checkpoint and nothing_left_to_train(trainer, cfg, checkpoint):
        final = Path(cfg.output_dir) / "final"
        if final.is_dir():
            return str(final)
        load_checkpoint_weights(trainer, checkpoint)
        return save_final(trainer, cfg, tokenizer)
    record_run(cfg, checkpoint)
    trainer.train(resume_from_checkpoint=checkpoint)
    stop_if_diverged(trainer, cfg)
    alerts = getattr(trainer, "router_alerts", None)
    if alerts is not None and alerts.stopped:
        if trainer.is_world_process_zero():
            print(
                f"error: {alerts.stopped}; router.alert=stop ended training (no final model)", file=sys.stderr
            )
        run_dir.release_every_output_dir()
        sys.exit(3)
    final = save_final(trainer, cfg, tokenizer)
    run_dir.release_output_dir(cfg.output_dir)
    return final


def checked_resume_path(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from, its files read by training/safe_load.py (nothing in
    them runs, every value is finite); one line and exit 2 otherwise. DeepSpeed reads them again
    through the same loader."""
    path = resume_path(cfg)
    if path is None:
        return None
    route_checkpoint_engine_loads(load_checkpoint_file)
    problem = checkpoint_problem_on_any_rank(path)
    if problem:  # every rank found it (gathered): rank 0 says so, all exit 2 before any file is loaded
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: resume: {problem}", file=sys.stderr, flush=True)
        run_dir.release_every_output_dir()
        sys.exit(2)
    return path


def stop_if_diverged(trainer, cfg: DictConfig) -> None:
    """After a run training/divergence.py stopped: one line naming the step and values, exit 1,
    nothing written from the diverged weights (the last checkpoint saved before stays)."""
    divergence = next(c for c in trainer.callback_handler.callbacks if isinstance(c, DivergenceCallback))
    if divergence.stopped is None:
        return
    last = latest_complete_checkpoint(cfg.output_dir)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved before it"
    if trainer.args.should_save:
        print(
            f"error: training diverged at {divergence.stopped}; final/ was not written and {kept}: "
            "lower trainer.learning_rate (or raise trainer.warmup_steps) and start again",
            file=sys.stderr,
            flush=True,
        )
    run_dir.release_every_output_dir()
    sys.exit(1)


def add_evaluation_callbacks(trainer, cfg: DictConfig) -> None:
    """evaluation.*: sample generations at each evaluation; early stopping (transformers' callback)."""
    extras = cfg.evaluation
    if extras.sample_prompts > 0:
        trainer.add_callback(
            SampleGenerationsCallback(trainer, extras.sample_prompts, extras.sample_max_new_tokens)
        )
    if extras.early_stopping_patience is not None:
        trainer.add_callback(
            EarlyStoppingCallback(
                early_stopping_patience=extras.early_stopping_patience,
                early_stopping_threshold=extras.early_stopping_threshold,
            )
        )


def nothing_left_to_train(trainer, cfg: DictConfig, checkpoint: str) -> bool:
    """Whether the checkpoint already holds every step of this run (the Trainer would train one more):
    say so, and whether final/ is there or is written from the checkpoint."""
    step, planned = checkpoint_step(Path(checkpoint)), planned_optimizer_steps(trainer)
    if step < planned:
        return False
    if cfg.deepspeed and not (Path(cfg.output_dir) / "final").is_dir():
        fail(ConfigError(
            f"resume={checkpoint} is at step {step} of {planned}, nothing left to train, and final/ is missing: "
            "export it from the checkpoint, or raise max_steps to train on"
        ))  # fmt: skip
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"[resume] {checkpoint} is at step {step} of {planned}: nothing left to train; final/ "
            f"{'holds the run' if (Path(cfg.output_dir) / 'final').is_dir() else 'is written from it'} "
            "(raise max_steps to train on)",
            flush=True,
        )
    return True


def check_training_rows(cfg: DictConfig, data) -> None:
    """Training data that cannot teach anything: DPO pairs whose chosen equals rejected (refused when
    every pair is, counted in a warning otherwise), and too few rows for one batch."""
    rows = len(data.train)
    if cfg.stage == "dpo":
        same = sum(
            chosen == rejected
            for chosen, rejected in zip(data.train["chosen"], data.train["rejected"], strict=True)
        )
        where = cfg.data.path or "data.mixture"
        if same == rows:
            fail(
                ConfigError(
                    f"{where}: all {rows} training pairs have chosen equal to rejected: nothing to prefer"
                )
            )
        if same:
            print(
                f"warning: {where}: {same} of {rows} training pairs have chosen equal to rejected "
                "(they add no preference signal)",
                file=sys.stderr,
                flush=True,
            )
    batch, ranks = trainer_value(cfg, "per_device_train_batch_size"), world_size()
    if trainer_value(cfg, "dataloader_drop_last") and -(-rows // ranks) < batch:
        fail(ConfigError(
            f"{rows} training rows on {ranks} rank(s) make no full batch of trainer.per_device_train_batch_size="
            f"{batch} with trainer.dataloader_drop_last=true: zero usable steps; lower the batch size or add rows"
        ))  # fmt: skip


def build_trainer(stage: str, argv: list[str], prepare_data, make_args, trainer_class, reference_model=None):
    """The trainer `run` trains, with its composed config and tokenizer (steps before training)."""
    cfg = config_from_argv(stage, argv)
    tokenizer = tokenizer_for(cfg)
    data = load_data_or_exit(prepare_data, cfg.data, tokenizer, cfg.trainer.seed)
    report_data(data, cfg)
    check_training_rows(cfg, data)
    configure_wandb(cfg)
    model, args, expert_parallel = build_model_and_args(cfg, tokenizer, lambda: make_args(cfg), build_model)
    # Seeded as the policy was: a vocabulary grown for a chat template gets the same new rows in both.
    extra = (
        {"ref_model": build_seeded(reference_model, cfg, tokenizer, expert_parallel)}
        if reference_model
        else {}
    )
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=[RunSummaryCallback(cfg.output_dir), DivergenceCallback()],
        expert_parallel=expert_parallel,
        **extra,
    )
    trainer.args_from_environment = trainer_keys_read_from_env(cfg)  # saved as ${oc.env:...}, not values
    trainer.enable_router_stats(model)
    add_router_callbacks(trainer, cfg, model)
    use_lean_console(trainer)
    add_evaluation_callbacks(trainer, cfg)
    return trainer, cfg, tokenizer
