"""The chat format a run trains in: Mixtral-Instruct's (the default), a shipped template, or the user's.

`data.chat_template` is one of
  null           Mixtral-8x7B-Instruct-v0.1's format (mixtral_model/tokenizer.py, held to mistral-common);
  a name         a template shipped in configs/chat_templates/ (`chatml`, `zephyr`);
  a file path    a Jinja chat template file (`.jinja`, `.j2`, or any existing file);
  a string       an inline Jinja chat template.

A template of ours or the user's marks the tokens an assistant-only loss trains on with TRL's
`{% generation %}` ... `{% endgeneration %}` convention; transformers' `apply_chat_template(...,
return_assistant_tokens_mask=True)` turns the marks into the loss mask (`encode_conversation`).
`data.chat_template_tokens` lists the tokens the template needs that the vocabulary lacks (null: the
shipped template's own, e.g. ChatML's `<|im_start|>`/`<|im_end|>`); they are added as special tokens
and the model's embeddings are resized to the tokenizer (model_factory.build_model). The token that
closes an assistant turn inside the marks becomes the tokenizer's eos token, as TRL's
`clone_chat_template` does, so generation stops where training taught the model to stop.
"""

from pathlib import Path

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from mixtral_tune.shipped import CONFIG_DIR

TEMPLATE_DIR = CONFIG_DIR / "chat_templates"
# Tokens each shipped template needs beyond Mixtral's 32000 (added as special tokens).
SHIPPED_TOKENS = {"chatml": ("<|im_start|>", "<|im_end|>"), "zephyr": ()}
TEMPLATE_FILE_SUFFIXES = (".jinja", ".j2")
PROBE = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
]


class ChatTemplateError(ValueError):
    """A chat template a user can fix: one line naming data.chat_template and the fix."""


def shipped_templates() -> dict[str, Path]:
    """Name -> file of every template in configs/chat_templates/."""
    return {path.stem: path for path in sorted(TEMPLATE_DIR.glob("*.jinja"))}


def is_inline(value: str) -> bool:
    return "{{" in value or "{%" in value


def template_text(value: str) -> str:
    """The Jinja text `data.chat_template=value` names (shipped name, file, or the inline string itself)."""
    if is_inline(value):
        return value
    shipped = shipped_templates()
    if value in shipped:
        return shipped[value].read_text(encoding="utf-8")
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if path.suffix in TEMPLATE_FILE_SUFFIXES or "/" in value:
        raise ChatTemplateError(f"data.chat_template={value}: no such file; fix the path")
    raise ChatTemplateError(
        f"data.chat_template={value} is not a shipped template ({', '.join(shipped)}), a template file or "
        "a Jinja string: pick one, or null for Mixtral-Instruct's format"
    )


def template_tokens(data_cfg) -> list[str]:
    """The tokens the run's template adds: data.chat_template_tokens, or the shipped template's own."""
    if data_cfg.chat_template_tokens is not None:
        return list(data_cfg.chat_template_tokens)
    return list(SHIPPED_TOKENS.get(data_cfg.chat_template or "", ()))


def use_chat_template(tokenizer: PreTrainedTokenizerBase, data_cfg) -> list[int]:
    """Put the run's chat template on `tokenizer` (from `load_tokenizer()`), add the tokens it needs,
    and return their ids (empty for Mixtral-Instruct's format). ChatTemplateError for a template that
    does not render, or (for assistant-only SFT losses) whose marks do not end on a stop token."""
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    if data_cfg.chat_template is None:
        return []
    tokens = template_tokens(data_cfg)
    tokenizer.add_tokens(tokens, special_tokens=True)
    tokenizer.chat_template = template_text(data_cfg.chat_template)
    try:
        probe = tokenizer.apply_chat_template(
            PROBE, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
    except TemplateError as error:
        raise ChatTemplateError(f"data.chat_template does not render a conversation: {error}") from None
    if has_generation_markers(tokenizer.chat_template):
        if not is_chat_template_stop_token_trained(tokenizer):
            raise ChatTemplateError(
                "data.chat_template: the {% generation %} span of an assistant message must end on the token "
                "that closes the turn (e.g. eos_token or <|im_end|>), or the model never learns to stop; "
                "move it inside the span (add it to data.chat_template_tokens if the vocabulary lacks it)"
            )
        # The turn's closing token (the last trained non-blank token) is what generation stops on.
        trained = [t for t, m in zip(probe["input_ids"], probe["assistant_masks"], strict=True) if m]
        stop = next(t for t in reversed(trained) if tokenizer.decode([t]).strip())
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(stop)
    return tokenizer.convert_tokens_to_ids(tokens)
