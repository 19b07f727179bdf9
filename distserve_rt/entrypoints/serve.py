"""`drt-run serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn) over the engine.

Binds 127.0.0.1 unless ``--host`` says otherwise. ``--api-key`` (or the ``DRT_API_KEY``
environment variable) makes /v1/* require ``Authorization: Bearer <key>``. On SIGINT or
SIGTERM uvicorn stops accepting connections, lets open ones finish for up to
``--shutdown-timeout`` seconds, and then the engine is shut down.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import ipaddress
import logging
import os
import signal
import threading
from typing import TYPE_CHECKING

from distserve_rt.engine.protocol import EngineClient
from distserve_rt.entrypoints import engine_args, startup_log
from distserve_rt.entrypoints.model_tag import add_model_tag
from distserve_rt.logger import init_logger

if TYPE_CHECKING:
    import uvicorn

logger = init_logger(__name__)

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# Only serving needs these: the parser, `serve --help` and every other command work without
# them (the GPU machine has none of them), so they are imported when a server is built.
SERVER_PACKAGES = ("fastapi", "uvicorn")


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port in [0, 65535], got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port in [0, 65535], got {value}")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_model_tag(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=port_number, default=8000, help="(default: %(default)s)")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer <key>' on /v1/* (default: $DRT_API_KEY, or none)",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the name clients put in 'model' (default: the engine's model name)",
    )
    p.add_argument(
        "--max-concurrent-requests",
        type=engine_args.positive_int,
        default=None,
        help="generation requests in flight at most; more get 429 (default: no limit)",
    )
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="seconds open requests get to finish on shutdown (default: %(default)s)",
    )
    engine_args.add_engine_args(p)
    p.set_defaults(handler=run)


def serve_parser() -> argparse.ArgumentParser:
    """A fresh ``serve`` parser: its defaults are what the start-up log compares with."""
    sub = argparse.ArgumentParser(prog="drt-run").add_subparsers()
    add_parser(sub)
    return sub.choices["serve"]


def resolve_api_key(args: argparse.Namespace) -> str | None:
    return args.api_key or os.environ.get("DRT_API_KEY") or None


def build_server(engine: EngineClient, args: argparse.Namespace) -> uvicorn.Server:
    """The uvicorn server for `engine` with the serve flags (it does not run yet)."""
    import uvicorn

    from distserve_rt.entrypoints.openai import build_app

    api_key = resolve_api_key(args)
    if api_key is None and not _is_loopback(args.host):
        logger.warning(
            "serving on %s without an API key: anyone who can reach it can use the model "
            "(set --api-key or DRT_API_KEY)",
            args.host,
        )
    app = build_app(
        engine,
        api_key=api_key,
        served_model_name=args.served_model_name,
        max_concurrent=args.max_concurrent_requests,
    )
    # Once per server, before it binds: what it was started as (vLLM logs the same).
    startup_log.log_startup(logger, args, serve_parser(), engine, app)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.shutdown_timeout,
        lifespan="off",
    )
    return uvicorn.Server(config)


def run_server(server: uvicorn.Server, engine: EngineClient) -> int:
    """Serves until SIGINT/SIGTERM (or ``server.should_exit``), then shuts the engine
    down, also when serving failed."""
    try:
        with _stop_signals_end_the_run():
            server.run()
    except _StopRequested:
        pass  # the signal's graceful shutdown has run: a requested stop is a normal end
    finally:
        shutdown = getattr(engine, "shutdown", None)
        if shutdown is None:
            logger.warning("%s has no shutdown(); nothing to stop", type(engine).__name__)
        else:
            shutdown()
    # uvicorn reports a failed bind by exiting its loop without raising.
    return 0 if server.started else 1


class _StopRequested(Exception):
    """SIGINT or SIGTERM after uvicorn's graceful shutdown."""


@contextlib.contextmanager
def _stop_signals_end_the_run():
    """uvicorn re-raises the SIGINT/SIGTERM it caught once it has shut down, to the handlers
    it found: by default a KeyboardInterrupt (a traceback, exit 130) and a kill by SIGTERM
    (the engine's shutdown skipped). These handlers turn both into `_StopRequested`."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers (tests run servers in threads)
        return

    def stop(signum, frame):
        raise _StopRequested(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def missing_server_packages() -> list[str]:
    missing = []
    for name in SERVER_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def run(args: argparse.Namespace) -> int:
    # Before the engine is built: loading a model only to fail at the import is minutes lost.
    if missing := missing_server_packages():
        raise SystemExit(
            f"drt-run serve: the HTTP server needs {', '.join(missing)}, not installed here "
            f"(pip install {' '.join(missing)}); the other drt-run commands work without them"
        )
    logging.getLogger("distserve_rt").setLevel(args.log_level.upper())
    try:
        engine = engine_args.build_engine_client(args)
    except ValueError as exc:
        raise SystemExit(f"drt-run serve: {exc}") from None
    return run_server(build_server(engine, args), engine)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
