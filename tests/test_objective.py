"""The objective the pipelines train (mixtral_tune/training/objective.py), held to the model's own forward(labels=...):
LM loss, router aux loss and router z-loss, under SFT and DPO, weighted by the model config's
coefficients only and logged as trained. Pipelines run in-process on a small model. And the TRL/PEFT
internals we lean on: a version without them fails loudly."""

from types import SimpleNamespace

import peft
import pytest
import torch
import trl
from pipeline_runs import SMALL_MODEL, log_history

from mixtral_compat.peft import skip_peft_target_rewrite_for_native_mixtral
from mixtral_model import MixtralForCausalLM
from mixtral_tune import dpo, pipeline, sft
from mixtral_tune.data import prepare_dpo_data, prepare_sft_data
from mixtral_tune.training.model_factory import build_frozen_reference
from mixtral_tune.training.objective import RouterObjectiveMixin

Z = 0.1  # router_z_loss_coef when on: z ~ 2 here, so the term is ~0.2, far above fp32 noise
STAGES = {
    "sft": (
        ["+recipe=tiny/sft", *SMALL_MODEL, "trainer.per_device_train_batch_size=8"],
        prepare_sft_data, sft.sft_arguments, sft.MixtralSFTTrainer, None,
    ),
    "dpo": (
        ["+recipe=tiny/dpo", *SMALL_MODEL, "trainer.per_device_train_batch_size=4"],
        prepare_dpo_data, dpo.dpo_arguments, dpo.MixtralDPOTrainer, build_frozen_reference,
    ),
}  # fmt: skip
HALF_BATCH_TWICE = {
    "sft": ["trainer.per_device_train_batch_size=4", "trainer.gradient_accumulation_steps=2"],
    "dpo": ["trainer.per_device_train_batch_size=2", "trainer.gradient_accumulation_steps=2"],
}


def build(stage: str, output_dir, *overrides):
    argv, prepare, arguments, trainer_class, reference = STAGES[stage]
    argv = [*argv, f"output_dir={output_dir}", *overrides]
    trainer, _, _ = pipeline.build_trainer(stage, argv, prepare, arguments, trainer_class, reference)
    trainer.model.train()
    return trainer


def first_batch(trainer) -> dict:
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def router_weight(model) -> torch.Tensor:
    return next(
        p for name, p in model.named_parameters() if name.endswith("layers.0.block_sparse_moe.gate.weight")
    )


def per_step(history, key):
    return [entry.get(key) for entry in history if "loss" in entry]


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_z_loss_trains_and_is_logged_as_trained(stage, tmp_path):
    main = {"sft": sft.main, "dpo": dpo.main}[stage]
    argv, *_ = STAGES[stage]
    runs = {}
    for coef in (0.0, Z):
        out = tmp_path / f"z{coef}"
        # Two micro-batches per step: the router terms must enter as their mean, like the LM loss.
        main(
            [
                *argv,
                *HALF_BATCH_TWICE[stage],
                f"output_dir={out}",
                "max_steps=3",
                f"model.router_z_loss_coef={coef}",
            ]
        )
        runs[coef] = (log_history(out / "final"), MixtralForCausalLM.from_pretrained(out / "final"))
    (plain, plain_model), (with_z, z_model) = runs[0.0], runs[Z]
    assert per_step(plain, "z_loss") == [None] * 3
    z_logged = per_step(with_z, "z_loss")
    assert all(z > 0 for z in z_logged) and all(a > 0 for a in per_step(with_z, "aux_loss"))
    # Step 1: same weights, same batches, so the losses differ by exactly the logged z term.
    assert per_step(with_z, "aux_loss")[0] == pytest.approx(per_step(plain, "aux_loss")[0], rel=1e-6)
    assert per_step(with_z, "loss")[0] - per_step(plain, "loss")[0] == pytest.approx(
        Z * z_logged[0], rel=1e-4
    )
    # The z-loss gradient moved the routers: the runs end with different router weights.
    difference = (router_weight(z_model) - router_weight(plain_model)).abs().max().item()
    assert difference > 1e-4, difference


@pytest.mark.parametrize("checkpointing", [False, True])
def test_sft_objective_equals_the_models_forward_loss_and_its_gradient(checkpointing, tmp_path):
    trainer = build("sft", tmp_path, f"model.router_z_loss_coef={Z}")
    model, policy, batch = trainer.model, trainer.policy, first_batch(trainer)
    if checkpointing:  # as the 8x7B recipes train: router logits come out of checkpointed layers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    gate = router_weight(policy)

    def trainer_loss_and_router_grad():
        policy.zero_grad()
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        return loss.detach(), gate.grad.clone()

    loss, grad = trainer_loss_and_router_grad()
    metrics = trainer._metrics["train"]
    policy.zero_grad()
    out = policy(**batch, output_router_logits=True)
    out.loss.backward()
    torch.testing.assert_close(loss, out.loss.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, gate.grad, rtol=1e-5, atol=1e-8)
    assert metrics["aux_loss"][-1] == pytest.approx(out.aux_loss.item(), rel=1e-6)
    assert metrics["z_loss"][-1] == pytest.approx(out.z_loss.item(), rel=1e-6)

    # The z-loss reaches the router: d(objective)/d(router) with z on = with z off + Z * d(z)/d(router).
    policy.zero_grad()
    policy(**batch, output_router_logits=True).z_loss.backward()
    z_grad = gate.grad.clone()
    policy.config.router_z_loss_coef = 0.0
    loss_without_z, grad_without_z = trainer_loss_and_router_grad()
    assert z_grad.abs().max() > 0
    torch.testing.assert_close(grad - grad_without_z, Z * z_grad, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(loss - loss_without_z, Z * out.z_loss.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_dpo_adds_the_policys_router_terms_and_the_reference_none(peft, tmp_path):
    trainer = build("dpo", tmp_path, f"model.router_z_loss_coef={Z}", f"peft={peft}")
    model, policy, batch = trainer.model, trainer.policy, first_batch(trainer)
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy away from the reference, so their router terms differ
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    loss = trainer.compute_loss(model, dict(batch))
    metrics = trainer._metrics["train"]
    aux_logged, z_logged = metrics["aux_loss"][-1], metrics["z_loss"][-1]
    without_router_terms = super(RouterObjectiveMixin, trainer).compute_loss(model, dict(batch))
    forward = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        ours = model(**forward, output_router_logits=True)
        if peft == "lora":
            with model.disable_adapter():
                reference = model(**forward, output_router_logits=True)
        else:
            reference = trainer.ref_model(**forward, output_router_logits=True)
    expected = policy.config.router_aux_loss_coef * ours.aux_loss + Z * ours.z_loss
    torch.testing.assert_close((loss - without_router_terms).detach(), expected, rtol=1e-5, atol=1e-6)
    assert abs(reference.z_loss.item() - ours.z_loss.item()) > 1e-3, "policy and reference route alike"
    assert aux_logged == pytest.approx(ours.aux_loss.item(), rel=1e-6)
    assert z_logged == pytest.approx(ours.z_loss.item(), rel=1e-6)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_trl_router_aux_loss_coef_is_refused_as_a_second_road(stage, tmp_path):
    argv, prepare, arguments, trainer_class, reference = STAGES[stage]

    def with_trl_coef(cfg):
        args = arguments(cfg)
        args.router_aux_loss_coef = 0.5
        return args

    with pytest.raises(ValueError, match="second road"):
        pipeline.build_trainer(
            stage, [*argv, f"output_dir={tmp_path}"], prepare, with_trl_coef, trainer_class, reference
        )


def test_a_trl_without_the_internals_we_take_over_fails_loudly():
    class TrainerWithoutRouterSwitch:  # what RouterObjectiveMixin finds if TRL renames aux_loss_enabled
        def __init__(self, *args, **kwargs):
            self.args = SimpleNamespace(router_aux_loss_coef=None)
            self._metrics = {"train": {}, "eval": {}}

    class Ours(RouterObjectiveMixin, TrainerWithoutRouterSwitch):
        pass

    with pytest.raises(RuntimeError, match=rf"trl {trl.__version__}: .*trl>=1\.16,<1\.17"):
        Ours(args=None)


def test_a_peft_without_the_function_we_wrap_fails_loudly(monkeypatch):
    from peft.utils import transformers_weight_conversion

    monkeypatch.delattr(transformers_weight_conversion, "convert_peft_config_for_transformers")
    with pytest.raises(ImportError, match=rf"peft {peft.__version__} .*peft>=0\.21\.2,<0\.22"):
        skip_peft_target_rewrite_for_native_mixtral()
