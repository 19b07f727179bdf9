"""The one engine-flag schema: every EngineConfig field has a flag whose help is its
docstring, unset flags keep the dataclass defaults, serve / bench / generate parse the same
flags into the same configs, and bad values are argparse errors naming flag and value."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest
import yaml

from distserve_rt.config import DisaggConfig, EngineConfig, LeaseExpiryAction, Placement
from distserve_rt.entrypoints import engine_args
from distserve_rt.entrypoints.cli import build_parser, main


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    engine_args.add_engine_args(parser)
    return parser.parse_args(list(argv))


def test_every_engine_config_field_has_a_flag_with_its_docstring_as_help(capsys):
    names = {f.name for f in fields(EngineConfig)}
    assert set(engine_args._ENGINE_FLAGS) == names
    docs = engine_args.field_docs(EngineConfig)
    assert set(docs) == names
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert docs["max_num_seqs"] in help_text and "(default: 256)" in help_text
    assert engine_args.field_docs(DisaggConfig)["kv_lease_timeout_s"] in help_text


def test_unset_flags_keep_the_dataclass_defaults():
    assert engine_args.configs_from_args(parse()) == (
        EngineConfig(),
        Placement.colocated(),
        DisaggConfig(),
    )


SETUP = [
    "--placement", "disaggregated", "--num-decode-instances", "2", "--cpu-cores-per-instance",
    "1", "--no-pin-cpus", "--kv-lease-timeout-s", "5", "--on-lease-expiry", "retry",
    "--kv-cache-memory-bytes", "64MiB", "--max-num-seqs", "8", "--model", "dummy:opt-tiny",
    "--max-model-len", "256", "--seed", "3",
]  # fmt: skip


def test_serve_bench_and_generate_parse_the_same_engine_flags_alike():
    configs = [
        engine_args.configs_from_args(build_parser().parse_args([command, *SETUP]))
        for command in ("serve", "bench", "generate")
    ]
    assert configs[0] == configs[1] == configs[2]
    config, placement, disagg = configs[0]
    assert config.kv_cache_memory_bytes == 64 << 20 and config.max_num_seqs == 8
    assert (config.model, config.max_model_len, config.seed) == ("dummy:opt-tiny", 256, 3)
    assert placement.decode.num_instances == 2 and placement.prefill.num_instances == 1
    assert not disagg.pin_cpus and disagg.kv_lease_timeout_s == 5
    assert disagg.on_lease_expiry is LeaseExpiryAction.RETRY


def test_placement_file_with_per_phase_overrides(tmp_path):
    path = tmp_path / "p.yaml"
    raw = {
        "model": "llama-tiny",
        "placement": "disaggregated",
        "prefill": {"tp": 1, "pp": 1, "num_instances": 2},
        "decode": {"tp": 1, "pp": 1, "num_instances": 1},
    }
    path.write_text(yaml.safe_dump(raw))
    _, placement, _ = engine_args.configs_from_args(
        parse("--placement", str(path), "--decode-tp", "2", "--cpu-cores-per-instance", "2")
    )
    assert (placement.prefill.num_instances, placement.prefill.tp) == (2, 1)
    assert (placement.decode.num_instances, placement.decode.tp) == (1, 2)
    assert placement.prefill.cpu_cores == placement.decode.cpu_cores == 2


def test_per_phase_flags_need_a_disaggregated_placement():
    with pytest.raises(ValueError, match="--decode-tp, --num-prefill-instances need --placement"):
        engine_args.configs_from_args(parse("--num-prefill-instances", "2", "--decode-tp", "2"))
    with pytest.raises(ValueError, match="--cpu-cores-per-instance need --placement"):
        engine_args.configs_from_args(parse("--cpu-cores-per-instance", "2"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1073741824", 1 << 30),
        ("64MiB", 64 << 20),
        ("64mib", 64 << 20),
        ("1GiB", 1 << 30),
        ("1.5GiB", 3 << 29),
        ("2K", 2048),
        ("512MB", 512_000_000),
        ("3 GB", 3_000_000_000),
        ("100B", 100),
    ],
)
def test_memory_sizes(text, expected):
    assert engine_args.memory_size(text) == expected


@pytest.mark.parametrize("text", ["12XB", "MiB", "-1GiB", "0", "0.1B", "1e9", ""])
def test_bad_memory_sizes(text):
    with pytest.raises(argparse.ArgumentTypeError):
        engine_args.memory_size(text)


@pytest.mark.parametrize(
    ("argv", "flag", "value"),
    [
        (["--kv-cache-memory-bytes", "12XB"], "--kv-cache-memory-bytes", "'12XB'"),
        (["--placement", "sideways"], "--placement", "'sideways'"),
        (["--max-num-seqs", "0"], "--max-num-seqs", "got 0"),
        (["--on-lease-expiry", "never"], "--on-lease-expiry", "'never'"),
    ],
)
@pytest.mark.parametrize("command", ["serve", "generate", "bench"])
def test_bad_values_are_argparse_errors_naming_flag_and_value(capsys, command, argv, flag, value):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([command, *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and value in err


def _planned_file(tmp_path, model="llama-tiny", **engine) -> str:
    raw = {
        "model": model,
        "placement": "disaggregated",
        "prefill": {"tp": 1, "pp": 1, "num_instances": 1},
        "decode": {"tp": 1, "pp": 1, "num_instances": 2},
    }
    if engine:
        raw["engine"] = engine
    path = tmp_path / "planned.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


PLANNED = {"max_num_batched_tokens": 384, "max_num_seqs": 64, "gpu_memory_utilization": 0.8}


@pytest.mark.parametrize("command", ["serve", "bench", "generate"])
def test_a_placement_file_s_model_and_engine_settings_apply(tmp_path, command):
    path = _planned_file(tmp_path, model="opt-tiny", **PLANNED)
    args = build_parser().parse_args([command, "--placement", path])
    config, placement, _ = engine_args.configs_from_args(args)
    assert config.model == "dummy:opt-tiny"
    assert (config.max_num_batched_tokens, config.max_num_seqs) == (384, 64)
    assert config.gpu_memory_utilization == 0.8 and placement.decode.num_instances == 2


def test_flags_that_agree_with_the_placement_file_are_accepted(tmp_path):
    path = _planned_file(tmp_path, model="opt-tiny", **PLANNED)
    config, _, _ = engine_args.configs_from_args(
        parse("--placement", path, "--model", "dummy:opt-tiny", "--max-num-seqs", "64")
    )
    assert (config.model, config.max_num_seqs, config.max_num_batched_tokens) == (
        "dummy:opt-tiny",
        64,
        384,
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--model", "dummy:opt-125m"],
            "--model dummy:opt-125m but the placement file was planned for opt-66b",
        ),
        (
            ["--max-num-batched-tokens", "2048"],
            "--max-num-batched-tokens 2048 but the placement file was planned with 384",
        ),
        (
            ["--gpu-memory-utilization", "0.5"],
            "--gpu-memory-utilization 0.5 but the placement file was planned with 0.8",
        ),
    ],
)
def test_a_flag_contradicting_the_placement_file_is_refused(tmp_path, argv, message):
    path = _planned_file(tmp_path, model="opt-66b", **PLANNED)
    with pytest.raises(ValueError, match=message):
        engine_args.configs_from_args(parse("--placement", path, *argv))


def test_serve_refuses_a_contradicting_flag_in_one_line(tmp_path):
    path = _planned_file(tmp_path, model="opt-66b")
    with pytest.raises(SystemExit, match="^drt-run serve: --model dummy:opt-125m but the pl"):
        main(["serve", "--placement", path, "--model", "dummy:opt-125m"])


def test_a_planned_hf_model_path_is_served_from_its_directory(tmp_path):
    model_dir = tmp_path / "opt-66b"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    path = _planned_file(tmp_path, model=str(model_dir / "config.json"))
    config, _, _ = engine_args.configs_from_args(parse("--placement", path))
    assert config.model == str(model_dir)
    # The same checkpoint elsewhere (same name) is the planned model; another one is not.
    args = parse("--placement", path, "--model", "/elsewhere/opt-66b/")
    assert engine_args.configs_from_args(args)[0].model == "/elsewhere/opt-66b/"


def test_an_old_placement_file_keeps_the_engine_defaults(tmp_path):
    args = parse("--placement", _planned_file(tmp_path))
    config, placement, _ = engine_args.configs_from_args(args)
    assert config == EngineConfig() and placement.decode.num_instances == 2
