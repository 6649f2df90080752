"""data.chat_template: the user's chat format, held to transformers' `apply_chat_template`.

References: the ChatML and Zephyr templates as their authors publish them (TRL's `ChatMlSpecialTokens`
of trl < 0.20, HuggingFaceH4/zephyr-7b-beta's tokenizer_config.json), rendered by transformers; the
ids and assistant masks of transformers' `apply_chat_template(..., return_assistant_tokens_mask=True)`;
transformers' `MixtralForCausalLM.resize_token_embeddings`; transformers' `AutoModelForCausalLM` and
PEFT's `PeftModel.from_pretrained` loading what a run saved.
"""

import json
import warnings

import peft
import pytest
import torch
import transformers
from mixtral_reference import model_pair
from omegaconf import OmegaConf
from pipeline_runs import SMALL_MODEL
from safetensors.torch import load_file
from trl.chat_template_utils import has_generation_markers

from mixtral_model import MixtralForCausalLM, load_tokenizer
from mixtral_model.tokenizer import CHAT_TEMPLATE, encode_conversation, serving_template
from mixtral_tune import dpo, sft
from mixtral_tune.chat_template import ChatTemplateError, shipped_templates, template_text, use_chat_template
from mixtral_tune.config import ConfigError, load_config, validate
from mixtral_tune.data import IGNORE_INDEX, prepare_sft_data
from mixtral_tune.shipped import DATA_DIR

CHATML_PUBLISHED = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ZEPHYR_PUBLISHED = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}"
    "\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
PUBLISHED = {"chatml": CHATML_PUBLISHED, "zephyr": ZEPHYR_PUBLISHED}
# Mixtral's SentencePiece vocabulary (mistral-common's tokenizer.model.v1; tests/test_tokenizer.py holds
# the loaded tokenizer to it); ChatML's two tokens are added after it, in this order.
VOCAB = 32000
IM_START, IM_END = VOCAB, VOCAB + 1
# A company's own format, as a user would write it: markers around the assistant text and its eos.
CUSTOM = (
    "{{- bos_token }}{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}{{- '### Answer:\n' }}"
    "{%- generation %}{{- m['content'] + eos_token }}{%- endgeneration %}{{- '\n' }}"
    "{%- else %}{{- '### ' + m['role'] | capitalize + ':\n' + m['content'] + '\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '### Answer:\n' }}{%- endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "Reverse: a b c"}, {"role": "assistant", "content": "c b a"}],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi <s> there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
    ],
]
SFT = [
    "+recipe=tiny/sft",
    *SMALL_MODEL,
    "trainer.per_device_train_batch_size=8",
    "trainer.learning_rate=3e-3",
]


def data_cfg(template, tokens=None):
    return OmegaConf.create({"chat_template": template, "chat_template_tokens": tokens})


def run_tokenizer(template, tokens=None):
    tokenizer = load_tokenizer()
    use_chat_template(tokenizer, data_cfg(template, tokens))
    return tokenizer


@pytest.mark.parametrize("name", ["chatml", "zephyr"])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_shipped_templates_render_as_published_after_bos(name, generation_prompt):
    tokenizer = run_tokenizer(name)
    for conversation in CONVERSATIONS:
        if generation_prompt:
            conversation = conversation[:-1]
        published = tokenizer.apply_chat_template(
            conversation,
            chat_template=PUBLISHED[name],
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )
        for template in (tokenizer.chat_template, serving_template(tokenizer.chat_template)):
            ours = tokenizer.apply_chat_template(
                conversation, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
            )
            assert ours == "<s>" + published


def test_chatml_tokens_are_added_as_single_special_tokens_and_end_turns():
    tokenizer = run_tokenizer("chatml")
    assert len(tokenizer) == VOCAB + 2
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [IM_START, IM_END]
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<unk>"
    # Zephyr's role markers stay text, as in Zephyr's own (Mistral) vocabulary; its turns end on </s>.
    zephyr = run_tokenizer("zephyr")
    assert len(zephyr) == VOCAB and zephyr.eos_token == "</s>"


@pytest.mark.parametrize("name", ["chatml", "zephyr", "custom_file", "custom_inline"])
def test_prepared_sft_rows_are_apply_chat_template_ids_and_assistant_masks(name, tmp_path):
    template = {"custom_file": str(tmp_path / "company.jinja"), "custom_inline": CUSTOM}.get(name, name)
    (tmp_path / "company.jinja").write_text(CUSTOM)
    cfg = load_config("sft", [*SFT, f"output_dir={tmp_path / 'out'}", f"data.cache_dir={tmp_path / 'cache'}",
                              "data.num_proc=1"])  # fmt: skip
    cfg.data.chat_template = template  # an inline template is written in a recipe YAML, not on a command line
    validate(cfg)
    tokenizer = load_tokenizer()
    use_chat_template(tokenizer, cfg.data)
    prepared = prepare_sft_data(cfg.data, tokenizer, seed=0)

    # Independently: the published Mixtral tokenizer, the tokens added, the template text itself.
    reference = load_tokenizer()
    if name == "chatml":
        reference.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    text = CUSTOM if name.startswith("custom") else shipped_templates()[name].read_text()
    rows = [json.loads(line) for line in (DATA_DIR / "sft_train.jsonl").read_text().splitlines()[:40]]
    for row, prepared_row in zip(rows, prepared.train, strict=False):
        encoded = reference.apply_chat_template(
            row["messages"],
            chat_template=text,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        assert prepared_row["input_ids"] == encoded["input_ids"]
        labels = [
            t if m else IGNORE_INDEX
            for t, m in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True)
        ]
        assert prepared_row["labels"] == labels
        trained = [t for t in prepared_row["labels"] if t != IGNORE_INDEX]
        assert tokenizer.decode(trained) == row["messages"][-1]["content"] + tokenizer.eos_token


def test_mixtral_instruct_stays_encode_chat(tmp_path):
    tokenizer = load_tokenizer()
    assert use_chat_template(tokenizer, data_cfg(None)) == []
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert len(tokenizer) == VOCAB


def test_a_template_whose_trained_span_misses_the_end_of_turn_is_refused():
    no_stop = CUSTOM.replace(
        "m['content'] + eos_token }}{%- endgeneration %}",
        "m['content'] }}{%- endgeneration %}{{- eos_token }}",
    )
    with pytest.raises(ChatTemplateError, match="never learns to stop"):
        run_tokenizer(no_stop)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.chat_template=chatmll"], "not a shipped template"),
        (["data.chat_template=templates/missing.jinja"], "no such file"),
        (["data.chat_template_tokens=['<|x|>']"], "data.chat_template is null"),
        (["data.kind=kto"], "or run a pipeline that trains on them (mixtral-tune kto)"),
        (["data.kind=dpo"], "or run a pipeline that trains on them (mixtral-tune dpo|orpo|cpo)"),
    ],
)
def test_bad_chat_template_settings_are_one_line_config_errors(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config("sft", ["+recipe=tiny/sft", f"output_dir={tmp_path}", *overrides])
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_an_sft_template_without_generation_marks_is_a_config_error(tmp_path):
    cfg = load_config("sft", ["+recipe=tiny/sft", f"output_dir={tmp_path}"])
    cfg.data.chat_template = serving_template(template_text("chatml"))
    with pytest.raises(ConfigError, match="no {% generation %}"):
        validate(cfg)


def test_resize_token_embeddings_matches_transformers(tmp_path):
    ours, theirs = model_pair(tmp_path)
    for model in (ours, theirs):
        torch.manual_seed(3)
        model.resize_token_embeddings(model.config.vocab_size + 2)
    new = ours.config.vocab_size - 1
    assert ours.config.vocab_size == theirs.config.vocab_size
    ids = torch.tensor([[1, 5, new - 1, new, 7]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def pattern_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "_pattern" in str(w.message)]


def load_adapter(base_class, base_dir, final, vocab_size):
    base = base_class.from_pretrained(base_dir, dtype=torch.float32)
    base.resize_token_embeddings(vocab_size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, final)
    return model.eval(), caught


def test_chatml_lora_run_saves_what_transformers_and_peft_load(tmp_path):
    out = tmp_path / "run"
    final = sft.main([*SFT, "peft=lora", "data.chat_template=chatml", "max_steps=2", f"output_dir={out}",
                      f"data.cache_dir={tmp_path / 'cache'}"])  # fmt: skip
    served = transformers.AutoTokenizer.from_pretrained(final)
    assert served.chat_template == serving_template(template_text("chatml"))
    assert not has_generation_markers(served.chat_template)
    assert len(served) == VOCAB + 2 and served.eos_token == "<|im_end|>"
    trained_with = run_tokenizer("chatml")
    for conversation in CONVERSATIONS:
        ids = served.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
        assert ids == encode_conversation(trained_with, conversation)["input_ids"]
    assert json.loads((out / "final" / "generation_config.json").read_text())["eos_token_id"] == IM_END

    adapter = load_file(out / "final" / "adapter_model.safetensors")
    new_rows = next(v for k, v in adapter.items() if "embed_tokens" in k and "trainable_tokens" in k)
    head = next(v for k, v in adapter.items() if k.endswith("lm_head.weight"))
    assert new_rows.shape[0] == 2 and head.shape[0] == VOCAB + 2
    base_head = MixtralForCausalLM.from_pretrained(out / "base").lm_head.weight
    assert not torch.equal(head[:VOCAB], base_head), "the output head was not trained"

    ids = torch.tensor(
        [served.apply_chat_template(CONVERSATIONS[1], tokenize=True, return_dict=True)["input_ids"]]
    )
    logits = {}
    for name, base_class in (
        ("ours", MixtralForCausalLM),
        ("transformers", transformers.AutoModelForCausalLM),
    ):
        model, caught = load_adapter(base_class, out / "base", final, len(served))
        embedding = model.get_input_embeddings()
        torch.testing.assert_close(embedding(torch.tensor([IM_START, IM_END])), new_rows.float())
        if name == "ours":
            assert pattern_warnings(caught) == []
        with torch.no_grad():
            logits[name] = model(ids).logits
    torch.testing.assert_close(logits["ours"], logits["transformers"], rtol=1e-5, atol=1e-5)


@pytest.mark.xfail(
    strict=True,
    reason="peft 0.21.2: its Mixtral v4->v5 conversion adds rank/alpha patterns for the fused gate_up_proj "
    "parameter, which its unmatched-pattern check (peft PR 3588) compares to module names only",
)
def test_adapter_loads_onto_transformers_mixtral_without_pattern_warnings(tmp_path):
    ours, _ = model_pair(tmp_path / "base")
    wrapped = peft.get_peft_model(ours, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["w1", "w2", "w3"]))
    wrapped.save_pretrained(tmp_path / "adapter")
    _, caught = load_adapter(transformers.AutoModelForCausalLM, tmp_path / "base", tmp_path / "adapter", 97)
    assert pattern_warnings(caught) == []


def test_chatml_full_sft_then_dpo_from_it(tmp_path):
    final = sft.main([*SFT, "data.chat_template=chatml", "max_steps=2", f"output_dir={tmp_path / 'sft'}",
                      f"data.cache_dir={tmp_path / 'cache'}"])  # fmt: skip
    theirs = transformers.AutoModelForCausalLM.from_pretrained(final)
    ours = MixtralForCausalLM.from_pretrained(final)
    assert theirs.config.vocab_size == VOCAB + 2 and theirs.config.eos_token_id == IM_END
    ids = torch.tensor([[1, IM_START, 1838, 13, 28754, IM_END, 13, IM_START]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)

    from mixtral_tune import pipeline
    from mixtral_tune.data import prepare_dpo_data
    from mixtral_tune.training.model_factory import build_frozen_reference

    trainer, _, tokenizer = pipeline.build_trainer(
        "dpo",
        ["+recipe=tiny/dpo", *SMALL_MODEL, "data.chat_template=chatml", f"model.name_or_path={final}",
         f"output_dir={tmp_path / 'dpo'}", f"data.cache_dir={tmp_path / 'cache'}"],
        prepare_dpo_data, dpo.dpo_arguments, dpo.MixtralDPOTrainer, build_frozen_reference,
    )  # fmt: skip
    row, raw = (
        trainer.train_dataset[0],
        json.loads((DATA_DIR / "dpo_train.jsonl").read_text().splitlines()[0]),
    )
    expected = tokenizer.apply_chat_template(raw["prompt"] + raw["chosen"], tokenize=True, return_dict=True)
    assert row["prompt_ids"] + row["chosen_ids"] == expected["input_ids"]
    assert row["prompt_ids"][1] == IM_START
