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

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

Message = Mapping[str, str]


@runtime_checkable
class Tokenizer(Protocol):
    bos_token_id: int | None
    eos_token_id: int | None
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(
        self, messages: Sequence[Message], add_generation_prompt: bool = True
    ) -> str: ...


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
