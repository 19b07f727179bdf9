"""Status, waiting and totals of the native transfer engines (``_C.ShmTransferEngine``,
``_cuda.IpcTransferEngine``): both keep one record per transfer and answer with
``(state, error, num_bytes, seconds)`` tuples; this turns them into the Python types."""

from __future__ import annotations

from distserve_rt.transfer.base import TransferHandle, TransferResult, TransferStats, TransferStatus


def _finish(engine: object, handle: TransferHandle, snapshot: tuple) -> TransferStatus:
    state, error, num_bytes, seconds = snapshot
    status = TransferStatus(state)
    if status.is_final:
        handle.result = TransferResult(status, error, num_bytes, seconds)
        handle.keepalive = ()  # the copy is over: pools and mappings may go
        engine.release(handle.transfer_id)  # type: ignore[attr-defined]
    return status


def poll(engine: object, handle: TransferHandle) -> TransferStatus:
    if handle.result is not None:
        return handle.result.status
    return _finish(engine, handle, engine.poll(handle.transfer_id))  # type: ignore[attr-defined]


def wait(engine: object, handle: TransferHandle, timeout_s: float) -> TransferStatus:
    if handle.result is not None:
        return handle.result.status
    if not timeout_s >= 0:  # also rejects NaN
        raise ValueError(f"timeout_s must be >= 0 seconds, got {timeout_s!r}")
    snapshot = engine.wait(handle.transfer_id, float(timeout_s))  # type: ignore[attr-defined]
    return _finish(engine, handle, snapshot)


def stats(engine: object) -> TransferStats:
    return TransferStats(*engine.stats())  # type: ignore[attr-defined]
