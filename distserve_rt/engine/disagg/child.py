"""The parent's end of one child (a disaggregated instance or a data-parallel replica): a
spawned process, or a thread for fast tests, and the pipe between them."""

from __future__ import annotations

import multiprocessing
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection

from distserve_rt.engine.disagg.messages import Fatal, Shutdown
from distserve_rt.engine.disagg.pipe_sender import PipeSender

# The exit status of a spawned child that, while re-importing the parent's main module, was
# asked to start children itself: the parent turns it into MAIN_GUARD_MISSING.
MAIN_REIMPORT_EXIT = 87
MAIN_GUARD_MISSING = (
    'the script that created the engine has no `if __name__ == "__main__":` guard; '
    "the spawn start method re-imports the main module in every instance process, which "
    "created the engine again there: put the engine's creation under the guard"
)


class ChildHandle:
    """Starts ``target(spec, conn[, True])`` and owns the parent's end of its pipe."""

    def __init__(
        self,
        target: Callable[..., None],
        spec: object,
        name: str,
        *,
        in_process: bool,
        daemon: bool,
        sender_name: str,
    ) -> None:
        parent, child = multiprocessing.Pipe(duplex=True)
        self.conn: Connection = parent
        self._process: multiprocessing.process.BaseProcess | None = None
        self._thread: threading.Thread | None = None
        if in_process:
            self._thread = threading.Thread(
                target=target, args=(spec, child, True), name=name, daemon=True
            )
            self._thread.start()
        else:
            if getattr(multiprocessing.current_process(), "_inheriting", False):
                # We are a spawned child re-importing an unguarded main script: exit
                # quietly with a status the parent names, instead of multiprocessing's
                # 30-line RuntimeError per child and an EOFError in the parent.
                raise SystemExit(MAIN_REIMPORT_EXIT)
            # ``daemon`` must be False for a child that starts children of its own (TP x PP
            # workers: they exit with it, their pipes to it close).
            ctx = multiprocessing.get_context("spawn")
            self._process = ctx.Process(
                target=_run_child, args=(target, spec, child), name=f"drt-{name}", daemon=daemon
            )
            self._process.start()
            child.close()  # only the child holds it now: its death closes the pipe
        self._sender = PipeSender(self.conn, sender_name)
        self.alive = True

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def sentinel(self) -> int | None:
        """Readable when the process has exited (None for a thread)."""
        return None if self._process is None else self._process.sentinel

    def is_running(self) -> bool:
        if self._process is not None:
            return self._process.is_alive()
        return self._thread is not None and self._thread.is_alive()

    def recv(self) -> object:
        """The next message, or the EOFError/OSError of a pipe whose child died."""
        try:
            return self.conn.recv()
        except (EOFError, OSError) as exc:
            return exc

    def describe_start_failure(self, reply: object) -> str:
        """Why the child sent ``reply`` instead of Ready, for the start-up error."""
        if isinstance(reply, (EOFError, OSError)) and self._process is not None:
            self._process.join(5.0)  # its pipe closed: it is exiting, the status tells why
            if self._process.exitcode == MAIN_REIMPORT_EXIT:
                return MAIN_GUARD_MISSING
        return describe_reply(reply)

    def send(self, message: object) -> bool:
        """Sends unless the child is dead; False when it could not (never blocks)."""
        return self.alive and self._sender.send(message)

    def stop(self, timeout_s: float) -> None:
        """Joins the child (after Shutdown was sent), killing a process that hangs."""
        self.alive = False
        self._sender.close(timeout_s)
        if self._process is not None:
            self._process.join(timeout_s)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout_s)
        elif self._thread is not None:
            self._thread.join(timeout_s)
        self.conn.close()


def stop_children(handles: list[ChildHandle], timeout_s: float = 10.0) -> None:
    """Asks every child to shut down, then joins each (killing one that hangs)."""
    for handle in handles:
        handle.send(Shutdown())
    for handle in handles:
        handle.stop(timeout_s)


def _run_child(target: Callable[..., None], spec: object, conn: Connection) -> None:
    """A spawned child's entry. Ctrl-C in a terminal sends SIGINT to the whole process
    group: the parent stops its children in order (Shutdown), so a child ignores it rather
    than die mid-step with a KeyboardInterrupt traceback. Its own children inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    target(spec, conn)


def describe_reply(reply: object) -> str:
    """A start-up reply that is not Ready, for the error message."""
    return reply.error if isinstance(reply, Fatal) else repr(reply)
