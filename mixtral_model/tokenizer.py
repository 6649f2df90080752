"""The Mixtral tokenizer and the Mixtral-8x7B-Instruct-v0.1 chat format, offline.

`load_tokenizer()` builds the 32000-piece byte-fallback SentencePiece BPE that Mixtral uses from the
`tokenizer.model.v1` file shipped inside the installed `mistral-common` package, as a transformers
tokenizer, in memory (no download, no files written, so any number of processes can call it at
once). Its BPE merges are ranked by SentencePiece piece score rather than by piece id, as transformers'
own conversion does: the whitespace-run pieces ("▁▁", "▁▁▁▁", ...) have low ids but the lowest score, and
ranking them by id splits runs of spaces differently from SentencePiece.

The chat format is mistral-common's `InstructTokenizerV1`, which encodes every message on its own with
SentencePiece (each gets a leading "▁"): `<s>`, then "[INST] {user} [/INST]" per user turn and
"{assistant}</s>" per assistant turn; a system prompt is put in front of the FIRST user message,
followed by a blank line. `[INST]` and `[/INST]` are plain text, not control tokens. Written as text
for the transformers tokenizer (which, unlike SentencePiece, adds "▁" only at the very start of the
input and never after a special token), that is:

    <s> [INST] {system}\\n\\n{user} [/INST] {assistant}</s> [INST] {user} [/INST]

`encode_chat` produces the same ids message by message, plus a mask of the assistant tokens for SFT
losses; the chat template marks the same tokens with `{% generation %}` for
`apply_chat_template(..., return_assistant_tokens_mask=True)`.

Control tokens come only from the format. The vocabulary's control tokens are `<unk>`, `<s>` and `</s>`
(ids 0-2; every other piece is text or a byte). Message text that spells one of them is text, as in
mistral-common, on every path, including the chat template saved with the tokenizer (what TRL and
servers use): a rendered chat is one string, and transformers turns every `<s>`, `</s>` or `<unk>` in
it into the control token before any normalisation. So the template writes every "<" of message text
as "<" + TEXT_MARK (U+FDD0, a Unicode noncharacter, reserved for internal use), which no control token
contains, and the tokenizer's normalizer, which runs after the control tokens are matched, deletes
TEXT_MARK after "<" again: the BPE sees exactly the message text. `encode_chat` escapes the same way.
The normalizer is saved in `tokenizer.json` and the class is the generic `TokenizersBackend`, which
loads that file as it is, so `AutoTokenizer.from_pretrained` on a saved directory keeps both.

Differences from mistral-common to know about:
- text that starts with whitespace gets no extra leading "▁" from `tokenizer(text)`; the chat format
  never hits it, since the template writes a space before each message;
- plain `tokenizer(text)` (not the chat format) still turns `<s>`, `</s>`, `<unk>` in `text` into
  control tokens, as every transformers tokenizer does, and drops a TEXT_MARK that follows "<";
- transformers' `apply_chat_template(..., sanitize_control_tokens=True)` is not needed and not used:
  it splits the text around control-token spellings, which changes the BPE;
- template errors surface as jinja2's `TemplateError` (what transformers' `raise_exception` raises),
  with the same messages as the `ValueError`s of `validate_conversation`.
"""

import os
import re
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path

import sentencepiece
from tokenizers import normalizers
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase, TokenizersBackend

MODEL_MAX_LENGTH = 32768
ROLES = ("system", "user", "assistant")
CONTROL_TOKENS = ("<unk>", "<s>", "</s>")
TEXT_MARK = "\ufdd0"  # follows every "<" of message text in the rendered chat; the normalizer deletes it
ESCAPED_LT = "<" + TEXT_MARK

CHAT_TEMPLATE = (
    "{%- if messages | length == 0 %}"
    "{{- raise_exception('conversation is empty: expected at least one user message') }}"
    "{%- endif %}"
    "{%- set escaped_lt = '" + ESCAPED_LT + "' %}"
    "{%- set ns = namespace(system='', first_user=0) %}"
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- set where = 'message ' ~ loop.index0 ~ ': ' %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception(where ~ \"unknown role '\" ~ message['role'] ~ \"' (expected system, user or assistant)\") }}"
    "{%- endif %}"
    "{%- if message['content'] is not string %}"
    "{{- raise_exception(where ~ 'content must be a string') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'system' %}"
    "{%- if not loop.first %}"
    "{{- raise_exception(where ~ 'a system message is only allowed as the first message') }}"
    "{%- endif %}"
    "{%- set ns.system = message['content'] | replace('<', escaped_lt) %}"
    "{%- set ns.first_user = 1 %}"
    "{%- else %}"
    "{%- set expected = 'user' if (loop.index0 - ns.first_user) % 2 == 0 else 'assistant' %}"
    "{%- if message['role'] != expected %}"
    "{{- raise_exception(where ~ 'expected role ' ~ expected ~ ', got ' ~ message['role']"
    " ~ ' (roles must alternate user/assistant, starting with user, after an optional system message)') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- set system_prefix = ns.system ~ '\\n\\n' if loop.index0 == ns.first_user and ns.system else '' %}"
    "{{- ' [INST] ' ~ system_prefix ~ (message['content'] | replace('<', escaped_lt)) ~ ' [/INST]' }}"
    "{%- else %}"
    "{%- if message['content'] == '' %}"
    "{{- raise_exception(where ~ 'assistant content is empty') }}"
    "{%- endif %}"
    "{%- generation %}{{- ' ' ~ (message['content'] | replace('<', escaped_lt)) ~ eos_token }}{%- endgeneration %}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if messages | length == ns.first_user %}"
    "{{- raise_exception('conversation has no user message') }}"
    "{%- endif %}"
    "{%- if add_generation_prompt and messages[-1]['role'] == 'assistant' %}"
    "{{- raise_exception('message ' ~ (messages | length - 1) ~ ': add_generation_prompt needs the"
    " conversation to end with a user message, not an assistant message') }}"
    "{%- endif %}"
)


# What outputs carry for serving (`save_for_serving`): the same template without the training-only
# `{% generation %}` marks, a transformers extension that minijinja-based servers (TGI) and llama.cpp
# reject. It renders the same text; only `return_assistant_tokens_mask` needs the marks, and
# `load_tokenizer` puts the training template back on whatever it loads.
GENERATION_MARK = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")


def serving_template(template: str) -> str:
    """A chat template without its `{% generation %}` / `{% endgeneration %}` marks: the same text rendered."""
    return GENERATION_MARK.sub("", template)


SERVING_CHAT_TEMPLATE = serving_template(CHAT_TEMPLATE)


def save_for_serving(tokenizer: PreTrainedTokenizerBase, directory: str | os.PathLike) -> None:
    """`tokenizer.save_pretrained(directory)` with its chat template saved without the training marks
    (SERVING_CHAT_TEMPLATE for Mixtral-Instruct's)."""
    training_template = tokenizer.chat_template
    tokenizer.chat_template = serving_template(training_template)
    try:
        tokenizer.save_pretrained(directory)
    finally:
        tokenizer.chat_template = training_template


def load_tokenizer(path: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """The Mixtral tokenizer built offline from mistral-common (no `path`), or the one saved at `path`.

    Either way it pads on the right with `<unk>` when it has no pad token of its own (Mixtral has none).
    A saved tokenizer must keep message text that spells a control token as text (see the module
    docstring); one saved before that was so is refused with a ValueError naming the fix.
    """
    tokenizer = build_mixtral_tokenizer() if path is None else _load_saved_tokenizer(Path(path))
    if path is not None:
        require_text_safe_tokenizer(tokenizer, f"tokenizer at {path}")
    _prepare_for_training(tokenizer)
    return tokenizer


def build_mixtral_tokenizer() -> TokenizersBackend:
    """Mixtral's tokenizer from mistral-common's `tokenizer.model.v1`, with the Instruct-v0.1 chat template.

    transformers' `LlamaTokenizer` assembles the pipeline (BPE with byte fallback, "▁" metaspace, `<s>`
    added in front); the result is a generic `TokenizersBackend` with the TEXT_MARK normalizer added,
    because `LlamaTokenizer` rebuilds its pipeline without a normalizer when it is loaded again.
    """
    processor = sentencepiece.SentencePieceProcessor(model_proto=_mistral_common_v1_model_bytes())
    pieces = [processor.id_to_piece(piece_id) for piece_id in range(processor.get_piece_size())]
    pipeline = LlamaTokenizer(
        vocab={piece: piece_id for piece_id, piece in enumerate(pieces)},
        merges=_merges_in_score_order(processor),
        legacy=False,
        add_bos_token=True,
        add_eos_token=False,
    ).backend_tokenizer
    pipeline.normalizer = normalizers.Replace(ESCAPED_LT, "<")
    return TokenizersBackend(
        tokenizer_object=pipeline,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=MODEL_MAX_LENGTH,
        chat_template=CHAT_TEMPLATE,
    )


def require_text_safe_tokenizer(tokenizer: PreTrainedTokenizerBase, what: str = "tokenizer") -> None:
    """Raise ValueError unless `tokenizer` encodes escaped message text as that text (TEXT_MARK deleted)."""
    normalizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "normalizer", None)
    if normalizer is None or normalizer.normalize_str(ESCAPED_LT) != "<":
        raise ValueError(
            f"{what} would encode message text that spells <s>, </s> or <unk> as control tokens (saved by an "
            "older version): use load_tokenizer() (model.tokenizer=null), or re-save it with "
            "load_tokenizer().save_pretrained(PATH)"
        )


def _mistral_common_v1_model_bytes() -> bytes:
    return (resources.files("mistral_common") / "data" / "tokenizer.model.v1").read_bytes()


def _merges_in_score_order(processor: sentencepiece.SentencePieceProcessor) -> list[tuple[str, str]]:
    """Every (left, right) split of a normal piece into two normal pieces, ranked as SentencePiece merges.

    SentencePiece BPE merges the adjacent pair whose union has the highest score, the leftmost on ties.
    Only the whitespace-run pieces share a score; ranking their longer left parts first makes a run grow
    from its left end, as SentencePiece's leftmost-first tie-break does.
    """
    normal = {
        processor.id_to_piece(piece_id): processor.get_score(piece_id)
        for piece_id in range(processor.get_piece_size())
        if not (
            processor.is_control(piece_id) or processor.is_unknown(piece_id) or processor.is_byte(piece_id)
        )
    }
    ranked = [
        (-score, -split, piece[:split], piece[split:])
        for piece, score in normal.items()
        for split in range(1, len(piece))
        if piece[:split] in normal and piece[split:] in normal
    ]
    return [(left, right) for _, _, left, right in sorted(ranked)]


def _load_saved_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path does not exist: {path}")
    return AutoTokenizer.from_pretrained(path)


def _prepare_for_training(tokenizer: PreTrainedTokenizerBase) -> None:
    # Pad with <unk> (id 0), not </s>: collators drop pad ids from the labels, and with </s> as pad that
    # would also drop the </s> closing every assistant turn, so the model would never learn to stop.
    # Byte fallback means <unk> never occurs in real text, so pad positions stay unambiguous.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    # A tokenizer saved for serving has the template without `{% generation %}` marks: training masks need them.
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "right"  # training; switch to "left" for batched generation


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], add_generation_prompt: bool = False
) -> dict[str, list[int]]:
    """Token ids of a conversation in the Mixtral-Instruct format, and a 0/1 mask of its assistant tokens.

    The mask covers each assistant message's tokens and the `</s>` that closes it: the tokens an SFT loss
    should train on. Message text is encoded as text even where it spells a control token such as `</s>`
    (as mistral-common does), escaped as the chat template escapes it, so the ids are the template's.
    Expects a tokenizer from `load_tokenizer()` (ValueError otherwise).
    """
    validate_conversation(messages, add_generation_prompt)
    require_text_safe_tokenizer(tokenizer)
    input_ids = [tokenizer.bos_token_id]
    assistant_mask = [0]
    for text, is_assistant in _message_texts(messages):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if is_assistant:
            ids.append(tokenizer.eos_token_id)
        input_ids.extend(ids)
        assistant_mask.extend([int(is_assistant)] * len(ids))
    return {"input_ids": input_ids, "assistant_mask": assistant_mask}


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], add_generation_prompt: bool = False
) -> dict[str, list[int]]:
    """`encode_chat`'s ids and assistant mask in the tokenizer's chat template, whichever it is.

    Mixtral-Instruct's template (CHAT_TEMPLATE): `encode_chat`, the reference held to mistral-common.
    Any other (a user's `data.chat_template`): transformers' `apply_chat_template` with
    `return_assistant_tokens_mask=True`, which masks the tokens the template writes inside
    `{% generation %}` marks. Same conversation rules (`validate_conversation`) either way.
    """
    if tokenizer.chat_template == CHAT_TEMPLATE:
        return encode_chat(tokenizer, messages, add_generation_prompt)
    validate_conversation(messages, add_generation_prompt)
    encoded = tokenizer.apply_chat_template(
        list(messages),
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    return {"input_ids": list(encoded["input_ids"]), "assistant_mask": list(encoded["assistant_masks"])}


def _message_texts(messages: Sequence[dict]) -> Iterator[tuple[str, bool]]:
    """(text, is_assistant) for each user and assistant message, as the chat template writes them."""
    has_system = messages[0]["role"] == "system"
    system = _escaped(messages[0]["content"]) if has_system else ""
    for index, message in enumerate(messages):
        if message["role"] == "user":
            system_prefix = f"{system}\n\n" if index == int(has_system) and system else ""
            yield f" [INST] {system_prefix}{_escaped(message['content'])} [/INST]", False
        elif message["role"] == "assistant":
            yield f" {_escaped(message['content'])}", True


def _escaped(text: str) -> str:
    """Message text as the chat template writes it: no control-token spelling survives ("<" + TEXT_MARK)."""
    return text.replace("<", ESCAPED_LT)


def validate_conversation(messages: Sequence[dict], add_generation_prompt: bool = False) -> None:
    """Raise ValueError, naming the message index, unless `messages` is a valid Mixtral-Instruct chat.

    Valid: an optional system message first, then user and assistant messages alternating, starting
    with user; string contents; no empty assistant message. Same checks, same wording as the template.
    """
    if len(messages) == 0:
        raise ValueError("conversation is empty: expected at least one user message")
    first_user = 0
    for index, message in enumerate(messages):
        _check_message_shape(index, message)
        if message["role"] == "system":
            if index != 0:
                raise ValueError(f"message {index}: a system message is only allowed as the first message")
            first_user = 1
            continue
        expected = "user" if (index - first_user) % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(
                f"message {index}: expected role {expected}, got {message['role']} (roles must "
                "alternate user/assistant, starting with user, after an optional system message)"
            )
        if message["role"] == "assistant" and message["content"] == "":
            raise ValueError(f"message {index}: assistant content is empty")
    if len(messages) == first_user:
        raise ValueError("conversation has no user message")
    if add_generation_prompt and messages[-1]["role"] == "assistant":
        raise ValueError(
            f"message {len(messages) - 1}: add_generation_prompt needs the conversation to end with a user "
            "message, not an assistant message"
        )


def _check_message_shape(index: int, message: object) -> None:
    if not isinstance(message, dict):
        raise ValueError(f"message {index}: expected a dict with 'role' and 'content' keys")
    if message.get("role") not in ROLES:
        raise ValueError(
            f"message {index}: unknown role '{message.get('role')}' (expected system, user or assistant)"
        )
    if not isinstance(message.get("content"), str):
        raise ValueError(f"message {index}: content must be a string")
