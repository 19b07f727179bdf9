"""`drt-run generate` on the colocated tiny model (the disaggregated path is covered by
tests/e2e): text and latencies printed; unsupported flag combinations rejected."""

from __future__ import annotations

import pytest

from distserve_rt.entrypoints.cli import main


def test_generate_prints_text_and_latencies(capsys):
    argv = ["generate", "Hello", "--max-tokens", "4", "--ignore-eos"]
    assert main([*argv, "--kv-cache-memory-bytes", "10MiB", "--max-model-len", "128"]) == 0
    out = capsys.readouterr().out
    assert "--- 'Hello'" in out and "[4 tokens, length] TTFT" in out and "TPOT" in out


def test_generate_rejects_instance_flags_without_disaggregation():
    with pytest.raises(SystemExit, match="--num-prefill-instances need --placement disagg"):
        main(["generate", "Hi", "--num-prefill-instances", "2"])
