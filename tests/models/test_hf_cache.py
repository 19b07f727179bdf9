"""Hub ids resolved in a local Hugging Face cache (`models.hf_cache`), built in tmp_path
with huggingface_hub's layout; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from distserve_rt.models.hf_cache import hub_cache_dirs, resolve_model_path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def make_cached_repo(cache: Path, hub_id: str, refs: dict[str, str]) -> Path:
    """A repo folder with a snapshot per commit of `refs` ({ref: commit}); returns it."""
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    for ref, commit in refs.items():
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    return repo


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty HF_HUB_CACHE, and no other cache the machine may have."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_refs_commits_and_revisions(cache):
    repo = make_cached_repo(cache, "Qwen/Qwen2.5-0.5B-Instruct", {"main": COMMIT, "v1": OLD_COMMIT})
    hub_id = "Qwen/Qwen2.5-0.5B-Instruct"
    assert resolve_model_path(hub_id) == str(repo / "snapshots" / COMMIT)
    assert resolve_model_path(hub_id, "v1") == str(repo / "snapshots" / OLD_COMMIT)
    assert resolve_model_path(hub_id, OLD_COMMIT) == str(repo / "snapshots" / OLD_COMMIT)
    with pytest.raises(FileNotFoundError, match="at revision 'v2' is not in the local") as e:
        resolve_model_path(hub_id, "v2")
    assert "(cached revisions: main, v1, 0123456789ab, fedcba987654)" in str(e.value)


def test_cache_dirs_in_order(tmp_path, monkeypatch, cache):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    assert hub_cache_dirs() == [
        cache,
        tmp_path / "hfhome" / "hub",
        tmp_path / "home" / ".cache" / "huggingface" / "hub",
    ]
    # A repo only under HF_HOME/hub is found there; one under HF_HUB_CACHE wins.
    under_home = make_cached_repo(tmp_path / "hfhome" / "hub", "org/m", {"main": COMMIT})
    assert resolve_model_path("org/m") == str(under_home / "snapshots" / COMMIT)
    first = make_cached_repo(cache, "org/m", {"main": COMMIT})
    assert resolve_model_path("org/m") == str(first / "snapshots" / COMMIT)


def test_not_cached_is_one_line_naming_id_dirs_and_choices(cache):
    with pytest.raises(FileNotFoundError) as info:
        resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct")
    message = str(info.value)
    assert "\n" not in message
    assert "model 'Qwen/Qwen2.5-0.5B-Instruct' is not in the local Hugging Face cache" in message
    assert str(cache / "models--Qwen--Qwen2.5-0.5B-Instruct") in message
    assert "local model directory" in message and "dummy:<preset>" in message
    assert "nothing is downloaded" in message


def test_local_directory_wins_and_refuses_a_revision(tmp_path, cache):
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ValueError, match="is a local directory; --revision main applies only"):
        resolve_model_path(str(tmp_path), "main")
    # Not a directory and not a hub id: left for the loader to report.
    assert resolve_model_path("/no/such/model") == "/no/such/model"
