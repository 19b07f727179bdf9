"""`PipeSender`: sends on a pipe from a background thread, so its owner never blocks.

The controller and each instance are single-threaded loops that both write to the pipe
between them. With blocking sends, once a burst fills both directions' buffers (the
controller queueing thousands of requests while the instance reports finished prefills),
each side waits in ``send`` for the other to read and neither does: a permanent hang. A
sender thread per end keeps every loop reading. Messages keep their order (one thread,
one queue); a send after the pipe broke returns False, as the peer is gone.
"""

from __future__ import annotations

import queue
import threading
from multiprocessing.connection import Connection

_STOP = object()


class PipeSender:
    def __init__(self, conn: Connection, name: str) -> None:
        self._conn = conn
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        """Why the pipe stopped taking messages (the peer closed it); None while it works."""
        self._thread = threading.Thread(target=self._run, name=f"{name}-sender", daemon=True)
        self._thread.start()

    def send(self, message: object) -> bool:
        """Queues `message`; False when the pipe already failed (the peer is gone)."""
        if self.error is not None:
            return False
        self._queue.put(message)
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Sends what is queued (up to `timeout_s`), then stops the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            message = self._queue.get()
            if message is _STOP:
                return
            try:
                self._conn.send(message)
            except (OSError, EOFError, ValueError) as exc:  # closed or broken pipe
                self.error = exc
                return
