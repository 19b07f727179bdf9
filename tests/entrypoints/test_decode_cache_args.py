"""The decode-side reuse and conditional disaggregation flags: each sets its DisaggConfig
field, unset ones keep the defaults, and a bad value is one line naming the flag's field."""

from __future__ import annotations

import argparse

import pytest

from distserve_rt.config import DisaggConfig
from distserve_rt.entrypoints import engine_args
from distserve_rt.entrypoints.cli import main


def _disagg(*argv: str) -> DisaggConfig:
    parser = argparse.ArgumentParser()
    engine_args.add_engine_args(parser)
    args = parser.parse_args(["--placement", "disaggregated", *argv])
    return engine_args.configs_from_args(args)[2]


def test_the_flags_set_their_fields_and_default_to_the_config_s_defaults():
    assert _disagg() == DisaggConfig()
    dc = _disagg(
        "--no-decode-prefix-caching", "--max-decode-load-imbalance", "0",
        "--local-prefill-max-tokens", "64", "--local-prefill-min-queue-tokens", "4096",
    )  # fmt: skip
    assert dc.decode_prefix_caching is False and dc.max_decode_load_imbalance == 0
    assert (dc.local_prefill_max_tokens, dc.local_prefill_min_queue_tokens) == (64, 4096)


@pytest.mark.parametrize(
    "field",
    ["max_decode_load_imbalance", "local_prefill_max_tokens", "local_prefill_min_queue_tokens"],
)
def test_negative_thresholds_are_refused_naming_the_field(field):
    with pytest.raises(ValueError, match=f"^{field} must be an int >= 0, got -1$"):
        DisaggConfig(**{field: -1})


def test_the_cli_refuses_a_negative_threshold_in_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--placement", "disaggregated", "--local-prefill-max-tokens", "-5", "hi"])
    message = str(exc.value) + capsys.readouterr().err
    assert "local_prefill_max_tokens must be an int >= 0, got -5" in message
    assert "Traceback" not in message


def test_decode_prefix_caching_must_be_a_bool():
    with pytest.raises(ValueError, match="^decode_prefix_caching must be True or False, got 1$"):
        DisaggConfig(decode_prefix_caching=1)
