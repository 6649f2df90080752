"""Every shipped recipe, run through its CLI for a few steps with only the model and the data scaled down.

What a test replaces in a recipe is generated from the composed recipe itself (`scaled_down`): the model
becomes a random-init tiny Mixtral (model.name_or_path=null, model.architecture.* = TINY), hub datasets
become bundled files of the same row shape (tests/data/make_recipe_fixtures.py), packed SFT rows are
256 tokens instead of 4096, an expert-parallel recipe splits the experts over the test's 2 ranks, and the
run is cut to a few steps with a log line per step. Everything else
is what the recipe ships - dtype, gradient checkpointing, packing and padding-free, LoRA rank/alpha/
dropout, QLoRA quant type and storage dtype, DeepSpeed stage (2 gloo ranks for the multi-GPU recipes),
optimizer, batch size and gradient accumulation, schedule, eval and save cadence - and every run checks
its saved run_config.yaml against the composed recipe: only the replaced keys may differ.

Settings a CPU cannot run as shipped are in CPU_LIMITS with the reason. Full-model DPO with its frozen
reference and mixtral_tune/evaluate.py are held to independent computations (transformers' Mixtral on the
saved weights, mistral-common's token ids, plain torch log-probs).
"""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest, InstructRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from omegaconf import OmegaConf
from pipeline_runs import REPO, log_history, run_pipeline
from safetensors.torch import load_file

from mixtral_model import MixtralConfig, MixtralForCausalLM, load_tokenizer
from mixtral_tune.config import compose, load_config, recipe_files
from mixtral_tune.evaluate import exact_match, preference_metrics, read_jsonl
from mixtral_tune.training.model_factory import load_model, quantization_config, write_random_init

DATA = REPO / "tests" / "data"
TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 4,
}
STAND_INS = {  # hub dataset -> bundled (train, eval) files with the same row shape
    "HuggingFaceH4/ultrachat_200k": ("ultrachat_tiny.jsonl", "ultrachat_tiny_test.jsonl"),
    "HuggingFaceH4/ultrafeedback_binarized": ("ultrafeedback_tiny.jsonl", "ultrafeedback_tiny_test.jsonl"),
    "trl-lib/kto-mix-14k": ("kto_mix_tiny.jsonl", "kto_mix_tiny_test.jsonl"),
}
PACKED_LENGTH = 256  # the stand-in conversations are 26-170 tokens; 4096-token bins would need 16x the data
STEPS = 2  # the recipes warm up for 1 of 2 steps (learning rate 0 at step 1): step 2 trains
CPU_LIMITS = {  # a setting some recipe ships -> what runs instead on CPU, and why
    "trainer.optim=paged_adamw_8bit": "bitsandbytes pages optimizer state through CUDA unified memory; on CPU "
    "it runs the same 8-bit AdamW unpaged (its own fallback). Tensors under 4096 elements - every adapter "
    "of the tiny model - keep 32-bit state in bitsandbytes at any model size.",
}
OWN_TEST = {"tiny/dpo"}  # run as shipped by test_full_model_dpo_matches_plain_torch_...
SLOW = {
    # dpo_qlora_zero3 (non-slow) runs every setting of it but two: paged_adamw_8bit, which sft_qlora runs,
    # and no DeepSpeed, which sft_qlora and tiny/dpo run
    "mixtral-8x7b/dpo_qlora",
    # every setting of dpo_lora_ep but the DPO stage is sft_lora_ep's (non-slow); DPO with LoRA under EP=2 and
    # ZeRO-3 also runs in tests/test_pipelines.py
    "mixtral-8x7b/dpo_lora_ep",
    # every setting of simpo_qlora but the CPO/SimPO loss is orpo_qlora's (non-slow; the two experimental TRL
    # trainers share their code path); the SimPO loss runs in tiny/simpo
    "mixtral-8x7b/simpo_qlora",
}


def shipped(recipe: str, stage: str, groups: tuple[str, ...] = ()) -> dict:
    """The recipe (with config-group choices on top, if any) as the CLI composes it, resolved,
    as {dotted key: value}."""
    composed = compose(stage, [f"+recipe={recipe}", *groups])
    return flatten(OmegaConf.to_container(composed, resolve=True))


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def stage_of(recipe: str) -> str:
    return OmegaConf.load(recipe_files()[recipe]).stage


def scaled_down(recipe: str, output_dir: Path, groups=(), **extra) -> dict:
    """The keys a test replaces in `recipe` and their values: the model, the data, the run length/logging."""
    config = shipped(recipe, stage_of(recipe), tuple(groups))
    replaced = {
        "output_dir": str(output_dir),
        "max_steps": STEPS,
        "trainer.logging_steps": 1,
        "trainer.report_to": "none",
        "model.name_or_path": None,
        **{f"model.architecture.{key}": value for key, value in TINY.items()},
    }
    if config["data.path"] in STAND_INS:
        train, evaluation = STAND_INS[config["data.path"]]
        replaced["data.path"] = str(DATA / train)
        replaced["data.eval_path"] = str(DATA / evaluation)
    if config["data.packing"]:
        replaced["data.max_length"] = PACKED_LENGTH
    if config["model.expert_parallel_size"] > 1:  # EP=8 recipes: the tiny model's 4 experts over 2 gloo ranks
        replaced["model.expert_parallel_size"] = 2
    replaced.update(extra)
    return replaced


def cli(recipe: str, groups, replaced: dict) -> list[str]:
    overrides = [f"{key}={'null' if value is None else value}" for key, value in replaced.items()]
    return [f"+recipe={recipe}", *groups, *overrides]


def run_recipe(recipe: str, output_dir: Path, nproc: int = 1, groups=(), **extra) -> tuple[dict, dict]:
    """Run the scaled-down recipe; check the run's saved config is the recipe but for the replaced keys."""
    stage = stage_of(recipe)
    replaced = scaled_down(recipe, output_dir, groups, **extra)
    run_pipeline(stage, cli(recipe, groups, replaced), nproc=nproc, timeout=600)
    config = shipped(recipe, stage, tuple(groups))
    ran = flatten(OmegaConf.to_container(OmegaConf.load(output_dir / "final" / "run_config.yaml")))
    differing = {key for key in config.keys() | ran.keys() if config.get(key) != ran.get(key)}
    assert differing <= set(replaced), f"{recipe}: ran with {sorted(differing - set(replaced))} changed"
    assert all(ran[key] == value for key, value in replaced.items()), (replaced, ran)
    return config, ran


def training_arguments(output_dir: Path):
    checkpoint = output_dir / f"checkpoint-{STEPS}"
    return torch.load(checkpoint / "training_args.bin", weights_only=False)


def assert_trained_as_shipped(config: dict, output_dir: Path, nproc: int) -> list[dict]:
    """What the trainer actually ran with (its saved TrainingArguments), and that it trained."""
    args = training_arguments(output_dir)
    assert args.world_size == nproc
    assert args.activation_checkpointing == config["trainer.activation_checkpointing"]
    assert args.gradient_accumulation_steps == config["trainer.gradient_accumulation_steps"]
    assert args.per_device_train_batch_size == config["trainer.per_device_train_batch_size"]
    assert args.optim == config["trainer.optim"]
    compute = (
        config["peft.quant.compute_dtype"] if config["peft.method"] == "qlora" else config["model.dtype"]
    )
    assert args.bf16 == (compute == "bfloat16")
    stage = (args.deepspeed or {}).get("zero_optimization", {}).get("stage", 0)
    assert stage == config.get("deepspeed.zero_optimization.stage", 0)
    if config["stage"] == "sft":
        assert args.padding_free == config["data.packing"]
    steps = [entry for entry in log_history(output_dir / "final") if "loss" in entry]
    assert [entry["step"] for entry in steps] == list(range(1, STEPS + 1))
    assert all(math.isfinite(entry["loss"]) and entry["aux_loss"] > 0 for entry in steps)
    return steps


def assert_adapter_trained(config: dict, final: Path) -> None:
    adapter = json.loads((final / "adapter_config.json").read_text())
    # Training ran with the recipe's peft.dropout (run_recipe checks run_config.yaml); the saved adapter
    # records the inference value 0, so PEFT loads it onto transformers' fused experts as saved.
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (
        config["peft.r"], config["peft.alpha"], 0.0,
    )  # fmt: skip
    weights = load_file(final / "adapter_model.safetensors")
    lora_b = [value for key, value in weights.items() if "lora_B" in key]
    assert any("experts" in key for key in weights) and any("q_proj" in key for key in weights)
    assert lora_b and any(value.abs().max() > 0 for value in lora_b), "adapter is empty or untrained"


def assert_full_model_trained(final: Path, base: Path) -> None:
    trained, initial = load_file(final / "model.safetensors"), load_file(base / "model.safetensors")
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[key].float(), initial[key].float()) for key in trained)


def ranks(recipe: str) -> int:
    """2 gloo ranks for a recipe that ships DeepSpeed (a multi-GPU recipe), else 1."""
    defaults = OmegaConf.load(recipe_files()[recipe]).defaults
    choice = next(d["override /deepspeed"] for d in defaults if "override /deepspeed" in d)
    return 1 if choice == "none" else 2


def recipe_case(recipe: str):
    marks = [pytest.mark.distributed] if ranks(recipe) > 1 else []
    if recipe in SLOW:
        marks.append(pytest.mark.slow)
    return pytest.param(recipe, marks=marks, id=recipe)


@pytest.mark.parametrize("recipe", [recipe_case(r) for r in recipe_files() if r not in OWN_TEST])
def test_recipe_runs_as_shipped(tmp_path, recipe):
    """Every step logged with a finite loss and the router aux loss; the eval the recipe ships runs at the
    last step and the checkpoint is saved after it (QLoRA under ZeRO-3 with the shipped bf16 quant
    storage used to die there); the adapter or the full model trained."""
    nproc = ranks(recipe)
    config, _ = run_recipe(recipe, tmp_path, nproc=nproc)
    assert any(key.startswith("eval_") for entry in log_history(tmp_path / "final") for key in entry)
    if config["peft.method"] == "none":
        assert_full_model_trained(tmp_path / "final", tmp_path / "base")
    else:
        assert_adapter_trained(config, tmp_path / "final")
    assert_trained_as_shipped(config, tmp_path, nproc=nproc)


@pytest.mark.distributed
def test_zero3_qlora_sft_with_default_quant_settings_evaluates_and_saves(tmp_path):
    """SFT counterpart of dpo_qlora_zero3: peft=qlora's defaults (NF4, bf16 compute and storage) under
    ZeRO-3 on 2 ranks, with an eval before the checkpoint save."""
    config, _ = run_recipe("tiny/sft", tmp_path, nproc=2, groups=["peft=qlora", "deepspeed=zero3"])
    assert (config["peft.quant.compute_dtype"], config["peft.quant.quant_storage"]) == (
        "bfloat16",
        "bfloat16",
    )
    assert_trained_as_shipped(config, tmp_path, nproc=2)
    assert any(key.startswith("eval_") for entry in log_history(tmp_path / "final") for key in entry)
    assert_adapter_trained(config, tmp_path / "final")


def test_qlora_training_model_keeps_its_4bit_layout_through_an_eval_forward(tmp_path):
    """What broke ZeRO-3 QLoRA saves, in one process: on a CPU with AVX512-BF16, bitsandbytes rewrites a
    Linear4bit's weight into a uint8 inference layout (and its quant state) at the first eval-mode
    forward - the trainer's evaluation. The pipeline's model keeps its quantized layout."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    cfg = load_config(
        "sft", ["+recipe=tiny/sft", "peft=qlora", f"output_dir={tmp_path}"]
    )  # hidden 128: K >= 64
    write_random_init(cfg, load_tokenizer(None), tmp_path / "base", 0)
    ids = torch.randint(3, 32000, (1, 8), generator=torch.Generator().manual_seed(0))

    def layouts(model):
        return [
            (
                m.weight.dtype,
                tuple(m.weight.shape),
                getattr(m.weight.quant_state, "packing_format_for_cpu", False),
            )
            for m in model.modules()
            if isinstance(m, bnb.nn.Linear4bit)
        ]

    model = load_model(cfg, str(tmp_path / "base"))
    # checked first: with the repack on, this CPU's packed kernel dies (SIGFPE) on an expert given 0 tokens
    assert not any(m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    before = layouts(model)
    assert before and all(dtype == torch.bfloat16 and not packed for dtype, _, packed in before)
    with torch.no_grad():
        model.eval()(input_ids=ids)
    assert layouts(model) == before
    if has_avx512bf16():  # bitsandbytes on its own repacks here
        plain = MixtralForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=quantization_config(cfg), dtype=torch.bfloat16
        )
        layer = plain.model.layers[0].self_attn.q_proj  # one layer: the packed kernel dies on 0-token experts
        with torch.no_grad():
            layer.eval()(torch.ones(2, layer.in_features, dtype=torch.bfloat16))
        assert layouts(layer) == [(torch.uint8, (layer.out_features, layer.in_features // 2), True)]


def test_cpu_limits_name_settings_a_recipe_ships():
    settings = {
        f"{key}={value}"
        for recipe in recipe_files()
        for key, value in shipped(recipe, stage_of(recipe)).items()
    }
    assert set(CPU_LIMITS) <= settings


# ---- full-model DPO with its frozen reference, against plain torch -------------------------------------


def mistral_ids(mistral, prompt: list[dict], answer: list[dict] | None = None) -> list[int]:
    turns = [UserMessage(content=m["content"]) if m["role"] == "user" else AssistantMessage(content=m["content"])
             for m in prompt + (answer or [])]  # fmt: skip
    return mistral.instruct_tokenizer.encode_instruct(InstructRequest(messages=turns)).tokens


@torch.no_grad()
def answer_log_prob(model, mistral, prompt: list[dict], answer: list[dict]) -> float:
    """Summed log-prob of the answer's tokens (text and </s>) given the prompt, from full logits."""
    prompt_ids, ids = mistral_ids(mistral, prompt), mistral_ids(mistral, prompt, answer)
    assert ids[: len(prompt_ids)] == prompt_ids
    log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), dim=-1)
    targets = torch.tensor(ids[1:])
    return log_probs[torch.arange(len(targets)), targets][len(prompt_ids) - 1 :].sum().item()


def pair_log_probs(model, mistral, pairs: list[dict]) -> torch.Tensor:
    """(pairs, 2): summed log-probs of the chosen and the rejected answer."""
    return torch.tensor(
        [
            [answer_log_prob(model, mistral, p["prompt"], p[key]) for key in ("chosen", "rejected")]
            for p in pairs
        ],
        dtype=torch.float64,
    )


def test_full_model_dpo_matches_plain_torch_with_the_frozen_base_as_reference(tmp_path):
    """tiny/dpo as shipped (full model, frozen reference copy, fp32, one batch of 16 = the whole data
    set, so every step sees the same rows). The policy of step s is checkpoint-(s-1); the reference is
    the base. TRL's logged rewards, log-probs and loss of steps 2 and 3 are recomputed here from those
    weights with transformers' Mixtral and mistral-common's token ids."""
    rows = (REPO / "data" / "dpo_train.jsonl").read_text().splitlines()[:16]
    data = tmp_path / "dpo16.jsonl"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    config, _ = run_recipe(
        "tiny/dpo", out, **{"data.path": str(data), "data.eval_path": str(data),
                            "max_steps": 3, "trainer.save_steps": 1, "trainer.save_total_limit": None},
    )  # fmt: skip
    assert config["trainer.per_device_train_batch_size"] == len(rows) and config["peft.method"] == "none"
    beta, coef = config["trainer.beta"], config["model.router_aux_loss_coef"]
    pairs = [json.loads(row) for row in rows]
    mistral = MistralTokenizer.v1()
    reference = transformers.MixtralForCausalLM.from_pretrained(out / "base", dtype=torch.float32).eval()
    logged = {entry["step"]: entry for entry in log_history(out / "final") if "loss" in entry}
    for step in (2, 3):
        policy = transformers.MixtralForCausalLM.from_pretrained(
            out / f"checkpoint-{step - 1}", dtype=torch.float32
        ).eval()
        policy_lp, reference_lp = (
            pair_log_probs(policy, mistral, pairs),
            pair_log_probs(reference, mistral, pairs),
        )
        rewards = beta * (policy_lp - reference_lp)
        margins = rewards[:, 0] - rewards[:, 1]
        expected = {
            "logps/chosen": policy_lp[:, 0].mean().item(),
            "logps/rejected": policy_lp[:, 1].mean().item(),
            "rewards/chosen": rewards[:, 0].mean().item(),
            "rewards/rejected": rewards[:, 1].mean().item(),
            "rewards/margins": margins.mean().item(),
            "rewards/accuracies": (margins > 0).double().mean().item(),
            "loss": -F.logsigmoid(beta * (policy_lp[:, 0] - reference_lp[:, 0] - policy_lp[:, 1] + reference_lp[:, 1])).mean().item()
            + coef * logged[step]["aux_loss"],
        }  # fmt: skip
        found = {key: logged[step][key] for key in expected}
        for key in expected:
            assert found[key] == pytest.approx(expected[key], rel=1e-4, abs=2e-6), (step, key, expected)
    assert abs(logged[3]["rewards/margins"]) > 1e-4, "the policy did not move: the check above proves little"


# ---- mixtral_tune/evaluate.py (the demo's table), against an independent computation --------------------------


def independent_greedy_answer(model, mistral, tokenizer, prompt: list[dict], max_new_tokens: int) -> str:
    """Argmax decoding one token at a time over the whole sequence (no cache, no padding, no batch)."""
    ids = mistral.encode_chat_completion(
        ChatCompletionRequest(messages=[UserMessage(content=m["content"]) for m in prompt])
    ).tokens
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax().item()
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def tiny_checkpoint(path: Path, seed: int, tokenizer) -> Path:
    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=32000, **TINY, num_experts_per_tok=2, max_position_embeddings=512,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    MixtralForCausalLM(config).save_pretrained(path)
    return path


def test_evaluate_table_matches_an_independent_computation(tmp_path):
    """The demo's numbers (exact match, prefers_chosen, reward accuracy and margin) from mixtral_tune/evaluate.py
    on our model, against transformers' Mixtral on the same weights with mistral-common's prompt ids.
    Half of the SFT rows get the independent greedy answer as their reference and half a wrong one, so
    exact match must be exactly 0.5 and every answer must agree."""
    tokenizer = load_tokenizer(None)
    mistral = MistralTokenizer.v1()
    policy_dir = tiny_checkpoint(tmp_path / "policy", 1, tokenizer)
    reference_dir = tiny_checkpoint(tmp_path / "reference", 2, tokenizer)
    policy = MixtralForCausalLM.from_pretrained(policy_dir).eval()
    reference = MixtralForCausalLM.from_pretrained(reference_dir).eval()
    theirs = transformers.MixtralForCausalLM.from_pretrained(policy_dir).eval()
    theirs_reference = transformers.MixtralForCausalLM.from_pretrained(reference_dir).eval()

    rows = read_jsonl(REPO / "data" / "sft_eval.jsonl")[:8]
    answers = [
        independent_greedy_answer(theirs, mistral, tokenizer, row["messages"][:-1], 16) for row in rows
    ]
    assert len(set(answers)) > 1 and all(answers), answers
    for index, (row, answer) in enumerate(zip(rows, answers, strict=True)):
        row["messages"][-1]["content"] = answer if index % 2 == 0 else answer + " x"
    accuracy, samples = exact_match(policy, tokenizer, rows)
    assert [answer for _, answer, _ in samples] == answers
    assert accuracy == 0.5

    pairs = read_jsonl(REPO / "data" / "dpo_eval.jsonl")[:8]
    beta = 0.1
    metrics = preference_metrics(policy, reference, tokenizer, pairs, beta)
    policy_lp = pair_log_probs(theirs, mistral, pairs)
    reference_lp = pair_log_probs(theirs_reference, mistral, pairs)
    rewards = beta * (policy_lp - reference_lp)
    expected = {
        "prefers_chosen": (policy_lp[:, 0] > policy_lp[:, 1]).double().mean().item(),
        "reward_accuracy": (rewards[:, 0] > rewards[:, 1]).double().mean().item(),
        "reward_margin": (rewards[:, 0] - rewards[:, 1]).mean().item(),
    }
    assert metrics == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert 0 < expected["prefers_chosen"] < 1 or 0 < expected["reward_accuracy"] < 1, expected
    assert preference_metrics(policy, None, tokenizer, pairs, beta) == pytest.approx(
        {"prefers_chosen": expected["prefers_chosen"]}
    )


def test_read_jsonl_keeps_each_row_whole(tmp_path):
    """UTF-8 whatever the locale; only "\\n" ends a row (JSON text may hold U+2028 unescaped)."""
    rows = [{"text": "a\u2028b"}, {"text": "caf\u00e9 \u4e2d"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n\n", encoding="utf-8")
    assert read_jsonl(path) == rows
