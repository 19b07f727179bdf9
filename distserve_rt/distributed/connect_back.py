"""Peers that connect back: Ray actors (an instance, a rank of an instance spanning nodes)
start elsewhere and dial the process that placed them, naming themselves first.

`accept_named` takes one connection per expected name from a `Listener`, and never hangs:
a peer that ended before connecting is reported at once (its ``death_reason``), and one
that does not connect within the timeout is an error naming who is missing.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Collection, Hashable
from multiprocessing.connection import Connection, Listener
from typing import TypeVar

K = TypeVar("K", bound=Hashable)


def accept_named(
    listener: Listener,
    names: Collection[K],
    death_reason: Callable[[K], str | None],
    timeout_s: float,
    what: str,
) -> dict[K, Connection]:
    """One connection per name in ``names``: each peer sends its name as its first message.

    Args:
        listener: where the peers dial (closed by the caller, also on error).
        names: who must connect.
        death_reason: why that peer ended (None while it runs): checked while waiting.
        timeout_s: the wait for all of them.
        what: how errors call the peers, e.g. "instance" or "prefill-0: rank".

    Raises RuntimeError naming a peer that ended first, or a connection that failed or
    named no expected peer; TimeoutError naming the ones missing after ``timeout_s``.
    """
    expected = set(names)
    accepted: queue.Queue = queue.Queue()

    def accept() -> None:
        for _ in expected:
            try:
                conn = listener.accept()
                accepted.put((conn.recv(), conn))
            except (OSError, EOFError) as exc:  # closed by the caller, or a bad peer
                accepted.put((None, exc))
                return

    threading.Thread(target=accept, name=f"accept-{what}", daemon=True).start()
    deadline = time.monotonic() + timeout_s
    conns: dict[K, Connection] = {}
    while len(conns) < len(expected):
        try:
            name, conn = accepted.get(timeout=0.1)
        except queue.Empty:
            pending = [n for n in names if n not in conns]
            dead = [(n, why) for n in pending if (why := death_reason(n)) is not None]
            if dead:
                raise RuntimeError(f"{what} {dead[0][0]} failed to start: {dead[0][1]}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{what} {pending} placed but not connected back within {timeout_s:g} s"
                ) from None
            continue
        if name not in expected:
            raise RuntimeError(f"accepting the connections of {what} {sorted(expected)}: {conn}")
        conns[name] = conn
    return conns
