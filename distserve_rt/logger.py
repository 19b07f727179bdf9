"""One `distserve_rt` logger for the whole package.

The level comes from DRT_LOG_LEVEL (default INFO). A handler is attached only when the
embedding application has configured none on our logger and DRT_CONFIGURE_LOGGING is not 0,
so servers that embed us keep their own handlers and formats.
"""

from __future__ import annotations

import logging
import os

_ROOT = "distserve_rt"
_configured = False


def _configure() -> None:
    global _configured
    _configured = True
    root = logging.getLogger(_ROOT)
    root.setLevel(os.environ.get("DRT_LOG_LEVEL", "INFO").upper())
    if os.environ.get("DRT_CONFIGURE_LOGGING", "1") == "0" or root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(levelname)s %(asctime)s %(name)s] %(message)s", "%m-%d %H:%M:%S")
    )
    root.addHandler(handler)
    root.propagate = False


def init_logger(name: str) -> logging.Logger:
    """Logger for a module: `init_logger(__name__)`."""
    if not _configured:
        _configure()
    return logging.getLogger(name)
