"""drt-run: the console script exists, helps, and rejects bad flags with a clear message."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distserve_rt.entrypoints import planner_args
from distserve_rt.entrypoints.cli import COMMANDS, build_parser, main
from distserve_rt.metrics.slo import SLO


def test_console_script_installed():
    # The venv's bin is not always on PATH (e.g. `.venv/bin/python -m pytest`).
    exe = shutil.which("drt-run") or str(Path(sys.executable).parent / "drt-run")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "bench-ops" in out


def test_bench_ops_rejects_bad_threads(capsys):
    with pytest.raises(SystemExit, match="--threads must be >= 1, got 0"):
        main(["bench-ops", "--threads", "0"])


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit):
        main(["no-such-command"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["simulate", "--prefill-tp", "0"], "argument --prefill-tp: must be an int >= 1, got 0"),
        (["simulate", "--rates", "-1"], "argument --rates: must be a finite number > 0, got -1"),
        (["plan", "--rate", "0"], "argument --rate: must be a finite number > 0, got 0"),
    ],
)
def test_planner_commands_name_the_bad_flag(capsys, argv, message):
    with pytest.raises(SystemExit):
        main(argv)
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("command", [["simulate"], ["plan", "--rate", "1"]])
def test_planner_commands_refuse_an_unknown_model_in_one_line(command):
    with pytest.raises(SystemExit, match=f"drt-run {command[0]}: unknown model preset 'nope'"):
        main([*command, "--model", "nope"])


def test_help_lists_commands_without_importing_torch():
    # Importing every command's module (torch, the engine, the planner) took ~3 s per
    # `drt-run --help`; the listing comes from cli.COMMANDS alone.
    code = (
        "import sys\n"
        "from distserve_rt.entrypoints.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch' in sys.modules, 'distserve_rt.entrypoints.serve' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "bench-ops" in out.stdout and out.stdout.split()[-2:] == ["False", "False"]


@pytest.mark.parametrize(
    "module",
    [
        "distserve_rt.entrypoints.plan",
        "distserve_rt.entrypoints.simulate",
        "distserve_rt.core.scheduler",
        "distserve_rt.models",
    ],
)
def test_the_planner_and_the_schedulers_load_without_torch(module):
    # `drt-run plan --help` took 3-4 s when config, core and models imported torch at module
    # level; the planner (and a simulator driving core's schedulers) needs shapes, not torch.
    code = f"import sys, {module}\nprint('torch' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]


def test_lazy_listing_matches_the_commands_parsers():
    # Every command's module registers exactly the commands COMMANDS gives it, and building
    # them all changes neither the listing's order nor its lines.
    lazy = build_parser()
    full = build_parser(load_all=True)
    assert lazy.format_help() == full.format_help()
    sub = next(a for a in full._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub._name_parser_map) == list(COMMANDS)
    for name in COMMANDS:
        assert sub._name_parser_map[name].get_default("handler") is not None, name


def test_a_command_parses_after_its_parser_is_built_lazily():
    args = build_parser().parse_args(["simulate", "--prefill-tp", "2"])
    assert args.command == "simulate" and args.prefill_tp == 2 and callable(args.handler)


@pytest.mark.parametrize("command", [["simulate"], ["plan", "--rate", "1"]])
def test_planner_slos_are_milliseconds_like_bench(command):
    """`--slo-ttft-ms 400` is 0.4 s inside (not 400 s); each flag overrides one preset SLO."""
    args = build_parser().parse_args([*command, "--slo-ttft-ms", "400", "--slo-tpot-ms", "50"])
    assert planner_args.build_slo(args) == SLO(0.4, 0.05)
    args = build_parser().parse_args([*command, "--slo-preset", "chatbot-opt-66b"])
    assert planner_args.build_slo(args) == SLO(2.5, 0.15)
    args.slo_tpot_ms = 200.0
    assert planner_args.build_slo(args) == SLO(2.5, 0.2)
    assert planner_args.build_slo(build_parser().parse_args(command)) == SLO(0.25, 0.1)


@pytest.mark.parametrize("command", [["simulate"], ["plan", "--rate", "1"]])
@pytest.mark.parametrize(
    ("old", "message"),
    [
        (
            "--ttft",
            "--ttft is now --slo-ttft-ms (milliseconds); --ttft 0.4 would be --slo-ttft-ms 400",
        ),
        (
            "--tpot",
            "--tpot is now --slo-tpot-ms (milliseconds); --tpot 0.4 would be --slo-tpot-ms 400",
        ),
    ],
)
def test_planner_refuses_the_old_seconds_flags(capsys, command, old, message):
    with pytest.raises(SystemExit):
        main([*command, old, "0.4"])
    assert message in capsys.readouterr().err


def test_planner_slo_flags_name_a_bad_value(capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--slo-ttft-ms", "-5"])
    assert "argument --slo-ttft-ms: must be a finite number > 0, got -5" in capsys.readouterr().err
