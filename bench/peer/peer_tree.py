"""Peak memory of a whole process tree, sampled from /proc (stdlib only).

Both engines spread over several processes (vLLM: API server, EngineCore, worker; ours:
controller plus one process per disaggregated instance), so the peak RSS of the top process
alone would flatter whichever engine keeps less in it. The sampler walks the tree from a
root pid every ``interval_s`` and sums VmRSS over it; it also sums PSS (proportional set
size, shared pages split between their users) every ``pss_every`` samples, because the
RSS sum counts torch's shared libraries once per process and so penalises more processes.

The kernel here has no ``/proc/<pid>/task/<tid>/children`` (CONFIG_PROC_CHILDREN), so
children are found by scanning ``/proc/*/stat`` for the parent pid when that file is absent.
psutil is not needed: it is absent from the project's environment.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")


def parent_pid(stat_text: str) -> int:
    """The ppid field of a /proc/<pid>/stat line (the command name may hold spaces and ')')."""
    return int(stat_text[stat_text.rindex(")") + 2 :].split()[1])


def _children_from_task_files(pid: int) -> list[int] | None:
    """Children listed by the kernel, or None where it has no ``children`` files."""
    try:
        tasks = list((PROC / str(pid) / "task").iterdir())
    except OSError:
        return []
    kids: list[int] = []
    for task in tasks:
        try:
            kids += [int(x) for x in (task / "children").read_text().split()]
        except FileNotFoundError:
            return None
        except OSError:
            continue
    return kids


def _parent_map() -> dict[int, list[int]]:
    """parent pid -> child pids, from one scan of /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = parent_pid((entry / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue  # exited between listing and reading
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def tree_pids(root: int) -> list[int]:
    """`root` and all its live descendants (root first); [] when root has exited."""
    if not (PROC / str(root)).exists():
        return []
    if _children_from_task_files(root) is None:
        by_parent = _parent_map()
        kids_of = lambda pid: by_parent.get(pid, [])
    else:
        kids_of = lambda pid: _children_from_task_files(pid) or []
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid not in pids:
            pids.append(pid)
            todo += kids_of(pid)
    return pids


def _status_kib(pid: int, key: str, name: str = "status") -> int | None:
    try:
        text = (PROC / str(pid) / name).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None  # a zombie has no VmRSS


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (0 once it has exited)."""
    return (_status_kib(pid, "VmRSS") or 0) * 1024


def pss_bytes(pid: int) -> int | None:
    """Proportional set size (None where smaps_rollup cannot be read)."""
    kib = _status_kib(pid, "Pss", "smaps_rollup")
    return None if kib is None else kib * 1024


@dataclass
class TreeMemory:
    """What a sampler saw: peaks over the tree, in bytes."""

    peak_rss_bytes: int = 0
    peak_pss_bytes: int = 0
    peak_num_processes: int = 0
    samples: int = 0
    seen_pids: set[int] = field(default_factory=set)

    def as_dict(self) -> dict[str, object]:
        return {
            "peak_rss_tree_bytes": self.peak_rss_bytes,
            "peak_rss_tree_mib": round(self.peak_rss_bytes / 2**20, 1),
            "peak_pss_tree_bytes": self.peak_pss_bytes or None,
            "peak_pss_tree_mib": round(self.peak_pss_bytes / 2**20, 1) or None,
            "peak_num_processes": self.peak_num_processes,
            "samples": self.samples,
        }


class TreeSampler:
    """Samples the memory of `root_pid`'s process tree on a daemon thread until stopped.

    ``with TreeSampler(proc.pid) as s: ...`` then ``s.memory``; ``reset_peak()`` starts the
    peaks over (e.g. after a server's start-up, to keep only the serving runs).
    """

    # 250 ms: scanning /proc every 50 ms took ~15% of a core, which slows engines that run
    # 2 threads on a 2-core machine (their parallel regions wait for the preempted thread).
    def __init__(self, root_pid: int, interval_s: float = 0.25, pss_every: int = 8):
        self.root_pid = root_pid
        self.interval_s = interval_s
        self.pss_every = max(1, pss_every)
        self.memory = TreeMemory()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-sampler", daemon=True)

    def __enter__(self) -> TreeSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> TreeMemory:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        return self.memory

    def reset_peak(self) -> TreeMemory:
        """Returns the peaks so far and starts new ones (the pids seen are kept)."""
        with self._lock:
            old, self.memory = self.memory, TreeMemory(seen_pids=set(self.memory.seen_pids))
        return old

    def sample_once(self) -> None:
        pids = tree_pids(self.root_pid)
        rss = sum(rss_bytes(p) for p in pids)
        with self._lock:
            m = self.memory
            pss = None
            if m.samples % self.pss_every == 0:
                values = [pss_bytes(p) for p in pids]
                pss = sum(v for v in values if v is not None) if pids else None
            m.samples += 1
            m.seen_pids.update(pids)
            m.peak_rss_bytes = max(m.peak_rss_bytes, rss)
            m.peak_num_processes = max(m.peak_num_processes, len(pids))
            if pss:
                m.peak_pss_bytes = max(m.peak_pss_bytes, pss)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.sample_once()
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))
        self.sample_once()  # the tree may still be alive at stop: one last look


def live_pids(pids: set[int]) -> list[int]:
    """Those of `pids` still running (not zombies): leftovers to kill after a stop."""
    alive = []
    for pid in sorted(pids):
        try:
            stat = (PROC / str(pid) / "stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] != "Z" and pid != os.getpid():
            alive.append(pid)
    return alive


def kill_tree(pgid: int, pids: set[int]) -> None:
    """SIGKILL a process group (started with ``start_new_session``) and any of `pids` (the
    tree a sampler saw) still alive: engine processes may outlive their parent."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    for pid in live_pids(pids):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
