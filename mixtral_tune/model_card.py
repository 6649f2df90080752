"""What `OUTPUT_DIR/final` carries besides the weights, for servers and hubs: `generation_config.json`
(the tokenizer's bos/eos/pad ids and chat sampling defaults) and a model card `README.md` (base
model, data, recipe and command line, final metrics, router health)."""

import math
import shlex
import sys
from pathlib import Path

import trl
from omegaconf import DictConfig, OmegaConf
from transformers import GenerationConfig, PreTrainedTokenizerBase

# Chat sampling defaults written to generation_config.json (servers such as vLLM read them);
# generate(do_sample=False) still decodes greedily.
SAMPLING_DEFAULTS = {"do_sample": True, "temperature": 0.7, "top_p": 0.9}
METRICS = (
    "train_loss",
    "loss",
    "aux_loss",
    "eval_loss",
    "eval_aux_loss",
    "rewards/accuracies",
    "rewards/margins",
)


def write_generation_config(final_dir: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SAMPLING_DEFAULTS,
    ).save_pretrained(final_dir)


def last_values(log_history: list[dict]) -> dict[str, float]:
    """The latest value of every logged number."""
    values: dict[str, float] = {}
    for entry in log_history:
        values.update(
            {k: v for k, v in entry.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        )
    return values


def router_health(values: dict[str, float]) -> list[str]:
    """Markdown table rows, one per layer: entropy, busiest expert load, per-expert shares, dropped."""
    layers = sorted(
        {int(k.split("/")[1].removeprefix("layer_")) for k in values if k.startswith("router/layer_")}
    )
    if not layers:
        return ["No router statistics were logged."]
    experts = sum(1 for k in values if k.startswith("router/layer_0/expert_"))
    rows = [
        f"Last logged training step; balanced routing is a load of 1.00x and an entropy of ln({experts}) = "
        f"{math.log(experts):.3f}.",
        "",
        "| layer | router entropy | busiest expert load | expert shares | dropped |",
        "|---|---|---|---|---|",
    ]
    for layer in layers:
        prefix = f"router/layer_{layer}"
        shares = [values[f"{prefix}/expert_{e}_fraction"] for e in range(experts)]
        dropped = values.get(f"{prefix}/dropped_fraction")
        rows.append(
            f"| {layer} | {values[f'{prefix}/entropy']:.3f} | {max(shares) * experts:.2f}x | "
            f"{' '.join(f'{s:.2f}' for s in shares)} | {'-' if dropped is None else f'{dropped:.1%}'} |"
        )
    return rows


def routing_drift(values: dict[str, float]) -> list[str]:
    """Markdown table rows, one per layer, of the last evaluation's routing drift from the base model."""
    layers = sorted(
        {
            int(k.split("/")[1].removeprefix("layer_"))
            for k in values
            if k.startswith("eval_router_drift/layer_")
        }
    )
    if not layers:
        return ["Routing drift was not measured (no evaluation, or router.drift=false)."]
    rows = [
        "Last evaluation, against the base model (PEFT: the adapter-disabled model; full fine-tuning: the "
        "routing at step 0): the share of evaluation tokens whose top-k experts changed, and the mean "
        "KL(base || tuned) of the router distributions in nats.",
        "",
        "| layer | tokens with changed top-k | mean router KL |",
        "|---|---|---|",
    ]
    for layer in layers:
        prefix = f"eval_router_drift/layer_{layer}"
        rows.append(f"| {layer} | {values[f'{prefix}/top_k_changed']:.1%} | {values[f'{prefix}/kl']:.4g} |")
    return rows


TRAINER_CLASSES = {
    "sft": "SFTTrainer",
    "dpo": "DPOTrainer",
    "kto": "KTOTrainer",
    "orpo": "ORPOTrainer (trl.experimental)",
    "cpo": "CPOTrainer (trl.experimental)",
}


def write_model_card(final_dir: Path, cfg: DictConfig, log_history: list[dict], is_adapter: bool) -> None:
    base = cfg.model.name_or_path or f"random init ({Path(cfg.output_dir) / 'base'})"
    values = last_values(log_history)
    trainer_class = TRAINER_CLASSES[cfg.stage]
    if cfg.stage == "cpo":
        trainer_class += f", loss_type={cfg.trainer.get('loss_type', 'sigmoid')}"
    data = cfg.data
    eval_data = data.eval_path or (
        f"{data.eval_fraction:.0%} held out of the training data" if data.eval_fraction else "none"
    )
    front_matter = {
        "base_model": cfg.model.name_or_path,
        "library_name": "peft" if is_adapter else "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["mixtral", "moe", cfg.stage, "trl", "mixtral-tune"] + (["lora"] if is_adapter else []),
    }
    front_matter = {k: v for k, v in front_matter.items() if v is not None}
    metrics = [f"| {k} | {values[k]:.4g} |" for k in METRICS if k in values]
    lines = [
        "---",
        OmegaConf.to_yaml(OmegaConf.create(front_matter)).strip(),
        "---",
        "",
        f"# {Path(cfg.output_dir).name}",
        "",
        f"{cfg.stage.upper()} of **{base}** with mixtral-tune (TRL {trl.__version__} {trainer_class}"
        f"{', LoRA adapter' if is_adapter else ', full weights'}; peft={cfg.peft.method}).",
        "",
        "## Data",
        "",
        f"- training: `{data.path}` (split `{data.split}`, max_length {data.max_length}, packing {data.packing})",
        f"- evaluation: {eval_data}",
        "",
        "## Recipe and command",
        "",
        "```",
        shlex.join([Path(sys.argv[0]).name if sys.argv[0].endswith(".py") else sys.argv[0], *sys.argv[1:]])
        if sys.argv and sys.argv[0]
        else "(not launched from the command line)",
        "```",
        "",
        "The fully resolved configuration is `run_config.yaml` next to this file; reproduce the run with "
        "`+recipe=run_config.yaml` (`--print-config` prints a configuration without training).",
        "",
        "## Final metrics",
        "",
        f"Steps: {max((e.get('step', 0) for e in log_history), default=0)}.",
        "",
        *(["| metric | value |", "|---|---|", *metrics] if metrics else ["No metrics were logged."]),
        "",
        "## Router health",
        "",
        *router_health(values),
        "",
        "## Routing drift",
        "",
        *routing_drift(values),
        "",
        "## Use",
        "",
        "```python",
        *(
            [
                "from peft import PeftModel",
                "from transformers import AutoModelForCausalLM, AutoTokenizer",
                "",
                f'base = AutoModelForCausalLM.from_pretrained("{cfg.model.name_or_path or Path(cfg.output_dir) / "base"}")',
                'model = PeftModel.from_pretrained(base, "PATH_TO_THIS_DIRECTORY")',
            ]
            if is_adapter
            else [
                "from transformers import AutoModelForCausalLM, AutoTokenizer",
                "",
                'model = AutoModelForCausalLM.from_pretrained("PATH_TO_THIS_DIRECTORY")',
            ]
        ),
        'tokenizer = AutoTokenizer.from_pretrained("PATH_TO_THIS_DIRECTORY")',
        "```",
        "",
    ]
    (final_dir / "README.md").write_text("\n".join(lines))
