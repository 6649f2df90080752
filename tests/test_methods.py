"""The KTO, ORPO and CPO/SimPO pipelines (mixtral_tune/kto.py, orpo.py, cpo.py).

Held to plain TRL on transformers' Mixtral: the pipeline trains a few steps from its random init
(OUTPUT_DIR/base); TRL's own trainer then trains transformers' `MixtralForCausalLM`, loaded from that
same base with `output_router_logits=True` and the same `router_aux_loss_coef`, on the raw JSONL rows
with the same settings (read back from the run's run_config.yaml); the per-step losses must agree.
transformers' Mixtral has no z-loss, so the comparison runs with router_z_loss_coef=0; a separate test
shows the z term in each trainer's loss when it is on. Rows, config checks and the CLI come last.
"""

import json
import math
import re

import datasets
import peft
import pytest
import torch
import transformers
import trl
from omegaconf import OmegaConf
from pipeline_runs import REPO, SMALL_MODEL, log_history, run_pipeline, train_losses
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from mixtral_model import encode_chat
from mixtral_tune import cpo, kto, orpo, pipeline
from mixtral_tune.config import ConfigError, load_config, recipe_files
from mixtral_tune.data import BadRow, parse_row, prepare_dpo_data, prepare_kto_data
from mixtral_tune.estimate import estimate_run
from mixtral_tune.training.model_factory import build_frozen_reference
from mixtral_tune.training.objective import RouterObjectiveMixin

STEPS = 6
Z = 0.1  # router_z_loss_coef when on (z ~ 2 on the small model: a term far above fp32 noise)
BATCH = [
    "trainer.per_device_train_batch_size=4",
    "trainer.gradient_accumulation_steps=2",
    "trainer.learning_rate=1e-3",  # steps that move the model: the runs must agree on each update
]
# stage -> (recipe, entry point, prepare, arguments, trainer class, reference, TRL config, TRL trainer, rows)
METHODS = {
    "kto": ("tiny/kto", kto, prepare_kto_data, kto.kto_arguments, kto.MixtralKTOTrainer, build_frozen_reference,
            trl.KTOConfig, trl.KTOTrainer, "kto_train.jsonl"),
    "orpo": ("tiny/orpo", orpo, prepare_dpo_data, orpo.orpo_arguments, orpo.MixtralORPOTrainer, None,
             ORPOConfig, ORPOTrainer, "dpo_train.jsonl"),
    "simpo": ("tiny/simpo", cpo, prepare_dpo_data, cpo.cpo_arguments, cpo.MixtralCPOTrainer, None,
              CPOConfig, CPOTrainer, "dpo_train.jsonl"),
}  # fmt: skip
# The trainer settings the TRL run takes from ours (everything else is TRL's default in both runs)
SHARED = (
    "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "optim",
    "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "beta", "loss_type", "cpo_alpha",
    "simpo_gamma", "desirable_weight", "undesirable_weight",
)  # fmt: skip


def argv(method: str, output_dir, *overrides) -> list[str]:
    recipe = METHODS[method][0]
    return [f"+recipe={recipe}", *SMALL_MODEL, *BATCH, f"output_dir={output_dir}", *overrides]


def plain_trl_losses(method: str, run_dir, tmp_path) -> tuple[list[float], list[float]]:
    """Per-step (loss, aux_loss) of TRL's trainer on transformers' Mixtral, from our run's base and settings."""
    *_, config_class, trainer_class, rows = METHODS[method]
    cfg = OmegaConf.load(run_dir / "final" / "run_config.yaml")
    model = transformers.MixtralForCausalLM.from_pretrained(
        run_dir / "base", output_router_logits=True, router_aux_loss_coef=cfg.model.router_aux_loss_coef
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(run_dir / "base")
    shared = {key: cfg.trainer[key] for key in SHARED if key in cfg.trainer}
    args = config_class(
        output_dir=str(tmp_path / "trl"),
        max_steps=cfg.max_steps,
        max_length=cfg.data.max_length,
        data_seed=shared["seed"],
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        bf16=False,
        use_cpu=True,
        activation_checkpointing=False,
        **shared,
    )
    train = datasets.load_dataset("json", data_files=str(REPO / "data" / rows), split="train")
    trainer = trainer_class(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    trainer.train()
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    return [entry["loss"] for entry in steps], [entry.get("aux_loss") for entry in steps]


def max_relative_difference(ours: list[float], theirs: list[float]) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("method", list(METHODS))
def test_per_step_losses_equal_plain_trl_on_transformers_mixtral(method, tmp_path):
    run_dir = tmp_path / "ours"
    METHODS[method][1].main(argv(method, run_dir, f"max_steps={STEPS}", "model.router_z_loss_coef=0"))
    ours = train_losses(run_dir / "final")
    theirs, their_aux = plain_trl_losses(method, run_dir, tmp_path)
    assert len(ours) == len(theirs) == STEPS
    difference = max_relative_difference(ours, theirs)
    print(f"{method}: max relative difference of the per-step loss over {STEPS} steps: {difference:.2e}")
    print(f"{method}: ours {ours}\n{method}: TRL  {theirs}")
    assert difference < 1e-5, (ours, theirs)
    assert len(set(ours)) == STEPS, "the loss must move: the runs train"
    if method == "kto":  # TRL's KTOTrainer logs its router term too (ORPO's and CPO's do not)
        ours_aux = train_losses(run_dir / "final", "aux_loss")
        assert max_relative_difference(ours_aux, their_aux) < 1e-5, (ours_aux, their_aux)


def build(method: str, output_dir, *overrides):
    _, _, prepare, arguments, trainer_class, reference, *_ = METHODS[method]
    stage = "cpo" if method == "simpo" else method
    trainer, _, _ = pipeline.build_trainer(
        stage, argv(method, output_dir, *overrides), prepare, arguments, trainer_class, reference
    )
    return trainer


def perturb(model) -> None:
    """Move the policy away from the reference (KTO), so their router terms differ."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))


def router_terms(model, policy, input_ids, attention_mask) -> tuple[torch.Tensor, float, float]:
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
    weighted = (
        policy.config.router_aux_loss_coef * out.aux_loss + policy.config.router_z_loss_coef * out.z_loss
    )
    return weighted, out.aux_loss.item(), out.z_loss.item()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_router_terms_of_the_trained_forward_enter_the_loss_and_the_logs(method, mode, tmp_path):
    """aux and z terms (z on) of the forward TRL trains on are added to TRL's loss in training and in
    evaluation, and logged; for KTO not those of its KL-estimate forward, which runs first."""
    trainer = build(method, tmp_path, f"model.router_z_loss_coef={Z}")
    model, policy = trainer.model, trainer.policy
    model.train(mode == "train")
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    if method == "kto":
        perturb(model)
        loss = trainer.compute_loss(model, dict(batch))
        without = super(RouterObjectiveMixin, trainer).compute_loss(model, dict(batch))
        metrics = {key: values[-1] for key, values in trainer._metrics[mode].items()}
        prefix = ""
        trained = (batch["input_ids"], batch["attention_mask"])
        kl_forward = (batch["KL_input_ids"], batch["KL_attention_mask"])
    else:
        loss, metrics = trainer.get_batch_loss_metrics(model, batch, mode)
        without, _ = super(RouterObjectiveMixin, trainer).get_batch_loss_metrics(model, batch, mode)
        prefix = "eval_" if mode == "eval" else ""
        pad = trainer.padding_value if method == "orpo" else trainer.pad_token_id
        both = trainer.concatenated_inputs(batch, padding_value=pad)
        trained = (both["concatenated_input_ids"], both["concatenated_attention_mask"])
        kl_forward = None
    expected, aux, z = router_terms(model, policy, *trained)
    torch.testing.assert_close((loss - without).detach(), expected, rtol=1e-5, atol=1e-6)
    assert metrics[f"{prefix}aux_loss"] == pytest.approx(aux, rel=1e-6)
    assert metrics[f"{prefix}z_loss"] == pytest.approx(z, rel=1e-6)
    assert Z * z > 0.1, "the z term is large enough to be seen"
    if kl_forward is not None:
        _, _, kl_z = router_terms(model, policy, *kl_forward)
        assert abs(kl_z - z) > 1e-4, "the KL forward routes like the trained one: the test could not tell"


# ---------------------------------------------------------------------------------------------
# Rows, config checks, CLI


def test_kto_rows_as_trl_takes_them_and_bad_ones_named():
    row = {"prompt": "Reverse: a b", "completion": "b a", "label": False}
    name, example = parse_row(row, "kto")
    assert name == "unpaired" and example.label is False
    assert example.prompt == [{"role": "user", "content": "Reverse: a b"}]
    assert example.completion == [{"role": "assistant", "content": "b a"}]
    for broken, kind in (
        ({**row, "label": "yes"}, "wrong type"),
        ({k: v for k, v in row.items() if k != "label"}, "missing field"),
        ({**row, "completion": ""}, "empty text"),
    ):
        with pytest.raises(BadRow, match=kind):
            parse_row(broken, "kto")
    shipped = [json.loads(line) for line in (REPO / "data" / "kto_train.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (REPO / "data" / "dpo_train.jsonl").read_text().splitlines()]
    assert len(shipped) == 2 * len(pairs)  # TRL's unpair_preference_dataset of the DPO rows
    unpaired = trl.data_utils.unpair_preference_dataset(datasets.Dataset.from_list(pairs))
    assert sorted(map(json.dumps, shipped)) == sorted(json.dumps(dict(r)) for r in unpaired)


@pytest.mark.parametrize(
    ("stage", "overrides", "message"),
    [
        ("kto", ["trainer.per_device_train_batch_size=1"], "per_device_train_batch_size >= 2"),
        ("kto", ["trainer.train_sampling_strategy=random"], "train_sampling_strategy=sequential"),
        ("kto", ["trainer.loss_type=sigmoid"], "trainer.loss_type=sigmoid is not supported"),
        ("kto", ["data=demo_dpo"], "data.kind=dpo does not fit the kto pipeline: use data.kind=kto"),
        ("orpo", ["data=demo_kto"], "use data.kind=dpo"),
        ("orpo", ["data.dpo_truncation_mode=keep_end"], "keep_start"),
        ("orpo", ["trainer.beta=0"], "trainer.beta=0 must be positive"),
        ("cpo", ["trainer.loss_type=kto"], "trainer.loss_type=kto is not supported"),
        ("cpo", ["trainer.simpo_gama=1"], "did you mean 'trainer.simpo_gamma'"),
        ("cpo", ["trainer.cpo_alpha=-1"], "cpo_alpha=-1"),
    ],
)
def test_settings_trl_would_refuse_later_are_one_line_errors_now(stage, overrides, message, tmp_path):
    recipe = {"kto": "tiny/kto", "orpo": "tiny/orpo", "cpo": "tiny/simpo"}[stage]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as error:
        load_config(stage, [f"+recipe={recipe}", f"output_dir={tmp_path}", *overrides])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("stage", ["kto", "orpo", "cpo"])
def test_cli_lists_the_command_and_a_recipe_for_another_stage_is_refused(stage, tmp_path, capsys):
    from mixtral_tune.cli import main as cli

    assert cli(["--help"]) == 0
    assert f"  {stage} " in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        cli([stage, "+recipe=tiny/dpo", f"output_dir={tmp_path}"])
    assert exit_.value.code == 2
    assert "launch it with mixtral-tune dpo" in capsys.readouterr().err


ONE_GPU_ESTIMATE = re.compile(r"^# Estimate: (?P<gib>[\d.]+) GiB of GPU memory on one GPU ")


@pytest.mark.parametrize(
    "recipe", ["mixtral-8x7b/kto_qlora", "mixtral-8x7b/orpo_qlora", "mixtral-8x7b/simpo_qlora"]
)
def test_one_gpu_recipe_headers_state_the_estimate_function_s_number(recipe):
    header = [
        line for line in recipe_files()[recipe].read_text().splitlines() if ONE_GPU_ESTIMATE.match(line)
    ]
    assert len(header) == 1, f"{recipe}: no one-GPU estimate line in its header"
    stated = float(ONE_GPU_ESTIMATE.match(header[0])["gib"])
    assert stated == estimate_run([f"+recipe={recipe}"], world_size=1).summary()["gpu_memory_gib"]


@pytest.mark.distributed
@pytest.mark.parametrize(
    "method",
    ["kto", pytest.param("orpo", marks=pytest.mark.slow), pytest.param("simpo", marks=pytest.mark.slow)],
)
def test_two_rank_zero2_lora_runs_train_with_the_router_terms_and_save_an_adapter_transformers_loads(
    method, tmp_path
):
    """2 gloo ranks, DeepSpeed ZeRO-2, LoRA on attention and experts: every step logs a finite loss and
    the aux term; the final adapter is trained and loads onto transformers' Mixtral through PEFT."""
    stage = "cpo" if method == "simpo" else method
    out = tmp_path / "run"
    overrides = argv(method, out, "max_steps=3", "trainer.save_steps=3", "deepspeed=zero2", "peft=lora")
    run_pipeline(stage, [*overrides, "peft.dropout=0.0"], nproc=2, timeout=600)
    steps = [entry for entry in log_history(out / "final") if "loss" in entry and "train_loss" not in entry]
    assert len(steps) == 3 and all(math.isfinite(e["loss"]) and e["aux_loss"] > 0 for e in steps), steps
    adapter = peft.PeftModel.from_pretrained(
        transformers.MixtralForCausalLM.from_pretrained(out / "base"), out / "final"
    )
    lora_b = [p for name, p in adapter.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b), "empty adapter"


@pytest.mark.parametrize("method", list(METHODS))
def test_trl_tokenizes_the_rows_as_encode_chat_does(method, tmp_path):
    """Each TRL trainer tokenizes the prepared rows its own way (KTO: the chat template's ids; ORPO and CPO:
    the rendered text re-tokenized); every way must give encode_chat's ids (the format SFT trains on)."""
    trainer = build(method, tmp_path)
    row = json.loads((REPO / "data" / METHODS[method][-1]).read_text().splitlines()[0])
    tokenizer = trainer.processing_class
    tokenized = trainer.train_dataset[0]
    if method == "kto":
        ids = tokenized["prompt_ids"] + tokenized["completion_ids"]
        expected = encode_chat(tokenizer, row["prompt"] + row["completion"])["input_ids"]
        assert ids == expected
        return
    for answer in ("chosen", "rejected"):
        expected = encode_chat(tokenizer, row["prompt"] + row[answer])["input_ids"]
        assert tokenized[f"{answer}_input_ids"] == expected, answer
        prompt_length = len(encode_chat(tokenizer, row["prompt"])["input_ids"])
        assert tokenized[f"{answer}_labels"] == [-100] * prompt_length + expected[prompt_length:]
