"""Checkpoint loading: sharded and prefix-less checkpoints, dtypes, and every error a user
can hit (missing files, unknown architecture, missing/unexpected tensors, shape mismatch)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from distserve_rt.models import load_model
from distserve_rt.models.loader import resolve_dtype
from tests.models.hf_fixtures import save_llama
from tests.models.paged_runner import PagedRunner

PROMPT = [5, 17, 42, 99, 3, 250, 7, 8, 9]


def _logits(path, **kwargs) -> torch.Tensor:
    model, _ = load_model(str(path), **kwargs)
    return PagedRunner(model).step(prefills=[(0, PROMPT)])


def _rewrite(src, dst, edit_tensors=None, edit_config=None):
    """Copies a single-file checkpoint, editing its tensor dict and/or config dict."""
    dst.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    if edit_tensors:
        tensors = edit_tensors(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_sharded_checkpoint_with_index_equals_single_file(tmp_path, checkpoint_dirs):
    sharded = save_llama(tmp_path / "sharded", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    torch.testing.assert_close(_logits(sharded), _logits(checkpoint_dirs("llama-gqa")))


def test_opt_names_without_model_prefix(tmp_path, checkpoint_dirs):
    """facebook/opt-* checkpoints name tensors decoder.* (saved from OPTModel)."""
    src = checkpoint_dirs("opt")
    strip = lambda t: {k.removeprefix("model."): v for k, v in t.items()}
    dst = _rewrite(src, tmp_path / "opt_noprefix", strip)
    torch.testing.assert_close(_logits(dst), _logits(src))


def test_harmless_extra_tensors_are_ignored(tmp_path, checkpoint_dirs):
    def add(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        return t

    dst = _rewrite(checkpoint_dirs("llama-gqa"), tmp_path / "extra", add)
    torch.testing.assert_close(_logits(dst), _logits(checkpoint_dirs("llama-gqa")))


def test_dtype_auto_follows_config(tmp_path, checkpoint_dirs):
    dst = _rewrite(
        checkpoint_dirs("llama-gqa"),
        tmp_path / "bf16",
        edit_config=lambda c: c.update(dtype="bfloat16"),
    )
    model, _ = load_model(str(dst))
    assert next(model.parameters()).dtype == torch.bfloat16
    model, _ = load_model(str(dst), dtype="float32")
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("bad", ["float64", "int8", 3])
def test_bad_dtype(bad):
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype(bad, {}, "cpu")


def test_missing_directory_and_files(tmp_path, checkpoint_dirs):
    with pytest.raises(FileNotFoundError, match="neither a local directory nor 'dummy:"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(checkpoint_dirs("llama-gqa") / "config.json", binary)
    (binary / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors.*\.bin checkpoints are not"):
        load_model(str(binary))


def test_index_listing_absent_shard(tmp_path):
    sharded = save_llama(tmp_path / "sharded", max_shard_size="40KB")
    next(iter(sorted(sharded.glob("*.safetensors")))).unlink()
    with pytest.raises(FileNotFoundError, match="lists files that are not there"):
        load_model(str(sharded))


def test_unknown_architecture(tmp_path, checkpoint_dirs):
    def gpt2(config):
        config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")

    dst = _rewrite(checkpoint_dirs("llama-gqa"), tmp_path / "gpt2", edit_config=gpt2)
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        load_model(str(dst))


def test_unsupported_rope_type(tmp_path, checkpoint_dirs):
    def linear(config):
        config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}

    dst = _rewrite(checkpoint_dirs("llama-gqa"), tmp_path / "rope", edit_config=linear)
    with pytest.raises(ValueError, match="rope_scaling type 'linear' is not supported"):
        load_model(str(dst))


def test_missing_tensor_is_named(tmp_path, checkpoint_dirs):
    drop = lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"}
    dst = _rewrite(checkpoint_dirs("llama-gqa"), tmp_path / "missing", drop)
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(str(dst))


def test_unexpected_tensor_is_named(tmp_path, checkpoint_dirs):
    def add(t):
        t["model.layers.0.self_attn.extra_proj.weight"] = torch.ones(2, 2)
        return t

    dst = _rewrite(checkpoint_dirs("llama-gqa"), tmp_path / "unexpected", add)
    with pytest.raises(ValueError, match=r"does not use.*extra_proj\.weight"):
        load_model(str(dst))


def test_shape_mismatch_names_tensor_and_shapes(tmp_path, checkpoint_dirs):
    dst = _rewrite(
        checkpoint_dirs("llama-gqa"),
        tmp_path / "shape",
        edit_config=lambda c: c.update(intermediate_size=96),
    )
    with pytest.raises(
        ValueError, match=r"gate_proj\.weight' has shape \(128, 64\), expected \(96, 64\)"
    ):
        load_model(str(dst))


def test_post_layernorm_opt_is_not_implemented(tmp_path, checkpoint_dirs):
    dst = _rewrite(
        checkpoint_dirs("opt"),
        tmp_path / "opt350",
        edit_config=lambda c: c.update(do_layer_norm_before=False),
    )
    with pytest.raises(NotImplementedError, match="post-LayerNorm"):
        load_model(str(dst))


def test_fused_tensor_of_the_wrong_size_is_named(tmp_path, checkpoint_dirs):
    """Phi-3 stores q/k/v as one tensor; rows that do not match config.json are an error
    naming that tensor, not a silent mis-split."""
    name = "model.layers.1.self_attn.qkv_proj.weight"

    def drop_rows(tensors):
        tensors[name] = tensors[name][:-16]
        return tensors

    dst = _rewrite(checkpoint_dirs("phi3"), tmp_path / "phi3", edit_tensors=drop_rows)
    with pytest.raises(ValueError, match=rf"{name}.*expected 128 rows \(64 q_proj \+ 32 k_proj"):
        load_model(str(dst))
