"""The seams in mixtral_compat/: the version ranges (held equal to pyproject.toml's, refused at start-up
in one line) and, per library, the shape of every internal they use, so a release that renames or
re-signs one fails here, naming it, rather than in a training run."""

import inspect
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import tomllib
import torch
from mixtral_reference import tiny_config
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from torch import nn

import mixtral_compat
from mixtral_compat import bitsandbytes as compat_bnb
from mixtral_compat import deepspeed as compat_ds
from mixtral_compat import peft as compat_peft
from mixtral_compat import torch as compat_torch
from mixtral_compat import transformers as compat_tf
from mixtral_compat import trl as compat_trl

ROOT = Path(__file__).resolve().parents[1]


def pyproject_requirements() -> dict[str, Requirement]:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {req.name: req for req in map(Requirement, dependencies)}


# ---------------------------------------------------------------- versions


def test_every_seam_range_is_pyprojects_range_and_bounded_above():
    requirements = pyproject_requirements()
    ranges = mixtral_compat.checked_ranges()
    assert sorted(ranges) == sorted(["torch", "transformers", "peft", "trl", "deepspeed", "bitsandbytes"])
    for package, checked in ranges.items():
        assert requirements[package].specifier == SpecifierSet(checked), package
        assert any(spec.operator == "<" for spec in SpecifierSet(checked)), f"{package} has no upper bound"


def test_constraints_pin_every_seam_library_inside_its_range():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            req = Requirement(line)
            pins[req.name.lower()] = next(iter(req.specifier)).version
    for package, checked in mixtral_compat.checked_ranges().items():
        assert pins[package] in SpecifierSet(checked), (package, pins[package], checked)


def test_the_installed_libraries_are_the_checked_ones():
    mixtral_compat.check_versions()


def test_a_library_outside_its_range_stops_start_up_with_one_line(monkeypatch, capsys):
    real = mixtral_compat.installed_version
    monkeypatch.setattr(
        mixtral_compat, "installed_version", lambda p: "5.26.0" if p == "transformers" else real(p)
    )
    monkeypatch.delenv(mixtral_compat.ALLOW_UNCHECKED, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        mixtral_compat.exit_on_unchecked_versions()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "error: transformers 5.26.0 is installed; mixtral-tune was checked on transformers>=5.24,<5.26: "
        "install a version in that range (./launch.sh sets up the tested ones from constraints.txt) "
        f"(or set {mixtral_compat.ALLOW_UNCHECKED}=1 to try it)\n"
    )

    monkeypatch.setenv(mixtral_compat.ALLOW_UNCHECKED, "1")
    mixtral_compat.exit_on_unchecked_versions()  # goes on, saying so
    assert capsys.readouterr().err.startswith("warning: transformers 5.26.0 is installed;")


@pytest.mark.parametrize(
    "installed, refused",
    [("2.13.0+cpu", False), ("2.11.0+cu130", False), ("2.14.0", True), ("2.10.2", True), (None, True)],
)
def test_local_builds_count_as_their_release(installed, refused):
    assert (mixtral_compat.version_problem("torch", compat_torch.CHECKED, installed) is not None) == refused


def test_a_command_refuses_a_newer_library_before_importing_it(tmp_path):
    """A trl 1.17.0 (its metadata only, first on the path): `mixtral-tune sft --help` answers with
    the one line and exit status 2, through the package's start-up check."""
    dist_info = tmp_path / "trl-1.17.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: trl\nVersion: 1.17.0\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    env.pop(mixtral_compat.ALLOW_UNCHECKED, None)
    result = subprocess.run(
        [sys.executable, "-m", "mixtral_tune", "sft", "--help"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: trl 1.17.0 is installed; mixtral-tune was checked on trl>=1.16,<1.17: install a version in "
        "that range (./launch.sh sets up the tested ones from constraints.txt) "
        f"(or set {mixtral_compat.ALLOW_UNCHECKED}=1 to try it)"
    ]


# ---------------------------------------------------------------- torch


def test_torch_hook_tables_are_what_has_hooks_reads():
    layer = nn.Linear(2, 2)
    assert not compat_torch.has_hooks(layer)
    for register in (
        layer.register_forward_hook,
        layer.register_forward_pre_hook,
        layer.register_full_backward_hook,
        layer.register_full_backward_pre_hook,
    ):
        handle = register(lambda *a: None)
        assert compat_torch.has_hooks(layer)
        handle.remove()
        assert not compat_torch.has_hooks(layer)
    handle = layer.register_full_backward_hook(lambda *a: None)
    assert not compat_torch.has_hooks(layer, backward=False)
    handle.remove()

    for register in (
        nn.modules.module.register_module_forward_hook,
        nn.modules.module.register_module_forward_pre_hook,
    ):
        assert not compat_torch.has_global_forward_hooks()
        handle = register(lambda *a: None)
        assert compat_torch.has_global_forward_hooks()
        handle.remove()
    assert not compat_torch.has_global_forward_hooks()


def test_torch_native_bf16_probe():
    assert isinstance(compat_torch.cpu_has_native_bf16(), bool)
    assert callable(torch.cpu._is_avx512_bf16_supported)


# ---------------------------------------------------------------- bitsandbytes


def linear4bit():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=None, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4")
    return layer.to("cpu")


def test_bitsandbytes_compute_dtype_is_what_its_forward_sets():
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    ours, theirs = linear4bit(), linear4bit()
    assert compat_bnb.compute_dtype(ours, x) == torch.bfloat16
    theirs(x)  # Linear4bit.forward picks its compute dtype from its first input
    assert (theirs.compute_type_is_set, theirs.compute_dtype) == (
        ours.compute_type_is_set,
        ours.compute_dtype,
    )


def test_bitsandbytes_quant_state_and_cpu_repacking_switch():
    import bitsandbytes as bnb
    import bitsandbytes.nn.modules as bnb_modules

    layer = linear4bit()
    assert isinstance(compat_bnb.quant_state(layer), bnb.functional.QuantState)
    assert compat_bnb.readable_quant_state(layer)
    assert "packing_format_for_cpu" in inspect.getsource(bnb_modules.Linear4bit.forward)
    assert hasattr(layer, "support_avx512bf16_for_cpu")
    compat_bnb.keep_4bit_training_layout(nn.Sequential(layer))
    assert layer.support_avx512bf16_for_cpu is False


# ---------------------------------------------------------------- PEFT


def lora_model(dropout: float = 0.0):
    import peft

    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("w1", nn.Linear(8, 6, bias=False))
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=dropout, target_modules=["w1"])
    )
    nn.init.normal_(model.base_model.model.w1.lora_B["default"].weight)
    return model, model.base_model.model.w1


def test_peft_lora_parts_compute_peft_lora_forward():
    _, layer = lora_model()
    assert compat_peft.lora_layer_kind(layer) == "plain"
    assert compat_peft.lora_layer_kind(layer.base_layer) is None
    parts = compat_peft.vanilla_lora_parts(layer)
    x = torch.randn(4, 8)
    ours = parts.base(x) + (parts.dropout(x) @ parts.A.t()) @ parts.B.t() * parts.scaling
    torch.testing.assert_close(ours, layer(x))
    assert parts.scaling == 2.0 and parts.cast_input is True


def test_peft_lora_parts_refuse_what_peft_computes_differently():
    model, layer = lora_model()
    with model.disable_adapter():
        assert compat_peft.vanilla_lora_parts(layer) is None
    layer.merge()
    assert compat_peft.vanilla_lora_parts(layer) is None
    layer.unmerge()
    assert compat_peft.vanilla_lora_parts(layer) is not None
    handle = layer.lora_A["default"].register_forward_hook(lambda *a: None)
    assert compat_peft.vanilla_lora_parts(layer) is None
    handle.remove()


def test_peft_target_rewrite_is_wrapped_where_peft_calls_it():
    from peft.tuners import tuners_utils
    from peft.utils import transformers_weight_conversion as conversion

    import mixtral_model  # noqa: F401  (installs the wrap)

    assert conversion.convert_peft_config_for_transformers._skips_native_mixtral
    assert "convert_peft_config_for_transformers" in inspect.getsource(tuners_utils.BaseTuner.inject_adapter)
    assert not hasattr(tuners_utils, "convert_peft_config_for_transformers")


# ---------------------------------------------------------------- transformers


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_transformers_model_internals_have_the_signatures_we_override():
    from transformers import PreTrainedConfig, PreTrainedModel

    assert isinstance(inspect.getattr_static(PreTrainedModel, "_load_pretrained_model"), staticmethod)
    assert parameters(PreTrainedModel._load_pretrained_model) == [
        "model", "state_dict", "checkpoint_files", "load_config", "expected_keys"
    ]  # fmt: skip
    assert parameters(PreTrainedModel._check_and_adjust_attn_implementation)[:3] == [
        "self", "attn_implementation", "is_init_check"
    ]  # fmt: skip
    assert "_attn_implementation" in dir(PreTrainedConfig)
    assert parameters(PreTrainedModel._init_weights) == ["self", "module"]


def test_transformers_init_module_weights_applies_the_model_s_rule():
    from mixtral_model import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)  # fmt: skip
    model = MixtralForCausalLM(config)
    norm = model.model.norm
    with torch.no_grad():
        norm.weight.fill_(3.0)
    compat_tf.init_module_weights(model, norm)
    assert torch.equal(norm.weight, torch.ones_like(norm.weight))


@pytest.mark.parametrize("backend", ["eager", "grouped_mm"])
def test_transformers_experts_implementation_is_what_its_mixtral_runs(backend):
    """transformers' own Mixtral: the experts backend asked for at build time is what the seam reads."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           experts_implementation=backend)  # fmt: skip
    model = MixtralForCausalLM(config)
    assert compat_tf.experts_implementation(model.config) == backend


def test_transformers_loading_calls_our_hooks_with_the_attention_we_asked_for(tmp_path, monkeypatch):
    from mixtral_model import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=32, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1,
    )  # fmt: skip
    MixtralForCausalLM(config).save_pretrained(tmp_path)
    called = []
    monkeypatch.setattr(
        MixtralForCausalLM,
        "before_weights_are_read",
        lambda self: called.append(self.model.embed_tokens.weight.is_meta),
    )
    model = MixtralForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert called == [True]  # once, before any weight was read
    assert compat_tf.attn_implementation(model.config) == "eager"
    with pytest.raises(ValueError, match="attn_implementation='flex_attention' is not supported"):
        MixtralForCausalLM.from_pretrained(tmp_path, attn_implementation="flex_attention")


def test_transformers_trainer_internals_have_the_signatures_we_call():
    from transformers import Trainer
    from transformers.trainer_utils import rotate_checkpoints

    assert parameters(Trainer._save_checkpoint) == ["self", "model", "trial"]
    assert "save_total_limit=self.args.save_total_limit" in inspect.getsource(Trainer._save_checkpoint)
    assert parameters(Trainer._prepare_for_training) == [
        "self", "max_steps", "train_dataloader", "resume_from_checkpoint"
    ]  # fmt: skip
    assert "return model, train_dataloader" in inspect.getsource(Trainer._prepare_for_training)
    assert parameters(Trainer._load_optimizer_and_scheduler) == ["self", "checkpoint"]
    assert parameters(Trainer._load_scaler) == ["self", "checkpoint"]
    assert parameters(rotate_checkpoints)[:4] == [
        "output_dir", "save_total_limit", "best_model_checkpoint", "use_mtime"
    ]  # fmt: skip
    # public, documented: the objective's accumulation rule reads it
    assert "loss_is_scaled_for_ga" in Trainer.__doc__ and Trainer.loss_is_scaled_for_ga is None


def test_trainer_hooks_hold_rotation_back_and_hand_resume_over():
    """What the hooks do around the Trainer's own methods (stand-ins recording what they were given)."""
    seen = []

    class Trainer:
        args = SimpleNamespace(save_total_limit=2)

        def _save_checkpoint(self, model, trial):
            seen.append(("trainer saves, rotating to", self.args.save_total_limit))

        def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
            seen.append(("trainer prepares, loading", resume_from_checkpoint))
            return "wrapped", train_dataloader

    class Ours(compat_tf.TrainerCheckpointHooks, Trainer):
        def checkpoint_saved(self, save_total_limit):
            seen.append(("saved", save_total_limit, self.args.save_total_limit))

        def resuming(self, max_steps):
            seen.append(("resuming", max_steps))

        def restores_checkpoint_itself(self, checkpoint):
            return checkpoint == "ours"

        def restore_checkpoint(self, checkpoint):
            seen.append(("we restore", checkpoint))

    trainer = Ours()
    trainer._save_checkpoint(None, None)
    assert seen == [("trainer saves, rotating to", None), ("saved", 2, 2)]
    seen.clear()
    assert trainer._prepare_for_training(3, "loader", "theirs") == ("wrapped", "loader")
    assert trainer._prepare_for_training(3, "loader", "ours") == ("wrapped", "loader")
    assert trainer._prepare_for_training(3, "loader", None) == ("wrapped", "loader")
    assert seen == [
        ("resuming", 3),
        ("trainer prepares, loading", "theirs"),
        ("resuming", 3),
        ("trainer prepares, loading", None),
        ("we restore", "ours"),
        ("trainer prepares, loading", None),
    ]


# ---------------------------------------------------------------- TRL


@pytest.mark.parametrize("trainer", ["SFTTrainer", "DPOTrainer"])
def test_trl_trainers_keep_the_router_switch_and_metric_lists(trainer):
    import trl

    source = inspect.getsource(getattr(trl, trainer))
    assert "self.aux_loss_enabled = " in source
    assert "if self.aux_loss_enabled" in source
    assert "self._metrics[mode][" in source
    assert "for key, val in self._metrics[mode].items()" in source  # averaged into each log


def test_trl_seam_refuses_a_trainer_without_them():
    class Renamed:
        _metrics = {"train": {}, "eval": {}}

    with pytest.raises(RuntimeError, match=r"Renamed has no aux_loss_enabled.*mixtral_compat/trl\.py"):
        compat_trl.take_over_router_term(Renamed())


# ---------------------------------------------------------------- DeepSpeed


def test_deepspeed_expert_group_tables_are_where_we_write_them():
    from deepspeed.utils import groups

    assert isinstance(groups._get_expert_parallel_group_dict(), dict)
    assert isinstance(groups._get_expert_data_parallel_group_dict(), dict)
    assert isinstance(groups._EXPERT_PARALLEL_GROUP_RANKS, dict)
    assert isinstance(groups._EXPERT_DATA_PARALLEL_GROUP_RANKS, dict)
    assert parameters(groups._get_expert_parallel_group) == ["group_name"]
    assert parameters(groups._get_expert_data_parallel_group) == ["group_name"]
    assert compat_ds.expert_groups("ep_size_never_registered") is None


def test_deepspeed_moe_layer_is_what_the_marker_stands_in_for():
    import deepspeed.runtime.engine as engine
    from deepspeed.moe.layer import MoE

    assert parameters(MoE.set_deepspeed_parallelism) == ["self", "use_data_before_expert_parallel_"]
    marker = compat_ds.moe_marker(2, "ep_size_2", 8, check_groups=lambda: None)
    assert isinstance(marker, MoE) and not list(marker.parameters())
    source = inspect.getsource(engine)
    for attribute in ("ep_size", "expert_group_name", "num_local_experts", "set_deepspeed_parallelism"):
        assert attribute in source, attribute
        assert hasattr(marker, attribute)


def test_deepspeed_autoep_and_master_weight_internals():
    import deepspeed.runtime.zero.partition_parameters as partition
    import deepspeed.runtime.zero.stage3 as stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    stage3_source = inspect.getsource(stage3)
    assert f'"{compat_ds.ZERO3_EXPERT_PLACEMENT}"' in stage3_source
    assert "ds_zero_placement_family" in stage3_source and "ds_zero_partition_group_name" in stage3_source
    assert "ds_zero_partition_process_group" in inspect.getsource(partition)
    assert parameters(DeepSpeedZeroOptimizer.update_lp_params) == ["self"]
    assert "ds_status" in inspect.getsource(partition) and "ds_id" in inspect.getsource(partition)
    assert compat_ds.zero3_data_present(torch.zeros(2)) and not compat_ds.is_zero3_partitioned(torch.zeros(2))


def test_the_ranges_read_without_importing_are_the_modules_own():
    modules = (compat_torch, compat_tf, compat_peft, compat_trl, compat_ds, compat_bnb)
    assert mixtral_compat.checked_ranges() == {module.PACKAGE: module.CHECKED for module in modules}


def test_the_start_up_check_imports_no_library():
    """So a release that breaks at import is refused by the one line, not a traceback."""
    code = "import sys, mixtral_tune; print(sorted({'torch', 'transformers', 'peft', 'trl', 'deepspeed', 'bitsandbytes'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout == "[]\n"


def test_trl_fused_lm_head_replaces_the_models_logits_with_the_same_loss():
    """The seam bench/gpu_check uses: TRL's fused head still patches a model in place, and its loss is the
    model's own cross-entropy on the same batch."""
    from mixtral_model import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**tiny_config())).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    expected = model(input_ids=ids, labels=ids).loss
    compat_trl.add_fused_lm_head(model)
    assert model(input_ids=ids, labels=ids).loss == expected  # without the flag: the model's own forward
    fused = model(input_ids=ids, labels=ids, fused_lm_head=True)
    assert type(fused).__name__ == "FusedCausalLMOutput" and fused.log_probs.shape == (2, 11)
    torch.testing.assert_close(fused.loss, expected, rtol=1e-5, atol=1e-6)
