"""`drt-run`: the command-line entry point.

Only the chosen command's module is imported and only its parser built: the modules import
torch, the engine or the planner, and loading all of them made ``drt-run --help`` take ~3 s.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

# Command -> (module of distserve_rt.entrypoints, the one line `drt-run --help` shows), in
# the order it lists them. Each module has add_parser(subparsers), which registers its
# commands (without help=: the line is written once, here) and their handlers.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("serve", "OpenAI-compatible HTTP server"),
    "generate": ("generate", "generate text for a few prompts"),
    "bench": (
        "bench_serving",
        "serving benchmark: latency, SLO attainment, goodput (in-process or HTTP)",
    ),
    "bench-plot": ("bench_serving", "overlay drt-run bench results: SLO attainment vs rate (PNG)"),
    "plan": ("plan", "search the placement with the best per-device goodput"),
    "simulate": ("simulate", "simulate one configuration at one or more rates"),
    "profile": ("profile", "measure step times on this machine and fit a latency profile"),
    "bench-ops": ("bench_ops", "run the op microbenchmarks (CPU) and print a table"),
}


class _LazyCommands(argparse._SubParsersAction):
    """Subcommands registered as empty placeholders (enough for the listing and for
    argparse's choice check); the chosen one's module replaces its placeholder with the real
    parser when the command is parsed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._loaded: set[str] = set()

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        kwargs.setdefault("help", COMMANDS[name][1])
        old = self._name_parser_map.pop(name, None)
        if old is None:
            return super().add_parser(name, **kwargs)
        # Keep the listing's order: the new choice entry takes the placeholder's slot.
        slot = next(i for i, a in enumerate(self._choices_actions) if a.dest == name)
        del self._choices_actions[slot]
        parser = super().add_parser(name, **kwargs)
        self._choices_actions.insert(slot, self._choices_actions.pop())
        return parser

    def load(self, name: str) -> None:
        module = COMMANDS[name][0]
        if module not in self._loaded:
            self._loaded.add(module)
            importlib.import_module(f"distserve_rt.entrypoints.{module}").add_parser(self)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        self.load(values[0])
        super().__call__(parser, namespace, values, option_string)


def build_parser(*, load_all: bool = False) -> argparse.ArgumentParser:
    """The `drt-run` parser; ``load_all`` builds every command's parser up front (tests that
    walk them), else each is built when chosen."""
    parser = argparse.ArgumentParser(
        prog="drt-run", description="distserve_rt: disaggregated prefill/decode LLM serving"
    )
    parser.register("action", "lazy_commands", _LazyCommands)
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", action="lazy_commands"
    )
    for name in COMMANDS:
        sub.add_parser(name)
    if load_all:
        for name in COMMANDS:
            sub.load(name)
    return parser


# Exit status of a run stopped by Ctrl-C: the shell convention, 128 + SIGINT.
EXIT_INTERRUPTED = 130

# Commands that build an engine, so import torch and the native kernels.
ENGINE_COMMANDS = ("serve", "generate", "bench", "profile")


def import_native_modules_uninterrupted() -> None:
    """Imports torch and our native module with SIGINT blocked. A Ctrl-C while torch's
    pybind11 extensions initialise aborted the interpreter ("terminate called after throwing
    an instance of 'pybind11::error_already_set' ... KeyboardInterrupt") or killed it by
    SIGINT with no exit status of ours (measured: ~1 in 10 Ctrl-Cs 0.6-0.8 s into
    `drt-run serve`). Blocked, the signal stays pending and arrives as a KeyboardInterrupt
    once the imports are done, which main() turns into its one line and exit 130."""
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread receives signals (and tests call main() in threads)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        importlib.import_module("torch")
        importlib.import_module("distserve_rt._C")
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def main(argv: list[str] | None = None) -> int:
    """Runs one command. Any exception it ends in becomes one line on stderr
    (``drt-run COMMAND: message``) and exit status 1, Ctrl-C exit status 130; with
    DRT_LOG_LEVEL=DEBUG the exception propagates with its traceback instead."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if any(a in ENGINE_COMMANDS for a in argv[:1]) and "--help" not in argv:
            import_native_modules_uninterrupted()
        args = build_parser().parse_args(argv)  # parsing imports the command's module
        return int(args.handler(args) or 0)
    except (KeyboardInterrupt, Exception) as exc:
        if os.environ.get("DRT_LOG_LEVEL", "").upper() == "DEBUG":
            raise
        print(f"{_command(argv)}: {error_line(exc)}", file=sys.stderr)
        return EXIT_INTERRUPTED if isinstance(exc, KeyboardInterrupt) else 1


def error_line(exc: BaseException) -> str:
    """``exc`` as one line. Errors users cause and can fix (ValueError, OSError, a timeout)
    carry a message written for them; anything else is named by its type, so a bug reads
    as one and the hint says how to see where it happened."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (ValueError, OSError, RuntimeError)):
        return text
    return f"{type(exc).__name__}: {text} (DRT_LOG_LEVEL=DEBUG shows the traceback)"


def _command(argv: list[str]) -> str:
    """``drt-run COMMAND``, the prefix of the error line (the first argument naming one)."""
    name = next((a for a in argv if a in COMMANDS), None)
    return "drt-run" if name is None else f"drt-run {name}"


if __name__ == "__main__":
    sys.exit(main())
