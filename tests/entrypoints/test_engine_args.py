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
