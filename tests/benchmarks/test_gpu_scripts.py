"""bench/gpu/first_run.sh and second_run.sh dry-run here, so that a wrong path, flag or file
count cannot waste the H200's minutes. A stub `python` (recording its argv) stands in for
the interpreter to keep this fast: the real interpreter's dry run, which also parses every
benchmark's flags, is recorded in bench/gpu/dry_run_first.txt and dry_run_second.txt."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
GPU = ROOT / "bench" / "gpu"
FIRST_RUN_STAGES = [
    "env", "build", "sass", "kernel_tests", "bench_quick", "racecheck", "memcheck",
    "synccheck", "integration",
]  # fmt: skip
FIRST_RUN_FILES = {
    "summary.txt", "build.log", "sass.txt", "kernel_tests.log", "bench_quick.log",
    "gpu_kernels.json", "sanitizer.log", "integration.log",
}  # fmt: skip
SECOND_RUN_FILES = {
    "summary.txt", "build.log", "bench_grid.log", "gpu_kernels.json", "gpu_kernels.png",
    "transfer.log", "serving.log", "disagg_vs_colocated_gpu.json",
}  # fmt: skip

# Records "python ARGV" and succeeds at once; sleeps where SLOW_MATCH is in its argv.
STUB_PYTHON = """#!/usr/bin/env bash
printf 'python' >>"$STUB_LOG"; printf ' %q' "$@" >>"$STUB_LOG"; echo >>"$STUB_LOG"
[ -n "${SLOW_MATCH:-}" ] && [[ " $* " == *"$SLOW_MATCH"* ]] && exec sleep 60
[ "${1:-}" = - ] && cat >/dev/null
exit 0
"""


def dry_run(script: str, tmp_path: Path, *args: str, **env: str) -> tuple[Path, str, str]:
    """Runs `script --dry-run` with the stub python; returns OUT, the stub log and stdout."""
    python = tmp_path / "python"
    python.write_text(STUB_PYTHON)
    python.chmod(0o755)
    out, log = tmp_path / "out", tmp_path / "stub_calls.log"
    env = {**os.environ, "PYTHON": str(python), "OUT": str(out), "STUB_LOG": str(log), **env}
    result = subprocess.run(
        ["bash", str(GPU / script), "--dry-run", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    calls = log.read_text() if log.exists() else ""
    return out, calls, result.stdout + result.stderr


def stage_table(out: Path) -> dict[str, str]:
    """summary.txt's rows: stage -> status."""
    rows = {}
    for line in (out / "summary.txt").read_text().splitlines():
        match = re.match(r"^(\w+)\s{2,}(\S.*?)\s{2,}", line + "  ")
        if match and match[1] != "stage":
            rows[match[1]] = match[2]
    return rows


def repo_paths_exist(calls: str) -> list[str]:
    """Each repo-relative path (bench/..., tests/...) the stubs were handed that is missing."""
    missing = []
    for line in calls.splitlines():
        for word in shlex.split(line):
            if re.match(r"^(bench|tests|distserve_rt)/", word) and not (ROOT / word).exists():
                missing.append(word)
    return missing


def test_first_run_dry_run_runs_every_stage_and_returns_its_8_files(tmp_path):
    out, calls, stdout = dry_run("first_run.sh", tmp_path)
    assert {p.name for p in out.iterdir()} == FIRST_RUN_FILES, stdout
    assert stage_table(out) == dict.fromkeys(FIRST_RUN_STAGES, "ok"), stdout
    assert "state: done" in (out / "summary.txt").read_text()
    assert repo_paths_exist(calls) == []
    # The build is for the H200 only, with the ptxas report the sass stage reads.
    assert re.search(r"^cmake .*-DDRT_CUDA=ON -DDRT_CUDA_ARCHS=90a .*-Xptxas", calls, re.M)
    assert "190 | 0/0 | 37376" in (out / "sass.txt").read_text()  # the stub's ptxas line
    assert "HMMA.16816.F32.BF16=2" in (out / "sass.txt").read_text()
    for tool in ("racecheck", "memcheck", "synccheck"):
        assert re.search(
            rf"^compute-sanitizer --tool {tool} .*every_op\.py --device cpu", calls, re.M
        )
    # pytest only collects in a dry run, without the server packages (as on the GPU machine).
    assert calls.count("no_server_deps.py -m pytest --collect-only -q -m cuda") == 2
    assert "bench/gpu/no_server_deps.py --flags-only bench/gpu/bench_kernels.py --quick" in calls


def test_second_run_dry_run_runs_every_stage_and_returns_its_8_files(tmp_path):
    out, calls, stdout = dry_run("second_run.sh", tmp_path, "--quick")
    assert {p.name for p in out.iterdir()} == SECOND_RUN_FILES, stdout
    assert set(stage_table(out).values()) == {"ok"}, stdout
    assert list(stage_table(out)) == ["env", "build", "bench_grid", "transfer", "serving"]
    assert repo_paths_exist(calls) == []
    assert re.search(r"--flags-only -m distserve_rt.entrypoints.cli bench --device cuda", calls)
    assert "--num-prompts 50 --request-rate 20 " in calls  # --quick reached the serving stage


def test_a_stage_past_the_budget_is_cut_and_the_rest_skipped_files_still_there(tmp_path):
    out, _, stdout = dry_run(
        "first_run.sh",
        tmp_path,
        DRT_GPU_BUDGET_S="5",
        DRT_GPU_STAGE_RESERVE_S="1",
        DRT_GPU_STAGE_MIN_S="1",
        SLOW_MATCH="-m pytest",  # the kernel tests hang
    )
    table = stage_table(out)
    assert table["build"] == "ok", stdout
    assert table["kernel_tests"].startswith("CUT (at its"), stdout
    assert all(table[s].startswith("SKIPPED (budget spent") for s in FIRST_RUN_STAGES[4:])
    assert {p.name for p in out.iterdir()} == FIRST_RUN_FILES


def test_a_stopped_run_records_the_stage_it_stopped_and_keeps_its_files(tmp_path):
    python = tmp_path / "python"
    python.write_text(STUB_PYTHON)
    python.chmod(0o755)
    out, log = tmp_path / "out", tmp_path / "stub_calls.log"
    env = {**os.environ, "PYTHON": str(python), "OUT": str(out), "STUB_LOG": str(log),
           "SLOW_MATCH": "-m pytest"}  # fmt: skip
    run = subprocess.Popen(
        ["bash", str(GPU / "first_run.sh"), "--dry-run"], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    # The kernel tests hang (the stub sleeps): stop the run once they have started.
    for _ in range(200):
        if "-m pytest" in (log.read_text() if log.exists() else ""):
            break
        time.sleep(0.05)
    run.terminate()
    stdout, _ = run.communicate(timeout=30)
    assert run.returncode == 143, stdout
    table = stage_table(out)
    assert table["kernel_tests"] == "KILLED (the run was stopped)", stdout
    assert all(table[s] == "not reached" for s in FIRST_RUN_STAGES[4:])
    assert "state: stopped early" in (out / "summary.txt").read_text()
    assert {p.name for p in out.iterdir()} == FIRST_RUN_FILES


def test_a_failed_build_skips_what_needs_it_and_names_the_reason(tmp_path):
    stubs = tmp_path / "stubs"
    shutil.copytree(GPU / "stubs", stubs)
    (stubs / "cmake").write_text("#!/usr/bin/env bash\necho 'configure failed' >&2\nexit 1\n")
    out, _, stdout = dry_run("first_run.sh", tmp_path, DRT_GPU_STUB_DIR=str(stubs))
    table = stage_table(out)
    assert table["env"] == "ok" and table["build"] == "FAILED (exit 1)", stdout
    assert all(table[s] == "SKIPPED (build did not pass)" for s in FIRST_RUN_STAGES[2:])
    assert "configure failed" in (out / "build.log").read_text()
    assert {p.name for p in out.iterdir()} == FIRST_RUN_FILES


def test_bad_budget_is_refused_in_one_line(tmp_path):
    _, _, stdout = dry_run("first_run.sh", tmp_path, DRT_GPU_BUDGET_S="9m")
    assert "DRT_GPU_BUDGET_S=9m: must be whole seconds, e.g. 540" in stdout


def test_every_op_names_a_kernel_that_is_wrong(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(GPU))
    import every_op

    def wrong_write_kv(key, value, kv_cache, slot_mapping):
        kv_cache.zero_()

    monkeypatch.setattr(every_op, "write_kv", wrong_write_kv)
    assert every_op.main(["--device", "cpu", "--only", "write_kv", "copy_blocks"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^write_kv +WRONG", out, re.M) and re.search(r"^copy_blocks +ok", out, re.M)
    assert "1/2 ok on cpu; failed: write_kv" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_every_op_on_cuda_without_a_gpu_says_so(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(GPU))
    import every_op

    assert every_op.main(["--only", "write_kv"]) == 2
    assert "--device cuda but torch sees no CUDA device" in capsys.readouterr().err


def flags_only(*argv: str) -> subprocess.CompletedProcess:
    # `drt-run plan` parses without torch: the check costs a second, not an import of torch.
    command = [sys.executable, str(GPU / "no_server_deps.py"), "--flags-only",
               "-m", "distserve_rt.entrypoints.cli", "plan", *argv]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_flags_only_stops_after_parsing_and_refuses_a_wrong_flag():
    good = flags_only("--rate", "2", "--top", "3")
    assert good.returncode == 0 and "flags ok (drt-run): {'command': 'plan'" in good.stdout
    assert "'top': 3" in good.stdout and good.stdout.count("\n") == 1  # nothing planned
    bad = flags_only("--rate", "2", "--topp", "3")
    assert bad.returncode == 2 and "unrecognized arguments: --topp 3" in bad.stderr
