"""The start-up lines of ``drt-run serve``, like vLLM's: the arguments that differ from
their defaults, the model's shape, max_model_len and the routes, logged once before the
server binds, so a log shows what a server was started as without the command line."""

from __future__ import annotations

import argparse
import logging
from typing import Any

SECRET_ARGS = frozenset({"api_key"})
"""Logged as '***': logs are read by more people than the key is meant for."""


def non_default_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """{dest: value} of every option of `parser` whose value in `args` is not its default
    (positionals included when given), secrets masked."""
    out = {}
    for action in parser._actions:  # argparse has no public list of a parser's options
        dest = action.dest
        if dest in (argparse.SUPPRESS, "help") or not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if value != parser.get_default(dest):
            out[dest] = "***" if dest in SECRET_ARGS and value else _readable(value)
    return out


def _readable(value: Any) -> Any:
    """Parsed values as a user would write them: a `Placement`'s one-line description, not
    its dataclass repr (hundreds of characters)."""
    describe = getattr(value, "describe", None)
    return describe() if callable(describe) else value


def model_summary(model_config: Any) -> str:
    """One line of the model's shape; '' when the engine exposes no model config."""
    if model_config is None:
        return ""
    c = model_config
    return (
        f"{c.name or c.architecture}: {c.architecture}, {c.num_layers} layers, hidden "
        f"{c.hidden_size}, {c.num_heads} heads ({c.num_kv_heads} KV) x {c.head_dim}, FFN "
        f"{c.intermediate_size}, vocab {c.vocab_size}, max positions "
        f"{c.max_position_embeddings}"
    )


def routes(app: Any) -> list[str]:
    """'METHODS /path' of every route of a FastAPI/Starlette app, in registration order."""
    out = []
    for route in app.routes:
        methods = sorted(getattr(route, "methods", None) or ()) or ["*"]
        out.append(f"{','.join(m for m in methods if m != 'HEAD') or 'GET'} {route.path}")
    return out


def log_startup(
    logger: logging.Logger,
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    engine: Any,
    app: Any,
) -> None:
    logger.info("non-default args: %s", non_default_args(args, parser))
    summary = model_summary(getattr(engine, "model_config", None))
    if summary:
        logger.info("model %s", summary)
    logger.info("served model name %r, max_model_len %d", _served_name(app, engine),
                engine.max_model_len)  # fmt: skip
    logger.info("routes: %s", ", ".join(routes(app)))


def _served_name(app: Any, engine: Any) -> str:
    serving = getattr(getattr(app, "state", None), "serving", None)
    return serving.model_name if serving is not None else engine.model_name
