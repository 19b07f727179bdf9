"""The `Tokenizer` protocol the engine and server use, and chat-template rendering.

Chat templates: a model's own Jinja template (``tokenizer_config.json``'s ``chat_template``
or a ``chat_template.jinja`` file) is rendered with jinja2 in a sandbox, as transformers
does. A model without one gets `DEFAULT_CHAT_TEMPLATE`::

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n ... <|assistant|>\\n

(one ``<|role|>`` line and the content per message, then the assistant header when
``add_generation_prompt``). It is a plain format, not what any real model was trained on:
give instruction-tuned models their own template.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

Message = Mapping[str, str]


@runtime_checkable
class Tokenizer(Protocol):
    bos_token_id: int | None
    eos_token_id: int | None
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    chat_template: str | None
    """The Jinja chat template; None renders `DEFAULT_CHAT_TEMPLATE`."""

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        *,
        tokenize: bool = False,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> str | list[int]: ...


def load_chat_template(value: str) -> str:
    """A ``--chat-template``/``chat_template=`` value as a template: the text of the file it
    names, else the value itself when it is Jinja (holds ``{{`` or ``{%``), as vLLM reads it.
    FileNotFoundError when it is neither."""
    path = Path(value)
    with contextlib.suppress(OSError):  # a long inline template is no valid path
        if path.is_file():
            return path.read_text(encoding="utf-8")
    if "{{" in value or "{%" in value:
        return value
    raise FileNotFoundError(
        f"chat_template {value!r} is neither a file nor a Jinja template (inline templates "
        "hold '{{' or '{%')"
    )


def chat_template_output(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    add_generation_prompt: bool,
    tokenize: bool,
    chat_template: str | None,
    continue_final_message: bool,
    special_tokens: Mapping[str, Any],
    template_kwargs: Mapping[str, Any],
) -> str | list[int]:
    """`Tokenizer.apply_chat_template` for every tokenizer, with transformers' meaning:
    `chat_template` replaces the tokenizer's; ``tokenize=True`` returns the rendered text's
    ids without added special tokens (the template writes them), False the text (the
    default here, unlike transformers: the engine's callers want the text);
    `continue_final_message` ends the text at the last message's content, so the model
    continues it (it excludes `add_generation_prompt`)."""
    if not isinstance(tokenize, bool):
        raise ValueError(f"tokenize must be True or False, got {tokenize!r}")
    if continue_final_message and add_generation_prompt:
        raise ValueError(
            "continue_final_message=True continues the last message; it needs "
            "add_generation_prompt=False"
        )
    template = chat_template if chat_template is not None else tokenizer.chat_template
    if template is None:
        if template_kwargs:
            raise ValueError(
                f"chat template variables {sorted(template_kwargs)} need a Jinja template; "
                "this tokenizer has none (pass chat_template=)"
            )
        text = render_default_template(messages, add_generation_prompt)
    else:
        text = render_jinja_template(
            template, messages, add_generation_prompt, {**special_tokens, **template_kwargs}
        )
    if continue_final_message:
        text = _cut_after_final_message(text, messages)
    return tokenizer.encode(text, add_special_tokens=False) if tokenize else text


def _cut_after_final_message(text: str, messages: Sequence[Message]) -> str:
    """transformers' continue_final_message: the text up to the end of the last message's
    (stripped) content, dropping what the template writes after it (end-of-turn tokens)."""
    if not messages:
        raise ValueError("continue_final_message=True needs at least one message")
    final = str(messages[-1]["content"]).strip()
    at = text.rfind(final)
    if not final or at < 0:
        raise ValueError(
            "continue_final_message=True: the template does not write the last message's "
            "content verbatim, so the text cannot end there"
        )
    return text[: at + len(final)]


def check_messages(messages: Sequence[Message]) -> None:
    """Chat messages are mappings with string "role" and "content"; ValueError otherwise."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(
            f"messages must be a list of {{'role', 'content'}} dicts, got {messages!r}"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(
                f"messages[{i}] must be a dict with 'role' and 'content', got {message!r}"
            )
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ValueError(
                    f"messages[{i}][{key!r}] must be a string, got {message.get(key)!r}"
                )


def render_default_template(messages: Sequence[Message], add_generation_prompt: bool) -> str:
    check_messages(messages)
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""`render_default_template` as Jinja, for servers that report the template in use."""


def render_jinja_template(
    template: str,
    messages: Sequence[Message],
    add_generation_prompt: bool,
    special_tokens: Mapping[str, Any],
) -> str:
    """Renders a HF chat template (sandboxed jinja2, trim_blocks and lstrip_blocks as
    transformers sets them). ImportError with the fix when jinja2 is not installed."""
    check_messages(messages)
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as exc:
        raise ImportError(
            "this model's chat template needs jinja2 (pip install jinja2>=3.1)"
        ) from exc

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)
    return compiled.render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **special_tokens
    )
