"""The optional positional MODEL of ``drt-run serve MODEL``, as ``vllm serve MODEL`` takes
it; ``--model`` (an `EngineConfig` flag of `engine_args`) still works, and giving both with
different values is refused rather than one silently winning."""

from __future__ import annotations

import argparse


def add_model_tag(p: argparse.ArgumentParser) -> None:
    """The optional positional MODEL of ``vllm serve MODEL`` (``--model`` still works)."""
    p.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="the model, as --model: a local directory, a hub id in the local Hugging Face "
        "cache (org/name) or dummy:<preset>",
    )


def merge_model_tag(args: argparse.Namespace) -> None:
    """Moves the positional MODEL into ``args.model``; ValueError when ``--model`` names
    another one (which of the two was meant cannot be guessed)."""
    tag = getattr(args, "model_tag", None)
    if tag is None:
        return
    if getattr(args, "model", None) not in (None, tag):
        raise ValueError(
            f"MODEL {tag} and --model {args.model} name different models; give one of them"
        )
    args.model = tag
