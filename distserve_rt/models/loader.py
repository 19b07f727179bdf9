"""`load_model`: a model stage with its weights, from a local HF directory or ``dummy:<preset>``.

HF directory: ``config.json`` plus ``*.safetensors`` (one file, or shards listed by
``model.safetensors.index.json``). Files are opened with ``safetensors.safe_open``
(memory-mapped) and each rank reads only the slices of its stage and TP shard. PyTorch
``.bin`` checkpoints are refused (they unpickle arbitrary code and cannot be partially read);
convert them with ``save_pretrained(..., safe_serialization=True)``.

``dummy:<preset>``: the preset's shapes (`models.presets`) with deterministic random weights
(`models.dummy_weights`). Nothing is downloaded in either case.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from distserve_rt.distributed.parallel_state import ParallelContext
from distserve_rt.logger import init_logger
from distserve_rt.models.base import StagedCausalLM
from distserve_rt.models.config import ModelConfig
from distserve_rt.models.dummy_weights import dummy_tensors
from distserve_rt.models.presets import get_preset
from distserve_rt.models.registry import build_model, model_class
from distserve_rt.models.weights import check_checkpoint, load_stage_weights, shapes_of

logger = init_logger(__name__)

DUMMY_PREFIX = "dummy:"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
}
INDEX_FILE = "model.safetensors.index.json"


def load_model(
    model: str,
    *,
    dtype: str | torch.dtype = "auto",
    device: Any = "cpu",
    parallel: ParallelContext | None = None,
    seed: int = 0,
) -> tuple[StagedCausalLM, ModelConfig]:
    """Builds this rank's stage of `model` and loads its weights.

    Args:
        model: a local HF directory, or ``dummy:<preset>`` (e.g. ``dummy:llama-tiny``).
        dtype: "auto" (config.json's ``torch_dtype``/``dtype``; float32 when it has none,
            and for dummy models on CPU; bfloat16 for dummy models elsewhere), "float32",
            "bfloat16", "float16" or a torch.dtype.
        device: where the weights live.
        parallel: this rank's TP/PP position (default: one rank, whole model).
        seed: dummy weights' seed (ignored for checkpoints).
    Returns ``(model, config)``; the model is in eval mode.
    """
    parallel = parallel or ParallelContext()
    if model.startswith(DUMMY_PREFIX):
        config = get_preset(model[len(DUMMY_PREFIX) :])
        torch_dtype = resolve_dtype(dtype, None, device)
        stage = build_model(config, parallel, torch_dtype, device)
        tensors = dummy_tensors(
            stage.stage_weight_map(), seed, device, tie_word_embeddings=config.tie_word_embeddings
        )
        load_stage_weights(stage, stage.stage_weight_map(), tensors)
        return stage, config
    directory = _check_directory(model)
    hf_config = read_hf_config(directory)
    config = ModelConfig.from_hf_config(hf_config, name=str(directory))
    torch_dtype = resolve_dtype(dtype, hf_config, device)
    stage = build_model(config, parallel, torch_dtype, device)
    load_checkpoint(stage, directory)
    logger.info(
        "loaded %s (%s, stage %d/%d, tp rank %d/%d)",
        directory,
        torch_dtype,
        parallel.pp_rank,
        parallel.pp_size,
        parallel.tp_rank,
        parallel.tp_size,
    )
    return stage, config


def resolve_dtype(dtype: str | torch.dtype, hf_config: dict | None, device: Any) -> torch.dtype:
    """The torch dtype for the user's `dtype` choice (see `load_model`)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype}")
        return dtype
    if not isinstance(dtype, str):
        raise ValueError(
            f"dtype must be 'auto', one of {list(DTYPES)} or a torch.dtype, got {dtype!r}"
        )
    name = _DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    if name == "auto":
        if hf_config is None:  # dummy: fp32 where bf16 matmuls are slow, bf16 on accelerators
            return torch.float32 if torch.device(device).type in ("cpu", "meta") else torch.bfloat16
        name = str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32")
        name = name.removeprefix("torch.")
        if name not in DTYPES:
            raise ValueError(
                f"config.json's dtype {name!r} is not supported; pass dtype= one of {list(DTYPES)}"
            )
    if name not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {list(DTYPES)}, got {dtype!r}")
    return DTYPES[name]


def _check_directory(model: str) -> Path:
    directory = Path(model)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"model {model!r} is neither a local directory nor 'dummy:<preset>' "
            "(nothing is downloaded: pass the path of a Hugging Face model directory)"
        )
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json")
    return directory


def read_hf_config(directory: Path) -> dict[str, Any]:
    with open(directory / "config.json", encoding="utf-8") as f:
        return json.load(f)


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's files: those the index lists when there is one, else every
    ``*.safetensors``. FileNotFoundError when there are none (``.bin`` is not supported)."""
    index = directory / INDEX_FILE
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map") or {}
        files = [directory / name for name in sorted(set(weight_map.values()))]
        absent = [str(p.name) for p in files if not p.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} lists files that are not there: {absent}")
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in directory.glob("*.bin"))
        hint = (
            f" (found {bins}: PyTorch .bin checkpoints are not supported; convert with "
            "save_pretrained(..., safe_serialization=True))"
            if bins
            else ""
        )
        raise FileNotFoundError(f"{directory} has no *.safetensors files{hint}")
    return files


def load_checkpoint(stage: StagedCausalLM, directory: Path) -> None:
    """Checks names and shapes of every tensor first, then reads this stage's shards."""
    cls = model_class(stage.config)
    config = stage.config
    with contextlib.ExitStack() as stack:
        tensors = {}
        for path in safetensors_files(directory):
            handle = stack.enter_context(safe_open(str(path), framework="pt"))
            for raw_name in handle.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                name = cls.normalize_weight_name(raw_name)
                tensors.update(cls.split_fused_tensor(config, name, handle.get_slice(raw_name)))
        stage_map = stage.stage_weight_map()
        whole_map = cls.weight_map(config, (0, config.num_layers), True, True)
        check_checkpoint(
            stage_map,
            whole_map,
            shapes_of(tensors),
            lambda name: cls.is_ignored_weight(config, name),
            source=str(directory),
        )
        load_stage_weights(stage, stage_map, tensors)
