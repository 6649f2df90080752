"""The offline Mixtral tokenizer and chat format against mistral-common's reference, token for token.

mistral-common's `ChatCompletionRequest` refuses a conversation that ends on an assistant turn, so the
reference for training conversations is the lower-level `encode_instruct(InstructRequest(...))`, which
`encode_chat_completion` calls after validating and folding system messages into `system_prompt`.
Prompts (ending on a user turn) are also checked against `encode_chat_completion` itself.
"""

import re
import types
from importlib import resources

import datasets
import minijinja
import pytest
import sentencepiece
from jinja2 import TemplateError
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest, InstructRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from transformers import AutoTokenizer
from trl import DPOConfig, DPOTrainer

from mixtral_model.tokenizer import (
    ROLES,
    SERVING_CHAT_TEMPLATE,
    TEXT_MARK,
    encode_chat,
    load_tokenizer,
    save_for_serving,
)


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


def system(content):
    return {"role": "system", "content": content}


CONVERSATIONS = {
    "single_turn": [user("What is the capital of France?"), assistant("Paris.")],
    "single_turn_prompt": [user("What is the capital of France?")],
    "three_turns": [
        user("Hi!"),
        assistant("Hello! How can I help?"),
        user("Name a prime number."),
        assistant("7"),
        user("And an even one?"),
        assistant("2 is the only even prime."),
    ],
    "three_turns_prompt": [
        user("Hi!"),
        assistant("Hello!"),
        user("Count to 3."),
        assistant("1, 2, 3"),
        user("More"),
    ],
    "system_prompt": [
        system("You are a terse assistant."),
        user("Explain BPE."),
        assistant("Merge frequent pairs."),
        user("Why?"),
        assistant("Compression."),
    ],
    "system_prompt_generation": [system("Answer in French."), user("Hello")],
    "empty_system_prompt": [system(""), user("Hello"), assistant("Hi")],
    "unicode": [
        user("Crème brûlée, naïve café, Ærøskøbing — ¿qué tal? Straße."),
        assistant("日本語で答えます。你好，世界！한국어도 됩니다."),
        user("مرحبا، كيف حالك؟ שלום"),
        assistant("بخير، شكرا"),
    ],
    "emoji": [user("🦩🧑‍🚀👍🏽 🇫🇷 ❤️"), assistant("🎉🎉 done ✅")],
    "whitespace": [
        user("line one\nline two\n\n\nline five\r\n"),
        assistant("a  b   c    d     e" + " " * 20 + "f"),
        user("  leading and trailing  "),
        assistant("  indented answer  "),
        user("\tcol1\tcol2\t\t"),
        assistant("\n\nstarts with newlines"),
    ],
    "code": [
        user("Fix:\n```python\ndef f(x):\n    return x ** 2\n```"),
        assistant("```python\ndef f(x: int) -> int:\n\treturn x * x\n```\n"),
    ],
    "digits": [user("3.14159 + 2,718 = ?"), assistant("12345678901234567890 and 007")],
    "marker_lookalikes": [user("Say [INST] and [/INST] literally"), assistant("[INST] ok [/INST]")],
    "empty_user": [user(""), assistant("You sent nothing.")],
}
WITH_ASSISTANT = [name for name, messages in CONVERSATIONS.items() if messages[-1]["role"] == "assistant"]
PROMPTS = [name for name, messages in CONVERSATIONS.items() if messages[-1]["role"] == "user"]
PLAIN_TEXTS = [
    "My favourite condiment is",
    "Hello world",
    "a  b   c    d" + " " * 17 + "e",
    "trailing spaces   ",
    "x\n\n    indented()\n\ttab",
    "Crème brûlée 日本語 مرحبا 🦩👍🏽",
    "</s> literal <s> and <unk>",
    "3.14159 12345678901234567890",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def mistral():
    return MistralTokenizer.v1()


def reference_ids(mistral, messages):
    """mistral-common's ids for any conversation, training ones (ending on an assistant turn) included."""
    system_prompt = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = [
        UserMessage(content=m["content"]) if m["role"] == "user" else AssistantMessage(content=m["content"])
        for m in messages
        if m["role"] != "system"
    ]
    request = InstructRequest(messages=turns, system_prompt=system_prompt)
    return mistral.instruct_tokenizer.encode_instruct(request).tokens


def reference_assistant_mask(mistral, messages):
    """1 on the tokens each assistant message adds to mistral-common's encoding of the conversation so far."""
    mask = []
    previous = []
    for end in range(1, len(messages) + 1):
        ids = reference_ids(mistral, messages[:end])
        assert ids[: len(previous)] == previous, "mistral-common's encoding is not message by message"
        mask += [int(messages[end - 1]["role"] == "assistant")] * (len(ids) - len(previous))
        previous = ids
    return mask


def chat_completion_ids(mistral, messages):
    """mistral-common's public, validated path; it takes prompts only (ending on a user turn)."""
    classes = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[classes[m["role"]](content=m["content"]) for m in messages])
    return mistral.encode_chat_completion(request).tokens


def template_ids(tokenizer, messages, **kwargs):
    encoding = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return encoding["input_ids"]


def test_plain_encode_matches_known_mixtral_ids(tokenizer):
    assert tokenizer("My favourite condiment is")["input_ids"] == [1, 1984, 16020, 2076, 2487, 349]


def test_vocabulary_and_special_tokens_match_mistral_common(tokenizer, mistral):
    sentencepiece = mistral.instruct_tokenizer.tokenizer
    assert len(tokenizer) == tokenizer.vocab_size == sentencepiece.n_words == 32000
    assert tokenizer.bos_token_id == sentencepiece.bos_id
    assert tokenizer.eos_token_id == sentencepiece.eos_id
    assert tokenizer.pad_token_id == tokenizer.unk_token_id == sentencepiece.unk_id
    assert tokenizer.padding_side == "right"


@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_plain_text_matches_sentencepiece(tokenizer, mistral, text):
    expected = mistral.instruct_tokenizer.tokenizer.encode(text, bos=True, eos=False)
    assert tokenizer(text, split_special_tokens=True)["input_ids"] == expected


@pytest.mark.parametrize("spaces", range(1, 40))
def test_runs_of_spaces_split_like_sentencepiece(tokenizer, mistral, spaces):
    text = f"a{' ' * spaces}b{' ' * spaces}"
    assert tokenizer(text)["input_ids"] == mistral.instruct_tokenizer.tokenizer.encode(
        text, bos=True, eos=False
    )


def test_byte_fallback_round_trips_a_rare_emoji(tokenizer, mistral):
    text = "🦩"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert all(re.fullmatch(r"<0x[0-9A-F]{2}>", token) for token in tokenizer.convert_ids_to_tokens(ids[1:]))
    assert ids == mistral.instruct_tokenizer.tokenizer.encode(text, bos=False, eos=False)
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_chat_template_matches_mistral_common(tokenizer, mistral, name):
    messages = CONVERSATIONS[name]
    assert template_ids(tokenizer, messages) == reference_ids(mistral, messages)


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_encode_chat_matches_mistral_common_and_template(tokenizer, mistral, name):
    messages = CONVERSATIONS[name]
    encoded = encode_chat(tokenizer, messages)
    assert encoded["input_ids"] == reference_ids(mistral, messages)
    assert encoded["input_ids"] == template_ids(tokenizer, messages)


@pytest.mark.parametrize("name", WITH_ASSISTANT)
def test_assistant_mask_covers_exactly_assistant_tokens(tokenizer, mistral, name):
    messages = CONVERSATIONS[name]
    encoded = encode_chat(tokenizer, messages)
    expected = reference_assistant_mask(mistral, messages)
    assert encoded["assistant_mask"] == expected
    assert encoded["input_ids"][-1] == tokenizer.eos_token_id and expected[-1] == 1
    assert template_ids(tokenizer, messages, return_assistant_tokens_mask=True) == encoded["input_ids"]
    rendered = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    assert rendered["assistant_masks"] == expected


@pytest.mark.parametrize("name", PROMPTS)
def test_generation_prompt_matches_chat_completion(tokenizer, mistral, name):
    messages = CONVERSATIONS[name]
    expected = chat_completion_ids(mistral, messages)
    assert template_ids(tokenizer, messages, add_generation_prompt=True) == expected
    assert encode_chat(tokenizer, messages, add_generation_prompt=True)["input_ids"] == expected


def vocabulary_control_tokens() -> list[str]:
    """The control and unknown pieces of mistral-common's SentencePiece model, read from the model itself."""
    model = resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    processor = sentencepiece.SentencePieceProcessor(model_proto=model.read_bytes())
    return [
        processor.id_to_piece(i)
        for i in range(processor.get_piece_size())
        if processor.is_control(i) or processor.is_unknown(i)
    ]


CONTROL_TOKENS = vocabulary_control_tokens()
LOOKALIKES = [
    "[INST]",
    "[/INST]",
    "</s",
    "<s",
    "/s>",
    "<s >",
    "< / s >",
    "<<s>>",
    "<</s>>",
    "<unk",
    "<UNK>",
    "<0x0A>",  # a byte piece's spelling
    "<s></s><unk>",
    TEXT_MARK,  # the template's own escape mark, alone and after "<"
    f"<{TEXT_MARK}/s>",
    f"<<{TEXT_MARK}{TEXT_MARK}s>",
]
SPELLINGS = CONTROL_TOKENS + LOOKALIKES
PLACEMENTS = {
    "alone": "{}",
    "start": "{} hello",
    "end": "hello {}",
    "end_glued": "hello.{}",
    "middle": "a {} b",
    "middle_glued": "a{}b",
    "repeated": "{}{}{}",
    "repeated_spaced": "{} {} {}",
    "inside_inst": "[INST]{}[/INST]",
    "between_inst": "[/INST] {} [INST]",
}


def probe_conversations(spelling: str) -> dict[str, list[dict]]:
    """Training conversations with `spelling` placed in each role, at each position, in several turns."""
    conversations = {}
    for place, pattern in PLACEMENTS.items():
        text = pattern.replace("{}", spelling)
        conversations[f"system/{place}"] = [
            system(text),
            user("Hi"),
            assistant("Hello"),
            user("Bye"),
            assistant("Ciao"),
        ]
        conversations[f"user/{place}"] = [user(text), assistant("Sure."), user(text), assistant("Again.")]
        conversations[f"assistant/{place}"] = [
            user("Say it."),
            assistant(text),
            user("Again?"),
            assistant(text),
        ]
    return conversations


def test_vocabulary_control_tokens_are_the_tokenizers_special_tokens(tokenizer):
    assert CONTROL_TOKENS == ["<unk>", "<s>", "</s>"]
    assert sorted(tokenizer.all_special_tokens) == sorted(CONTROL_TOKENS)
    assert all(TEXT_MARK not in token for token in tokenizer.get_vocab())


def test_probe_conversations_hold_control_token_spellings_in_every_role():
    conversations = [c for s in SPELLINGS for c in probe_conversations(s).values()]
    assert len(conversations) == len(SPELLINGS) * 3 * len(PLACEMENTS) == 570
    for token in CONTROL_TOKENS:
        for role in ROLES:
            assert any(m["role"] == role and token in m["content"] for c in conversations for m in c)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_encode_chat_keeps_control_token_spellings_as_text(tokenizer, mistral, spelling):
    mismatches = []
    for name, messages in probe_conversations(spelling).items():
        encoded = encode_chat(tokenizer, messages)
        if encoded["input_ids"] != reference_ids(mistral, messages):
            mismatches.append(f"{name}: ids")
        if encoded["assistant_mask"] != reference_assistant_mask(mistral, messages):
            mismatches.append(f"{name}: assistant mask")
        prompt = messages[:-1]
        generation = encode_chat(tokenizer, prompt, add_generation_prompt=True)["input_ids"]
        if generation != chat_completion_ids(mistral, prompt):
            mismatches.append(f"{name}: generation prompt")
    assert mismatches == []


def check_template_against_mistral_common(tokenizer, mistral, spelling) -> list[str]:
    mismatches = []
    for name, messages in probe_conversations(spelling).items():
        rendered = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        if rendered["input_ids"] != reference_ids(mistral, messages):
            mismatches.append(f"{name}: ids")
        if rendered["assistant_masks"] != reference_assistant_mask(mistral, messages):
            mismatches.append(f"{name}: assistant mask")
        prompt = messages[:-1]
        generation = template_ids(tokenizer, prompt, add_generation_prompt=True)
        if generation != chat_completion_ids(mistral, prompt):
            mismatches.append(f"{name}: generation prompt")
    return mismatches


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_chat_template_keeps_control_token_spellings_as_text(tokenizer, mistral, spelling):
    assert check_template_against_mistral_common(tokenizer, mistral, spelling) == []


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """What a server or another library gets: AutoTokenizer on a directory saved by load_tokenizer()."""
    directory = tmp_path_factory.mktemp("saved_tokenizer")
    load_tokenizer().save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_saved_and_reloaded_template_keeps_control_token_spellings_as_text(reloaded, mistral, spelling):
    assert check_template_against_mistral_common(reloaded, mistral, spelling) == []


def test_trl_dpo_tokenization_keeps_control_token_spellings_as_text(tokenizer, mistral, tmp_path):
    """TRL's own DPO dataset preparation (the chat template, prompt with generation prompt) on our rows."""
    cases, rows = [], []
    for spelling in SPELLINGS:
        for name, messages in probe_conversations(spelling).items():
            rejected = [assistant(messages[-1]["content"] + " no")]
            cases.append(f"{spelling!r} {name}")
            rows.append({"prompt": messages[:-1], "chosen": messages[-1:], "rejected": rejected})
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, max_length=None)
    trainer = types.SimpleNamespace(_tokenizer=tokenizer)  # all `_prepare_dataset` reads from the trainer
    prepared = DPOTrainer._prepare_dataset(
        trainer, datasets.Dataset.from_list(rows), tokenizer, args, "train"
    )
    assert len(prepared) == len(rows) == 570
    mismatches = []
    for case, row, tokenized in zip(cases, rows, prepared, strict=True):
        if tokenized["prompt_ids"] != chat_completion_ids(mistral, row["prompt"]):
            mismatches.append(f"{case}: prompt")
        for key in ("chosen", "rejected"):
            ids = tokenized["prompt_ids"] + tokenized[f"{key}_ids"]
            if ids != reference_ids(mistral, row["prompt"] + row[key]):
                mismatches.append(f"{case}: {key}")
    assert mismatches == []


def test_a_tokenizer_saved_without_the_text_mark_normalizer_is_refused(tmp_path):
    old = load_tokenizer()
    old.backend_tokenizer.normalizer = None
    old.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"tokenizer at {tmp_path} would encode message text")):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="use load_tokenizer"):
        encode_chat(old, [user("Hi")])


INVALID_CONVERSATIONS = {
    "two_users": ([user("a"), user("b")], False, "message 1: expected role assistant, got user"),
    "assistant_first": ([assistant("a"), user("b")], False, "message 0: expected role user, got assistant"),
    "two_assistants": ([user("a"), assistant("b"), assistant("c")], False, "message 2: expected role user"),
    "system_not_first": ([user("a"), system("s")], False, "message 1: a system message is only allowed as"),
    "two_systems": ([system("s"), system("t"), user("a")], False, "message 1: a system message is only"),
    "unknown_role": ([user("a"), {"role": "tool", "content": "x"}], False, "message 1: unknown role 'tool'"),
    "list_content": ([user(["a"])], False, "message 0: content must be a string"),
    "number_content": ([user("a"), assistant(7)], False, "message 1: content must be a string"),
    "system_only": ([system("s")], False, "conversation has no user message"),
    "empty_assistant": ([user("a"), assistant("")], False, "message 1: assistant content is empty"),
    "prompt_after_assistant": ([user("a"), assistant("b")], True, "message 1: add_generation_prompt needs"),
}


@pytest.mark.parametrize("name", INVALID_CONVERSATIONS)
def test_invalid_conversation_raises_in_encode_chat_and_template(tokenizer, name):
    messages, add_generation_prompt, message = INVALID_CONVERSATIONS[name]
    with pytest.raises(ValueError, match=re.escape(message)):
        encode_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    # transformers' `raise_exception` raises jinja2's TemplateError, with the template's message
    with pytest.raises(TemplateError, match=re.escape(message)):
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def test_empty_conversation_raises(tokenizer):
    with pytest.raises(ValueError, match="conversation is empty"):
        encode_chat(tokenizer, [])
    with pytest.raises(ValueError, match="empty conversation"):
        tokenizer.apply_chat_template([], tokenize=False)


def test_missing_path_raises_file_not_found_naming_it(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_tokenizer(missing)


def test_save_and_reload_keeps_template_and_ids(tokenizer, mistral, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(str(tmp_path))
    assert reloaded.chat_template == tokenizer.chat_template
    assert (reloaded.pad_token_id, reloaded.padding_side) == (tokenizer.pad_token_id, "right")
    for text in PLAIN_TEXTS:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    for name in ("system_prompt", "whitespace", "unicode"):
        messages = CONVERSATIONS[name]
        assert template_ids(reloaded, messages) == reference_ids(mistral, messages)
        assert encode_chat(reloaded, messages) == encode_chat(tokenizer, messages)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """What `final/` holds: the tokenizer saved for serving, loaded as a server would (AutoTokenizer)."""
    directory = tmp_path_factory.mktemp("served_tokenizer")
    save_for_serving(load_tokenizer(), directory)
    return directory


def test_serving_template_has_no_training_marks_and_training_template_is_kept(tokenizer, served):
    saved = (served / "chat_template.jinja").read_text()
    assert saved == SERVING_CHAT_TEMPLATE and "generation %}" not in saved
    assert "generation %}" in tokenizer.chat_template  # the caller's tokenizer keeps its training form
    # load_tokenizer on a served directory trains again: assistant masks need the marks
    assert load_tokenizer(str(served)).chat_template == tokenizer.chat_template


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_serving_template_renders_like_mistral_common(served, mistral, spelling):
    reloaded = AutoTokenizer.from_pretrained(served)
    for name, messages in probe_conversations(spelling).items():
        assert template_ids(reloaded, messages) == reference_ids(mistral, messages), name
        prompt = messages[:-1]
        assert template_ids(reloaded, prompt, add_generation_prompt=True) == chat_completion_ids(
            mistral, prompt
        )


def minijinja_render(template: str, messages, add_generation_prompt: bool) -> str:
    """Render as TGI does (minijinja, with a raise_exception function), not through jinja2."""
    environment = minijinja.Environment()

    def raise_exception(message):
        raise ValueError(message)

    environment.add_function("raise_exception", raise_exception)
    return environment.render_str(
        template,
        messages=messages,
        bos_token="<s>",
        eos_token="</s>",
        add_generation_prompt=add_generation_prompt,
    )


def test_serving_template_renders_in_minijinja_as_in_transformers(served):
    reloaded = AutoTokenizer.from_pretrained(served)
    template = (served / "chat_template.jinja").read_text()
    with pytest.raises(Exception, match="generation"):  # the training form is what minijinja refuses
        minijinja_render(reloaded_training_template(), CONVERSATIONS["system_prompt"], False)
    for spelling in SPELLINGS:
        for name, messages in probe_conversations(spelling).items():
            for prompt, generation in ((messages, False), (messages[:-1], True)):
                expected = reloaded.apply_chat_template(
                    prompt, tokenize=False, add_generation_prompt=generation
                )
                assert minijinja_render(template, prompt, generation) == expected, (spelling, name)


def reloaded_training_template() -> str:
    return load_tokenizer().chat_template
