"""Hub ids (``Qwen/Qwen2.5-0.5B-Instruct``) resolved to a snapshot already in the local
Hugging Face cache, the way ``huggingface_hub`` lays it out, with no network::

    <cache>/models--Qwen--Qwen2.5-0.5B-Instruct/refs/main          # holds a commit hash
    <cache>/models--Qwen--Qwen2.5-0.5B-Instruct/snapshots/<commit>/  # config.json, ...

The caches searched, in order: ``$HF_HUB_CACHE`` (and its old name
``$HUGGINGFACE_HUB_CACHE``), ``$HF_HOME/hub``, ``$XDG_CACHE_HOME/huggingface/hub`` and
``~/.cache/huggingface/hub``; the first holding the revision wins. Nothing is downloaded
(serving machines are often offline, and a download hidden in a model load turns a typo
into minutes of waiting): a model that is not cached is a FileNotFoundError naming the id,
the caches searched and what is accepted instead. `huggingface_hub` is not needed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

DEFAULT_REVISION = "main"
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")


def hub_cache_dirs() -> list[Path]:
    """The cache directories to search, most specific first, without repeats."""
    env = os.environ
    dirs = [env.get("HF_HUB_CACHE"), env.get("HUGGINGFACE_HUB_CACHE")]
    if env.get("HF_HOME"):
        dirs.append(os.path.join(env["HF_HOME"], "hub"))
    if env.get("XDG_CACHE_HOME"):
        dirs.append(os.path.join(env["XDG_CACHE_HOME"], "huggingface", "hub"))
    dirs.append(os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub"))
    seen: list[Path] = []
    for d in dirs:
        if d and Path(d).expanduser() not in seen:
            seen.append(Path(d).expanduser())
    return seen


def is_hub_id(model: str) -> bool:
    """``org/name`` or ``name`` that is not an existing path (a local directory wins)."""
    return bool(_HUB_ID_RE.fullmatch(model)) and not Path(model).exists()


def repo_folder(hub_id: str) -> str:
    """``Qwen/Qwen2.5-0.5B`` -> ``models--Qwen--Qwen2.5-0.5B`` (huggingface_hub's naming)."""
    return "models--" + hub_id.replace("/", "--")


def resolve_model_path(model: str, revision: str | None = None, *, what: str = "model") -> str:
    """The local directory of `model`: its cached snapshot when it is a hub id, else `model`
    itself (a directory, or a path the loader reports missing). `revision` (a branch, tag
    or full commit hash; default "main") selects the snapshot of a hub id; it is refused
    for a local directory, which has none.

    Raises FileNotFoundError naming `what` (model, tokenizer), the value, the caches
    searched and what is accepted."""
    if Path(model).is_dir():
        if revision is not None:
            raise ValueError(
                f"{what} {model!r} is a local directory; --revision {revision} applies only to "
                "hub ids in the Hugging Face cache (drop it, or pass the hub id)"
            )
        return model
    if not is_hub_id(model):
        return model  # a path that is not there: the loader says so, naming what it needs
    revision = revision or DEFAULT_REVISION
    searched, cached = [], []
    for cache in hub_cache_dirs():
        repo = cache / repo_folder(model)
        searched.append(str(repo))
        snapshot = _snapshot(repo, revision)
        if snapshot is not None:
            return str(snapshot)
        cached += _cached_revisions(repo)
    at = "" if revision == DEFAULT_REVISION else f" at revision {revision!r}"
    # The repo is there at other revisions: say which, the likely fix is one of them.
    others = f" (cached revisions: {', '.join(cached)})" if cached else ""
    raise FileNotFoundError(
        f"{what} {model!r}{at} is not in the local Hugging Face cache{others} (searched "
        f"{', '.join(searched)}) and nothing is downloaded; pass a local model directory, a "
        "hub id already in the cache (set HF_HUB_CACHE or HF_HOME to where it is) or "
        "dummy:<preset>"
    )


def _snapshot(repo: Path, revision: str) -> Path | None:
    """The snapshot directory of `revision` in one repo folder, None when it is not there.
    A ref (``refs/<revision>``) names a commit; a commit hash names a snapshot itself."""
    snapshots = repo / "snapshots"
    if _COMMIT_RE.fullmatch(revision):
        commit = revision
    else:
        ref = repo / "refs" / revision
        if not ref.is_file():
            return None
        commit = ref.read_text(encoding="utf-8").strip()
    path = snapshots / commit
    return path if path.is_dir() else None


def _cached_revisions(repo: Path) -> list[str]:
    """The refs and the snapshot commits (first 12 hex digits) a repo folder holds."""
    refs = sorted(p.name for p in (repo / "refs").glob("*") if p.is_file())
    commits = sorted(p.name[:12] for p in (repo / "snapshots").glob("*") if p.is_dir())
    return refs + commits
