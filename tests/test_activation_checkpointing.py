"""Activation checkpointing through the pipelines, with transformers' `every_n_layers`
(`trainer.activation_checkpointing_kwargs`): the layers it names run their forward again in backward,
the others keep their activations, and the training is the same either way. LoRA and QLoRA: the factory
turns checkpointing on for every layer when it prepares a 4-bit model; the trainer's setting must win."""

import pytest
import torch
from pipeline_runs import SMALL_MODEL

from mixtral_tune import pipeline, sft
from mixtral_tune.data import prepare_sft_data

LAYERS = 4
SETTINGS = {  # name: overrides
    "off": ["trainer.activation_checkpointing=false"],
    "every layer": ["trainer.activation_checkpointing=true"],
    "every 2nd layer": [
        "trainer.activation_checkpointing=true",
        "+trainer.activation_checkpointing_kwargs={every_n_layers: 2}",
    ],
}


def train(tmp_path, peft_method: str, setting: str):
    argv = [
        "+recipe=tiny/sft",
        *SMALL_MODEL,
        f"model.architecture.num_hidden_layers={LAYERS}",
        f"peft={peft_method}",
        "trainer.per_device_train_batch_size=4",
        "trainer.learning_rate=1e-3",
        "max_steps=2",
        f"output_dir={tmp_path / setting.replace(' ', '_')}",
        *SETTINGS[setting],
    ]
    trainer, _, _ = pipeline.build_trainer(
        "sft", argv, prepare_sft_data, sft.sft_arguments, sft.MixtralSFTTrainer
    )
    layers = trainer.model.get_base_model().model.layers
    forwards = [0] * LAYERS
    for i, layer in enumerate(layers):  # a module inside the layer: the recomputation calls it again
        layer.input_layernorm.register_forward_pre_hook(
            lambda *_, i=i: forwards.__setitem__(i, forwards[i] + 1)
        )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    trained = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    checkpointed = [bool(layer.gradient_checkpointing) for layer in layers]
    return losses, trained, checkpointed, forwards, trainer.args.activation_checkpointing_kwargs


@pytest.mark.parametrize("peft_method", ["lora", "qlora"])
def test_every_n_layers_recomputes_those_layers_and_trains_the_same(tmp_path, peft_method):
    runs = {setting: train(tmp_path, peft_method, setting) for setting in SETTINGS}
    steps = 2
    # forward calls per layer over the run: 1 per step, 2 where the layer is recomputed in backward
    assert runs["off"][2:4] == ([False] * LAYERS, [steps] * LAYERS)
    assert runs["every layer"][2:4] == ([True] * LAYERS, [2 * steps] * LAYERS)
    assert runs["every 2nd layer"][2:4] == ([True, False, True, False], [2 * steps, steps, 2 * steps, steps])
    # the user's key joins the pipelines' non-reentrant default instead of replacing it
    assert runs["every 2nd layer"][4] == {"use_reentrant": False, "every_n_layers": 2}
    losses, trained, *_ = runs["off"]
    assert len(losses) == steps and trained
    for setting in ("every layer", "every 2nd layer"):
        other_losses, other_trained, *_ = runs[setting]
        assert other_losses == losses, setting
        for name, value in trained.items():
            assert torch.equal(other_trained[name], value), (setting, name)
