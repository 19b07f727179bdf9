"""drt-run as a user meets it: each user error is one line on stderr and a non-zero exit,
Ctrl-C and SIGTERM stop `serve` without a traceback, and DRT_LOG_LEVEL=DEBUG brings the
traceback back. Subprocess tests: what is checked is what the terminal shows."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from distserve_rt.entrypoints.cli import error_line

ROOT = Path(__file__).resolve().parents[2]
BAD_MODEL = "model '/no/such/model' is neither 'dummy:<preset>' nor a directory with config.json"


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    env.pop("DRT_LOG_LEVEL", None)
    env.update(extra)
    return env


def drt_run(*argv: str, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "distserve_rt.entrypoints.cli", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(**env), timeout=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--model", "/no/such/model"],
        ["generate", "--model", "/no/such/model"],
        ["bench", "--model", "/no/such/model", "--num-prompts", "1"],
    ],
)
def test_wrong_model_path_is_one_line(argv):
    out = drt_run(*argv)
    assert out.returncode == 1
    assert out.stderr == f"drt-run {argv[0]}: {BAD_MODEL}\n"


def test_bench_against_a_closed_port_is_one_line():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: the socket was closed
    out = drt_run("bench", "--base-url", url, "--num-prompts", "1")
    assert out.returncode == 1
    assert out.stderr.startswith(f"drt-run bench: --base-url {url}: cannot reach the server (")
    assert out.stderr.endswith("is `drt-run serve` running there?\n")
    assert out.stderr.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_device_cuda_on_a_cpu_torch_is_one_line():
    out = drt_run("generate", "--device", "cuda")
    assert out.returncode == 1
    head = f"drt-run generate: --device cuda: this torch ({torch.__version__})"
    assert out.stderr.startswith(head)
    assert out.stderr.endswith("use --device cpu or install a CUDA build of torch\n")
    assert out.stderr.count("\n") == 1


def test_debug_log_level_keeps_the_traceback():
    out = drt_run("generate", "--model", "/no/such/model", DRT_LOG_LEVEL="DEBUG")
    assert out.returncode == 1
    assert "Traceback (most recent call last)" in out.stderr
    assert out.stderr.rstrip().endswith(f"FileNotFoundError: {BAD_MODEL}")


def test_error_line_names_unexpected_errors_by_type():
    assert error_line(ValueError("--x must be >= 1,\n got 0")) == "--x must be >= 1, got 0"
    assert error_line(KeyboardInterrupt()) == "interrupted"
    line = error_line(KeyError("k"))
    assert line == "KeyError: 'k' (DRT_LOG_LEVEL=DEBUG shows the traceback)"


def _interactive_signals() -> None:
    """SIGINT as a terminal's foreground process gets it: unblocked and at its default, so
    Python installs its KeyboardInterrupt handler. An ignored or blocked SIGINT is inherited
    through exec, and a suite started in the background of a non-interactive shell (as CI
    and `make test &` run it) has SIGINT ignored: the server then never saw the Ctrl-C and
    the test hung for 60 s."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_serve(*extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "distserve_rt.entrypoints.cli", "serve"]
    cmd += ["--port", str(free_port()), *extra]
    # Its own session: the signal goes to the server and its instance processes together,
    # as Ctrl-C in a terminal sends it to the whole foreground process group.
    return subprocess.Popen(
        cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env=_env(), start_new_session=True, preexec_fn=_interactive_signals,
    )  # fmt: skip


def _wait_for_line(proc: subprocess.Popen, text: str, timeout_s: float = 120) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    proc.kill()
    raise AssertionError(f"no {text!r} in {''.join(lines)}")


@pytest.mark.parametrize("placement", ["colocated", "disaggregated"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_cleanly_on_a_signal(placement, sig):
    proc = _start_serve("--placement", placement)
    _wait_for_line(proc, "Uvicorn running on")
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err and "Finished server process" in err
    # A requested stop is a normal end, after the engine's shutdown ran.
    assert proc.returncode == 0


def test_serve_interrupted_while_starting_is_one_line():
    proc = _start_serve()
    time.sleep(1.0)  # importing torch and the engine: long before the server is up
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err == "drt-run serve: interrupted\n"


def test_disaggregated_script_without_main_guard_names_the_cause(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent("""\
            from distserve_rt import LLM

            llm = LLM("dummy:llama-tiny", placement="disaggregated")
            """)
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=_env(), timeout=180
    )
    assert out.returncode == 1
    last = out.stderr.rstrip().splitlines()[-1]
    assert last.startswith("RuntimeError: ") and "failed to start: the script" in last
    assert 'no `if __name__ == "__main__":` guard' in last and "EOFError" not in out.stderr
    assert len(out.stderr.splitlines()) < 40  # was 147 lines: a traceback per instance


def test_ctrl_c_during_the_native_imports_waits_until_they_are_done(monkeypatch, request):
    """A SIGINT during torch's extension init used to abort the interpreter (a
    KeyboardInterrupt thrown through pybind11) or kill it with no exit status of ours: the
    imports run with SIGINT blocked, and the interrupt arrives after the last one. The
    signal is sent to the main thread, as a terminal's Ctrl-C reaches the CLI, which has no
    other thread yet: sent to the process (os.kill), the kernel handed it to one of
    pytest's other threads in CI and it ran mid-import (stop 22)."""
    from distserve_rt.entrypoints import cli

    imported = []

    def import_module(name):
        if not imported:  # Ctrl-C in the middle of the first import
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        imported.append(name)

    monkeypatch.setattr(cli.importlib, "import_module", import_module)
    # SIGINT as in an interactive process (see _interactive_signals), restored afterwards.
    blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.pthread_sigmask(signal.SIG_SETMASK, blocked))
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, handler))
    with pytest.raises(KeyboardInterrupt):
        cli.import_native_modules_uninterrupted()
    assert imported == ["torch", "distserve_rt._C"]
