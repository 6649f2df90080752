"""Router health (mixtral_tune/training/router_health.py): the alert fires on a run whose routers were
made to collapse (warn and stop) and stays quiet on the small tiny run at default settings; routing
drift is exactly zero for an untrained model (PEFT and full fine-tuning) and, when one layer's router
rows are swapped, equals the count and KL computed here from transformers' Mixtral's router logits."""

import pytest
import torch
import transformers
from pipeline_runs import SFT, log_history, run_pipeline

from mixtral_model import MixtralForCausalLM, load_tokenizer
from mixtral_tune import pipeline, sft
from mixtral_tune.config import ConfigError, load_config
from mixtral_tune.data import prepare_sft_data
from mixtral_tune.training.model_factory import write_random_init
from mixtral_tune.training.router_health import RouterWatch

EVAL = ["data.eval_path=${data_dir:}/sft_eval.jsonl", "trainer.per_device_eval_batch_size=16"]


def collapsed_base(out) -> None:
    """OUTPUT_DIR/base (which the pipeline trains from) with every router sending every token to
    experts 0 and 1: hidden dimension 0 is +1 in every embedding, so it dominates the normalized input
    of every router, whose weight reads only that dimension (expert 0: 10, expert 1: 5, others 0)."""
    cfg = load_config("sft", [*SFT, f"output_dir={out}"])
    write_random_init(cfg, load_tokenizer(cfg.model.tokenizer), out / "base", cfg.trainer.seed)
    model = MixtralForCausalLM.from_pretrained(out / "base")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            gate = layer.block_sparse_moe.gate.weight
            gate.zero_()
            gate[0, 0], gate[1, 0] = 10.0, 5.0
    model.save_pretrained(out / "base")


def test_alert_warns_and_stops_a_collapsed_run(tmp_path):
    out = tmp_path / "stop"
    collapsed_base(out)
    result = run_pipeline(
        "sft",
        [*SFT, f"output_dir={out}", "max_steps=6", "router.alert=stop", "router.patience=2"],
        check=False,
    )
    assert result.returncode == 3, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error == [
        "error: router alert at step 2: layer 0 expert 2: load 0.00x balanced < router.min_load=0.25 "
        "for 2 logged steps; router.alert=stop ended training (no final model)"
    ], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not (out / "final").exists()
    alerts = [line.strip() for line in result.stdout.splitlines() if "router alert" in line]
    assert (
        "router alert at step 2: layer 1 expert 3: load 0.00x balanced < router.min_load=0.25 for 2 logged steps"
        in alerts
    )
    assert any("layer 0: router entropy" in line for line in alerts), alerts


def test_alert_stays_quiet_at_defaults_and_drift_reaches_log_and_card(tmp_path):
    out = tmp_path / "quiet"
    result = run_pipeline("sft", [*SFT, *EVAL, f"output_dir={out}", "max_steps=4", "trainer.eval_steps=2"])
    assert "router alert" not in result.stdout + result.stderr
    history = log_history(out / "final")
    assert [entry["router/alerts"] for entry in history if "loss" in entry] == [0, 0, 0, 0]
    defaults = load_config("sft", [*SFT, f"output_dir={out}"]).router
    watch = RouterWatch(defaults.min_load, defaults.max_load, defaults.min_entropy, defaults.patience)
    assert all(watch.conditions(entry) == {} for entry in history if "loss" in entry)  # not even one step
    drift = [entry for entry in history if "eval_loss" in entry]
    assert len(drift) == 2 and all(0 < entry["eval_router_drift/kl"] for entry in drift)
    card = (out / "final" / "README.md").read_text()
    changed = drift[-1]["eval_router_drift/layer_1/top_k_changed"]
    assert f"| 1 | {changed:.1%} |" in card


def drift_trainer(out, *overrides):
    argv = [*SFT, *EVAL, f"output_dir={out}", *overrides]
    trainer, _, _ = pipeline.build_trainer(
        "sft", argv, prepare_sft_data, sft.sft_arguments, sft.MixtralSFTTrainer
    )
    return trainer


def test_drift_is_zero_for_an_untrained_model(tmp_path):
    lora = drift_trainer(tmp_path / "lora", "peft=lora")
    full = drift_trainer(tmp_path / "full")
    full.routing_drift.record_base()
    drift = full.routing_drift.measure()
    assert len(drift) == 2 * 2 + 2
    assert all(value == 0.0 for value in drift.values()), drift
    # Under PEFT the base is the adapter-disabled forward, which takes the experts' plain path instead
    # of the fused LoRA one (mixtral_model/grouped_experts.py): no token moves, the KL is rounding only.
    drift = lora.routing_drift.measure()
    assert all(value == 0.0 for key, value in drift.items() if key.endswith("top_k_changed")), drift
    assert all(abs(value) < 1e-7 for key, value in drift.items() if key.endswith("kl")), drift


def test_drift_counts_the_tokens_a_swapped_router_moves(tmp_path):
    """Swapping router rows 0 and 2 of the last layer moves a token's top-2 set exactly when it holds one
    of experts 0 and 2; layer 0 stays put. Expected values from transformers' Mixtral on the base."""
    out = tmp_path / "full"
    trainer = drift_trainer(out)
    trainer.routing_drift.record_base()
    with torch.no_grad():
        gate = trainer.model.model.layers[1].block_sparse_moe.gate.weight
        gate[[0, 2]] = gate[[2, 0]].clone()
    drift = trainer.routing_drift.measure()

    reference = transformers.MixtralForCausalLM.from_pretrained(out / "base", attn_implementation="sdpa")
    moved = kl = tokens = 0.0
    for batch in trainer.get_eval_dataloader():
        mask = batch["attention_mask"]
        with torch.no_grad():
            logits = reference(
                input_ids=batch["input_ids"], attention_mask=mask, output_router_logits=True
            ).router_logits[1]
        real = mask.reshape(-1).bool()
        top2 = logits[real].topk(2, dim=-1).indices
        holds = (top2 == 0).any(-1) ^ (top2 == 2).any(-1)
        probs = logits[real].float().softmax(-1)
        moved += holds.sum().item()
        kl += ((probs[:, 0] - probs[:, 2]) * (probs[:, 0].log() - probs[:, 2].log())).sum().item()
        tokens += real.sum().item()
    assert drift["eval_router_drift/layer_0/top_k_changed"] == 0.0
    assert drift["eval_router_drift/layer_0/kl"] == 0.0
    assert 0 < moved < tokens
    share = torch.tensor(moved) / torch.tensor(tokens)  # fp32, as the sums are kept
    assert drift["eval_router_drift/layer_1/top_k_changed"] == share.item()
    torch.testing.assert_close(drift["eval_router_drift/layer_1/kl"], kl / tokens, rtol=1e-4, atol=0)


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.router_balance=global", "model.router_balance"),
        ("router.alert=loud", "router.alert"),
        ("router.min_load=1.5", "router.min_load"),
        ("router.max_load=0.5", "router.max_load"),
        ("router.min_entropy=1", "router.min_entropy"),
        ("router.patience=0", "router.patience"),
    ],
)
def test_router_settings_are_checked_before_anything_is_built(override, key):
    with pytest.raises(ConfigError) as error:
        load_config("sft", ["+recipe=tiny/sft", override])
    message = str(error.value)
    assert message.startswith(f"{key}=") and "\n" not in message
