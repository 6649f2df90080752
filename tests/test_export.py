"""Low-memory export: an adapter merged shard by shard equals the unmerged PEFT model (ours and
transformers'), keeps the base's shards and dtype, and holds about one shard in memory, not the model."""

import json
import subprocess
import sys

import peft
import pytest
import torch
import transformers
from pipeline_runs import REPO, run_env

from mixtral_model import MixtralConfig, MixtralForCausalLM
from mixtral_tune.export import main as export_main
from mixtral_tune.export import merge_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]


def tiny_config(**overrides) -> MixtralConfig:
    shape = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)  # fmt: skip
    return MixtralConfig(**{**shape, **overrides, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})


def write_base_and_adapter(
    root, config, dtype=torch.float32, shard_size="100KB", train_router=True, patterns=True
):
    """A sharded base checkpoint and a trained-looking LoRA adapter (B != 0, per-module ranks) on it."""
    torch.manual_seed(0)
    base = root / "base"
    MixtralForCausalLM(config).to(dtype).save_pretrained(base, max_shard_size=shard_size)
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, rank_pattern={"w2": 2} if patterns else {},
        alpha_pattern={"q_proj": 16} if patterns else {},
        modules_to_save=["gate"] if train_router else None, task_type="CAUSAL_LM",
    )  # fmt: skip
    model = peft.get_peft_model(MixtralForCausalLM.from_pretrained(base, dtype=torch.float32), lora)
    for name, param in model.named_parameters():
        if "lora_B" in name or "modules_to_save" in name:
            torch.nn.init.normal_(param, std=0.5)
    model.save_pretrained(root / "adapter")
    return base, root / "adapter"


def logits(model, vocab=1000):
    ids = torch.randint(3, vocab, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_merged_export_equals_the_unmerged_adapter_on_ours_and_transformers(tmp_path):
    base, adapter = write_base_and_adapter(tmp_path, tiny_config())
    assert len(json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    merge_adapter(adapter, tmp_path / "merged")
    merged_files = sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors"))
    assert merged_files == sorted(p.name for p in base.glob("*.safetensors")) and len(merged_files) > 2
    unmerged = peft.PeftModel.from_pretrained(MixtralForCausalLM.from_pretrained(base), adapter)
    expected = logits(unmerged)
    assert not torch.allclose(expected, logits(MixtralForCausalLM.from_pretrained(base)), atol=1e-3)
    torch.testing.assert_close(logits(MixtralForCausalLM.from_pretrained(tmp_path / "merged")), expected)
    torch.testing.assert_close(
        logits(transformers.MixtralForCausalLM.from_pretrained(tmp_path / "merged")), expected
    )


def test_transformers_peft_model_agrees_with_the_merge(tmp_path):
    # Through transformers' Mixtral, whose fused experts PEFT wraps with one rank and no router wrapper.
    base, adapter = write_base_and_adapter(tmp_path, tiny_config(), train_router=False, patterns=False)
    merge_adapter(adapter, tmp_path / "merged")
    reference = peft.PeftModel.from_pretrained(transformers.MixtralForCausalLM.from_pretrained(base), adapter)
    torch.testing.assert_close(
        logits(transformers.MixtralForCausalLM.from_pretrained(tmp_path / "merged")), logits(reference)
    )


def test_a_bfloat16_base_is_written_in_bfloat16(tmp_path):
    base, adapter = write_base_and_adapter(tmp_path, tiny_config(), dtype=torch.bfloat16)
    merge_adapter(adapter, tmp_path / "merged")
    merged = MixtralForCausalLM.from_pretrained(tmp_path / "merged")
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    unmerged = peft.PeftModel.from_pretrained(
        MixtralForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    )
    # one bf16 rounding of each merged weight apart
    torch.testing.assert_close(logits(merged.float()), logits(unmerged), rtol=0.05, atol=0.05)


PEAK_RSS = """
import gc, sys
from pathlib import Path
from safetensors.torch import load_file
from mixtral_tune.export import adapter_base, merge_adapter, read_adapter

def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))

def peak_growth(work):
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS:")
    kept = work()
    return status("VmHWM:") - before

adapter, out = Path(sys.argv[1]), Path(sys.argv[2])
read_adapter(adapter)  # imports warm
merge = peak_growth(lambda: merge_adapter(adapter, out))
shards = list(Path(adapter_base(adapter, None)).glob("*.safetensors"))
# the control: every shard's tensors held at once, as a whole-model merge holds them
whole = peak_growth(lambda: [tensor.clone() for shard in shards for tensor in load_file(shard).values()])
print(merge, whole)
"""


def test_export_holds_about_one_shard_not_the_model(tmp_path):
    config = tiny_config(vocab_size=4000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_local_experts=8)  # fmt: skip
    base, adapter = write_base_and_adapter(tmp_path, config, shard_size="8MB", train_router=False)
    model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    largest_shard = max(p.stat().st_size for p in base.glob("*.safetensors"))
    command = [sys.executable, "-c", PEAK_RSS, str(adapter), str(tmp_path / "merged")]
    result = subprocess.run(command, capture_output=True, text=True, env=run_env(), cwd=REPO, check=True)
    merge, whole = map(int, result.stdout.split()[-2:])
    print(f"model {model_bytes / 2**20:.1f} MiB, largest shard {largest_shard / 2**20:.1f} MiB; peak RSS growth: "
          f"merge {merge / 2**20:.1f} MiB, every shard held {whole / 2**20:.1f} MiB")  # fmt: skip
    assert model_bytes > 90 * 2**20
    assert whole > 0.8 * model_bytes  # the measure sees a whole model when one is held
    assert merge < 0.3 * model_bytes, (merge, model_bytes)
    merged_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged_config["num_local_experts"] == config.num_local_experts


def export_error(capsys, argv) -> str:
    capsys.readouterr()  # drop what building the models printed
    with pytest.raises(SystemExit) as exited:
        export_main([str(arg) for arg in argv])
    assert exited.value.code == 2
    message = capsys.readouterr().err
    assert len(message.splitlines()) == 1, message
    return message


def test_export_errors_are_one_line(tmp_path, capsys):
    _, adapter = write_base_and_adapter(tmp_path, tiny_config())
    other = tmp_path / "other"
    MixtralForCausalLM(tiny_config(num_hidden_layers=1)).save_pretrained(other)
    assert "layers.1" in export_error(capsys, [adapter, tmp_path / "m", "--base", other])
    assert "adapter_config.json" in export_error(capsys, [other, tmp_path / "m"])
    assert "not empty" in export_error(capsys, [adapter, other])
