"""KV pools in POSIX shared memory, for the `shm` transport (CPU instances).

A region is a file under ``/dev/shm`` named ``drt_kv_<pid namespace>_<owner pid>_<random>``:
unique per instance, and the owner's pid lets a sweep tell live regions from leftovers. The
pid namespace (the inode of ``/proc/self/ns/pid``) is in the name because containers
started with ``--ipc=host`` share ``/dev/shm`` but not pids: another container's live
owner looks dead from here, so a sweep only judges regions of its own namespace. The pool
tensor is a view of ``torch.UntypedStorage.from_file(..., shared=True)``, so the mapping
lives exactly as long as some tensor uses it.

What is reclaimed when:

- ``close()``, garbage collection of the region, or normal interpreter exit (a
  ``weakref.finalize`` runs at exit): the name is unlinked. Memory returns to the system
  once every process that mapped it (the owner's tensors, peers' engines) unmapped it.
- The owner dies by a signal it cannot handle (SIGKILL, OOM killer) or by ``os._exit``: no
  code runs, the file stays in ``/dev/shm`` and keeps its memory. ``sweep_stale_regions()``
  unlinks regions whose owner pid is no longer alive; run it at start-up (the engine does).
  A recycled pid hides a leftover until that process exits too.
"""

from __future__ import annotations

import os
import secrets
import weakref
from pathlib import Path

import torch

SHM_DIR = Path("/dev/shm")
NAME_PREFIX = "drt_kv_"


def _pid_namespace() -> str:
    """This process's pid namespace id (digits; "0" where /proc does not say)."""
    try:
        link = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return "0"
    digits = "".join(c for c in link if c.isdigit())
    return digits or "0"


def region_glob(pid: int, prefix: str = NAME_PREFIX) -> str:
    """The ``/dev/shm`` name pattern of the regions `pid` (of this pid namespace) owns."""
    return f"{prefix}{_pid_namespace()}_{pid}_*"


def new_region_name(prefix: str = NAME_PREFIX) -> str:
    return f"{prefix}{_pid_namespace()}_{os.getpid()}_{secrets.token_hex(6)}"


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)  # already swept or closed: nothing left to reclaim


class SharedRegion:
    """One shared-memory file and its mapping in the owner process.

    Args:
        nbytes: size of the region (> 0).
        name: file name under ``/dev/shm``; default: a fresh unique name. An existing name
            is an error (FileExistsError), never reused.
    """

    def __init__(self, nbytes: int, name: str | None = None) -> None:
        if not isinstance(nbytes, int) or nbytes < 1:
            raise ValueError(f"nbytes must be a positive int, got {nbytes!r}")
        if not SHM_DIR.is_dir():
            raise RuntimeError(f"{SHM_DIR} does not exist; the shm transport needs POSIX shm")
        self.name = name or new_region_name()
        if "/" in self.name or not self.name:
            raise ValueError(f"name must be a plain file name, got {self.name!r}")
        self.path = SHM_DIR / self.name
        self.nbytes = nbytes
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        # Unlink from here on even if mapping fails, and at interpreter exit.
        self._finalizer = weakref.finalize(self, _unlink, self.path)
        try:
            os.ftruncate(fd, nbytes)  # tmpfs pages read as zeros until written
        finally:
            os.close(fd)
        self.storage = torch.UntypedStorage.from_file(str(self.path), shared=True, nbytes=nbytes)

    def as_tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous tensor over the region's start (it keeps the mapping alive)."""
        tensor = torch.empty(0, dtype=dtype)
        tensor.set_(self.storage, 0, shape)
        if tensor.numel() * tensor.element_size() > self.nbytes:
            raise ValueError(f"shape {shape} of {dtype} does not fit {self.nbytes} bytes")
        return tensor

    @property
    def is_linked(self) -> bool:
        return self._finalizer.alive

    def close(self) -> None:
        """Unlinks the name (peers can no longer open it; their transfers not yet started
        fail). Tensors over the region stay valid until freed. Idempotent."""
        self._finalizer()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process; past any pid's range
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def sweep_stale_regions(prefix: str = NAME_PREFIX) -> list[str]:
    """Unlinks ``/dev/shm/<prefix><namespace>_<pid>_*`` files of this pid namespace whose
    owner pid is not alive; returns the names removed. Regions of live processes, and of
    other pid namespaces (whose pids mean nothing here), are never touched."""
    removed = []
    namespace = _pid_namespace()
    for path in SHM_DIR.glob(f"{prefix}{namespace}_*"):
        pid_part = path.name[len(prefix) + len(namespace) + 1 :].split("_", 1)[0]
        if not pid_part.isdigit() or _pid_alive(int(pid_part)):
            continue
        try:
            path.unlink()
            removed.append(path.name)
        except FileNotFoundError:  # another sweeper was first
            pass
    return removed
