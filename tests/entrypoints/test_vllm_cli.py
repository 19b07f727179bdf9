"""`drt-run serve` as a vLLM user types it: ``serve MODEL`` (positional), hub ids from the
local Hugging Face cache, ``--tokenizer``, ``--revision``, ``--trust-remote-code`` and
``--chat-template``; each user error one line on stderr and exit status 1 (subprocess)."""

from __future__ import annotations

import json

import pytest

from distserve_rt.entrypoints import engine_args
from distserve_rt.entrypoints.cli import build_parser
from tests.entrypoints.test_cli_errors import drt_run
from tests.models.hf_fixtures import llama_hf_config, save_llama, save_tokenizer
from tests.models.test_hf_cache import COMMIT, make_cached_repo


def _no_home_caches(tmp_path) -> dict[str, str]:
    return {"HF_HUB_CACHE": str(tmp_path / "hub"), "HOME": str(tmp_path / "home")}


def test_model_positional_or_flag(tmp_path):
    args = build_parser().parse_args(
        ["serve", "org/name", "--revision", "v1", "--trust-remote-code"]
    )
    config, _, _ = engine_args.configs_from_args(args)
    assert (config.model, config.revision, config.trust_remote_code) == ("org/name", "v1", True)
    args = build_parser().parse_args(["serve", "org/name", "--model", "org/name"])
    assert engine_args.configs_from_args(args)[0].model == "org/name"
    args = build_parser().parse_args(
        ["serve", "--model", "d", "--tokenizer", "t", "--chat-template", "{{ x }}"]
    )
    config = engine_args.configs_from_args(args)[0]
    assert (config.model, config.tokenizer, config.chat_template) == ("d", "t", "{{ x }}")


def test_positional_and_flag_naming_different_models_is_one_line():
    out = drt_run("serve", "dummy:llama-tiny", "--model", "dummy:opt-tiny")
    assert out.returncode == 1
    assert out.stderr == (
        "drt-run serve: MODEL dummy:llama-tiny and --model dummy:opt-tiny name different "
        "models; give one of them\n"
    )


def test_hub_id_not_in_the_cache_is_one_line(tmp_path):
    out = drt_run("serve", "Qwen/Qwen2.5-0.5B-Instruct", **_no_home_caches(tmp_path))
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1
    assert out.stderr.startswith(
        "drt-run serve: model 'Qwen/Qwen2.5-0.5B-Instruct' is not in the local Hugging Face "
        f"cache (searched {tmp_path / 'hub' / 'models--Qwen--Qwen2.5-0.5B-Instruct'}, "
    )
    assert "local model directory" in out.stderr and "dummy:<preset>" in out.stderr


def test_custom_code_architecture_is_refused_in_one_line(tmp_path):
    env = _no_home_caches(tmp_path)
    repo = make_cached_repo(tmp_path / "hub", "org/custom", {"main": COMMIT})
    config = llama_hf_config().to_dict()
    config.update(architectures=["MyForCausalLM"], model_type="my")
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_my.MyForCausalLM"}
    (repo / "snapshots" / COMMIT / "config.json").write_text(json.dumps(config))
    out = drt_run("serve", "org/custom", "--trust-remote-code", **env)
    assert out.returncode == 1
    # The log says the flag was accepted and runs no code; then the error, one line.
    log, error = out.stderr.splitlines()
    assert "trust_remote_code: accepted, but custom modeling code is never run" in log
    assert error.startswith("drt-run serve: architecture ['MyForCausalLM'] needs the")
    assert "never runs, with or without trust_remote_code" in error


@pytest.mark.parametrize("flag", ["--revision", "--tokenizer", "--chat-template"])
def test_new_flags_are_in_serve_help(flag, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    assert flag in capsys.readouterr().out


def test_serve_model_positional_hub_id_builds_the_engine_named_by_the_id(tmp_path, monkeypatch):
    for name in ("HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = make_cached_repo(tmp_path / "hub", "org/tiny", {"main": COMMIT})
    snapshot = save_llama(repo / "snapshots" / COMMIT)
    save_tokenizer(snapshot)
    argv = ["serve", "org/tiny", "--kv-cache-memory-bytes", "8MiB", "--log-stats-interval-s", "0"]
    engine = engine_args.build_engine_client(build_parser().parse_args(argv))
    try:
        assert engine.model_name == "org/tiny"  # what /v1/models shows, as vLLM
        assert engine._core.config.model == str(snapshot)
    finally:
        engine.shutdown()
