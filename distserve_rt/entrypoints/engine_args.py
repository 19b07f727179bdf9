"""The engine flags, one schema for `drt-run serve`, `drt-run bench` (in-process) and
`drt-run generate`, and the one function that turns them into the engine's configs::

    add_engine_args(parser)                    # the flags below
    config, placement, disagg = configs_from_args(parser.parse_args())
    engine = build_engine_client(args)         # AsyncLLM.from_config(*configs, ...)

Three groups of flags:

- `EngineConfig` fields (``--model``, ``--policy``, ``--max-num-seqs``, ...). Their help is the
  field's docstring in `config/engine.py`, read once from the source, and a flag left unset
  keeps the field's default, so the defaults live in one place.
- ``--placement colocated|disaggregated|<file.yaml>`` and per-phase overrides
  (``--num-prefill-instances``, ``--decode-tp``, ``--cpu-cores-per-instance``, ...). A file
  `drt-run plan` wrote also brings the model and engine settings the plan assumed (L_m,
  max_num_seqs, ...; a colocated file its replicas' TP x PP and count, as -tp/-pp/-dp;
  a multi-turn disaggregated file the routing settings below it simulated): they apply
  where the flag is unset, a flag contradicting them is a ValueError
  (`planned_engine_settings`).
- The `DisaggConfig` knobs a user turns (``--kv-lease-timeout-s``, ``--no-pin-cpus``, ...);
  its test-only fields (``launcher``, ``stats_interval_s``, the ``fake`` transport) stay
  Python-only.

A bad value (an unknown placement, an unreadable placement file, a size like ``12XB``) is an
argparse error naming the flag and the value; combinations that only make sense together
are checked by `configs_from_args` (ValueError naming the flags).
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import itertools
import re
import textwrap
from dataclasses import MISSING, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distserve_rt.config import DTYPE_NAMES, DisaggConfig, EngineConfig, PhaseConfig, Placement
from distserve_rt.core.block_manager import ALLOWED_BLOCK_SIZES
from distserve_rt.core.scheduler import POLICIES
from distserve_rt.entrypoints.model_tag import merge_model_tag
from distserve_rt.logger import init_logger
from distserve_rt.planner.placement_file import PlacementFile, load_placement

if TYPE_CHECKING:  # the engine (and torch) load only when a client is built
    from distserve_rt.engine.protocol import EngineClient

logger = init_logger(__name__)

PHASES = ("prefill", "decode")

_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b?|b)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def memory_size(text: str) -> int:
    """Bytes from ``"1073741824"``, ``"64MiB"``, ``"1.5GiB"``, ``"512MB"`` (argparse type).

    KiB/MiB/GiB/TiB and the short K/M/G/T are binary (2**10 steps); KB/MB/GB/TB decimal."""
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"must be a size in bytes, optionally with a unit (KiB, MiB, GiB, TiB, KB, MB, "
            f"GB, TB), e.g. 64MiB or 1GiB, got {text!r}"
        )
    number, unit = match.group(1), (match.group(2) or "").lower()
    decimal = unit.endswith("b") and len(unit) == 2  # "mb", not "mib" or "b"
    scale = 1000 ** ("kmgt".index(unit[0]) + 1) if decimal else _SIZE_UNITS[unit.rstrip("ib")]
    value = int(float(number) * scale)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return value


def placement_arg(text: str) -> Placement:
    """``colocated``, ``disaggregated`` (1 prefill + 1 decode) or a placement YAML file."""
    try:
        return Placement.parse(text)
    except (ValueError, OSError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _PlacementAction(argparse.Action):
    """``--placement``: the `Placement` in ``args.placement`` and, for a file `drt-run plan`
    wrote, the file in ``args.placement_file`` (its model and engine settings are applied by
    `configs_from_args`)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        planned = None
        try:
            if Path(values).suffix in (".yaml", ".yml"):
                planned = load_placement(values)
                placement = Placement.from_placement_file(planned)
            else:
                placement = placement_arg(values)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise argparse.ArgumentError(self, str(exc)) from None
        setattr(namespace, self.dest, placement)
        namespace.placement_file = planned


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass whose fields carry a string literal below them
    (the convention of `EngineConfig` and `DisaggConfig`), whitespace collapsed."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _help(cls: type, name: str) -> str:
    """The field's docstring plus its default, escaped for argparse's %-formatting."""
    doc = field_docs(cls).get(name, "")
    default = next(f.default for f in fields(cls) if f.name == name)
    if default not in (None, MISSING):
        doc += f" (default: {getattr(default, 'value', default)})"
    return doc.replace("%", "%%")


# EngineConfig field -> argparse keywords. Flags default to None ("keep EngineConfig's
# default"), so a field's default is written once, in config/engine.py.
_ENGINE_FLAGS: dict[str, dict[str, Any]] = {
    "model": {"metavar": "DIR|ORG/NAME|dummy:<preset>"},
    "dtype": {"choices": DTYPE_NAMES},
    "device": {"metavar": "cpu|cuda[:I]"},
    "seed": {"type": int, "metavar": "N"},
    "policy": {"choices": sorted(POLICIES)},
    "block_size": {"type": int, "choices": ALLOWED_BLOCK_SIZES},
    "kv_cache_memory_bytes": {"type": memory_size, "metavar": "SIZE"},
    "gpu_memory_utilization": {"type": float},
    "watermark": {"type": float},
    # --enable-prefix-caching / --no-enable-prefix-caching (vLLM's flags)
    "enable_prefix_caching": {"action": argparse.BooleanOptionalAction},
    "max_num_seqs": {"type": positive_int},
    "max_num_batched_tokens": {"type": positive_int},
    "max_model_len": {"type": positive_int},
    "tensor_parallel_size": {"type": positive_int, "aliases": ("-tp",)},
    "pipeline_parallel_size": {"type": positive_int, "aliases": ("-pp",)},
    "data_parallel_size": {"type": positive_int, "aliases": ("-dp",)},
    "log_stats_interval_s": {"type": float},
    # vLLM's model and tokenizer flags (hub ids resolve in the local HF cache only)
    "tokenizer": {"metavar": "DIR|ORG/NAME"},
    "revision": {"metavar": "REV"},
    "tokenizer_revision": {"metavar": "REV"},
    "trust_remote_code": {"action": "store_true"},
    "chat_template": {"metavar": "FILE|JINJA"},
}

# DisaggConfig field -> (flag, argparse keywords); the thread launcher, stats_interval_s and
# the fake transport (in-process pools: thread launcher only) are test knobs, left to Python.
_DISAGG_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "transport": ("--kv-transport", {"choices": ("auto", "shm", "cuda_ipc", "nixl")}),
    "launcher": ("--launcher", {"choices": ("process", "ray")}),
    "ray_address": ("--ray-address", {"metavar": "HOST:PORT"}),
    "placement_timeout_s": ("--placement-timeout-s", {"type": float}),
    "kv_lease_timeout_s": ("--kv-lease-timeout-s", {"type": float}),
    "on_lease_expiry": (
        "--on-lease-expiry",
        {
            "choices": ("fail", "retry"),
            # Its enum members carry the docs, not the field.
            "help": "when a lease expires: fail ends the request with an error, retry "
            "prefills it again (default: fail)",
        },
    ),
    "retry_on_instance_failure": ("--retry-on-instance-failure", {"action": "store_true"}),
    "max_retries": ("--max-retries", {"type": int}),
    "startup_timeout_s": ("--startup-timeout-s", {"type": float}),
    "share_gpus": ("--share-gpus", {"action": "store_true"}),
    # Decode-side reuse and conditional disaggregation (issue 12).
    "decode_prefix_caching": (
        "--no-decode-prefix-caching",
        {
            "action": "store_false",
            "help": "decode instances keep no prefix cache: every migration pulls all of "
            "its blocks and decode instances are chosen by load only",
        },
    ),
    "max_decode_load_imbalance": ("--max-decode-load-imbalance", {"type": int}),
    "local_prefill_max_tokens": ("--local-prefill-max-tokens", {"type": int}),
    "local_prefill_min_queue_tokens": ("--local-prefill-min-queue-tokens", {"type": int}),
}


def add_engine_args(p: argparse._ActionsContainer) -> None:
    """Adds the engine, placement and disaggregation flags to a parser (in two argument
    groups) or to a group passed in (argparse deprecates nested groups)."""
    own = isinstance(p, argparse.ArgumentParser)
    g = p.add_argument_group("engine (EngineConfig)") if own else p
    for name, kwargs in _ENGINE_FLAGS.items():
        kwargs = dict(kwargs)
        flags = ("--" + name.replace("_", "-"), *kwargs.pop("aliases", ()))
        kwargs.update(_metavar(kwargs), dest=name, default=None, help=_help(EngineConfig, name))
        g.add_argument(*flags, **kwargs)
    g = p.add_argument_group("placement (colocated or disaggregated)") if own else p
    _add_placement_args(g)


def _add_placement_args(g: argparse._ActionsContainer) -> None:
    g.add_argument(
        "--placement",
        action=_PlacementAction,
        default=None,
        metavar="colocated|disaggregated|FILE.yaml",
        help="colocated: one instance does both phases (--policy); disaggregated: 1 prefill "
        "+ 1 decode instance (change with the flags below); or a placement file `drt-run "
        "plan` writes (default: colocated)",
    )
    for phase in PHASES:
        g.add_argument(
            f"--num-{phase}-instances", type=positive_int, default=None, metavar="N",
            help=f"disaggregated: {phase} instances (default: the placement's, else 1)",
        )  # fmt: skip
        for key, what in (("tp", "tensor-parallel"), ("pp", "pipeline-parallel")):
            g.add_argument(
                f"--{phase}-{key}", type=positive_int, default=None, metavar="N",
                help=f"disaggregated: {what} size of each {phase} instance",
            )  # fmt: skip
    g.add_argument(
        "--cpu-cores-per-instance",
        type=positive_int,
        metavar="N",
        default=None,
        help="disaggregated, " + _help(PhaseConfig, "cpu_cores"),
    )
    g.add_argument(
        "--no-pin-cpus",
        dest="pin_cpus",
        action="store_false",
        help="disaggregated or data-parallel, CPU: let the instances share every core instead "
        "of pinning each to its own",
    )
    for name in _DISAGG_FLAGS:
        flag, kwargs = disagg_flag(name)
        kwargs["help"] = "disaggregated: " + kwargs["help"]
        g.add_argument(flag, **kwargs)


def disagg_flag(name: str) -> tuple[str, dict[str, Any]]:
    """(flag, argparse keywords) of a `DisaggConfig` field's serve flag, help from the field's
    docstring: `drt-run simulate` and `plan` take the routing ones with serve's names and
    meanings, so a plan is made with the settings serve will run."""
    flag, kwargs = _DISAGG_FLAGS[name]
    kwargs = {"help": _help(DisaggConfig, name), **_metavar(kwargs), **kwargs}
    return flag, {**kwargs, "dest": name, "default": None}


def _metavar(kwargs: dict[str, Any]) -> dict[str, str]:
    """Short metavars (N, SECONDS, X) instead of argparse's upper-cased flag names."""
    if "choices" in kwargs or "action" in kwargs or "metavar" in kwargs:
        return {}
    kind = kwargs.get("type")
    if kind in (int, positive_int):
        return {"metavar": "N"}
    return {"metavar": "X"} if kind is float else {}


def configs_from_args(
    args: argparse.Namespace, placement: Placement | None = None
) -> tuple[EngineConfig, Placement, DisaggConfig]:
    """The engine's configs from flags of `add_engine_args`; flags left unset keep the
    dataclasses' defaults. ``placement`` replaces ``--placement`` (`drt-run bench
    --compare`); the per-phase flags apply to it when it is disaggregated.

    Raises ValueError naming the flags when per-phase flags come with ``--placement``
    colocated or -tp/-pp/-dp contradict a colocated placement file's instances
    (`Placement.apply_to`), and the dataclasses' ValueErrors for values they refuse.
    """
    merge_model_tag(args)
    engine = {k: getattr(args, k) for k in _ENGINE_FLAGS if getattr(args, k, None) is not None}
    disagg = {k: getattr(args, k) for k in _DISAGG_FLAGS if getattr(args, k, None) is not None}
    if getattr(args, "pin_cpus", True) is False:
        disagg["pin_cpus"] = False
    if placement is None:
        planned = getattr(args, "placement_file", None)
        if planned is not None:
            engine = planned_engine_settings(planned, engine)
            disagg = _planned(planned.disagg, disagg)
            if planned.instance_nodes is not None and disagg.get("launcher") == "ray":
                disagg["instance_nodes"] = planned.instance_nodes  # the file names nodes
        placement = placement_from_args(args)
    elif placement.is_disaggregated:
        placement = placement_from_args(args, placement)
    if disagg.get("launcher") == "ray" and not placement.is_disaggregated:
        raise NotImplementedError(
            "--launcher ray runs disaggregated placements; colocated engines on Ray are not "
            f"built (placement: {placement.describe()}): drop --launcher ray"
        )
    # A colocated file's TP x PP and replica count become the engine's sizes; a flag that
    # contradicts them is refused here, before anything starts.
    return placement.apply_to(EngineConfig(**engine)), placement, DisaggConfig(**disagg)


def check_device(device: str) -> None:
    """ValueError for ``--device cuda[:N]`` where torch has no GPU: refused before a model is
    loaded, instead of torch's AssertionError from deep inside the first CUDA call."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        why = "is a CPU-only build" if torch.version.cuda is None else "sees no GPU"
        raise ValueError(
            f"--device {device}: this torch ({torch.__version__}) {why}; use --device cpu "
            "or install a CUDA build of torch"
        )


def planned_engine_settings(planned: PlacementFile, given: dict[str, Any]) -> dict[str, Any]:
    """``given`` (EngineConfig fields from flags) plus the model, engine settings and (for a
    colocated file) parallel sizes the placement file was planned with, so serve runs what
    the planner simulated.

    Raises ValueError naming the flag when a given one contradicts the file. The file's model
    is a planner model (a preset name or an HF config path); it matches ``--model`` when the
    names agree after dropping ``dummy:`` and a path's directories and ``config.json``. A
    preset name applied without ``--model`` becomes ``dummy:<preset>`` (random weights, and
    a warning saying so)."""
    settings = _planned({**planned.engine, **_planned_sizes(planned)}, given)
    if "model" in settings:
        if _model_key(settings["model"]) != _model_key(planned.model):
            raise ValueError(
                f"--model {settings['model']} but the placement file was planned for "
                f"{planned.model}; serve that model or plan again with --model"
            )
    else:
        settings["model"] = _runtime_model(planned.model)
    return settings


def _planned(planned: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``given`` (config fields from flags) plus ``planned`` (a placement file's settings of
    that config); ValueError naming the flag when a given one contradicts the file."""
    settings = dict(given)
    for key, value in planned.items():
        if key in settings and settings[key] != value:
            given_flag = _flag_text(key, settings[key])
            # --[no-]enable-prefix-caching is named as a flag; sizes by their value.
            planned_with = _flag_text(key, value) if isinstance(value, bool) else value
            raise ValueError(
                f"{given_flag} but the placement file was planned with {planned_with}; drop "
                "the flag or plan again with that setting"
            )
        settings[key] = value
    return settings


def _flag_text(key: str, value: Any) -> str:
    """``--max-num-seqs 8``; a boolean flag as given: ``--no-enable-prefix-caching``."""
    flag = key.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


def _planned_sizes(planned: PlacementFile) -> dict[str, int]:
    """A colocated file's instances (kept under ``prefill``) as EngineConfig sizes: TP x PP
    of each replica and the replica count (a disaggregated file's go to its phases)."""
    if planned.placement != "colocated":
        return {}
    p = planned.prefill
    return {
        "tensor_parallel_size": p.tp,
        "pipeline_parallel_size": p.pp,
        "data_parallel_size": p.num_instances,
    }


def _model_key(model: str) -> str:
    """The name two spellings of one model share: ``dummy:opt-13b``, ``opt-13b``,
    ``/models/opt-13b`` and ``/models/opt-13b/config.json`` all give ``opt-13b``."""
    name = model.removeprefix("dummy:").rstrip("/")
    if name.endswith("config.json"):
        name = name.removesuffix("config.json").rstrip("/")
    return name.rsplit("/", 1)[-1].lower()


def _runtime_model(planned: str) -> str:
    """``--model`` for the planner's model: its HF directory when the file names one that
    exists here, else the preset with random weights."""
    if planned.startswith("dummy:"):  # a file written for the dummy model names it as such
        return planned
    path = Path(planned)
    if path.name == "config.json" and path.is_file():
        return str(path.parent)
    if (path / "config.json").is_file():
        return planned
    logger.warning(
        "the placement file was planned for %s, a preset without weights here: serving "
        "dummy:%s (random weights); give --model DIR to serve its checkpoint",
        planned,
        planned,
    )
    return f"dummy:{planned}"


def placement_from_args(args: argparse.Namespace, placement: Placement | None = None) -> Placement:
    """``placement`` (default: ``--placement``'s, else colocated) with the per-phase flags
    applied. ValueError when they are given for a colocated placement."""
    placement = placement or getattr(args, "placement", None) or Placement.colocated()
    overrides = {phase: _phase_overrides(args, phase) for phase in PHASES}
    cores = getattr(args, "cpu_cores_per_instance", None)
    if not placement.is_disaggregated:
        given = sorted("--" + d.replace("_", "-") for o in overrides.values() for d in o.values())
        given += ["--cpu-cores-per-instance"] if cores is not None else []
        if given:
            raise ValueError(
                f"{', '.join(given)} need --placement disaggregated (or a disaggregated "
                "placement file); the placement is colocated"
            )
        return placement
    phases = []
    for phase in PHASES:
        base: PhaseConfig = getattr(placement, phase)
        values = {"tp": base.tp, "pp": base.pp, "num_instances": base.num_instances}
        values["cpu_cores"] = base.cpu_cores if cores is None else cores
        values.update({key: getattr(args, dest) for key, dest in overrides[phase].items()})
        phases.append(PhaseConfig(**values))
    return Placement.disaggregated(*phases)


def _phase_overrides(args: argparse.Namespace, phase: str) -> dict[str, str]:
    """``{PhaseConfig field: args attribute}`` of the per-phase flags that were given."""
    dests = {"num_instances": f"num_{phase}_instances", "tp": f"{phase}_tp", "pp": f"{phase}_pp"}
    return {k: d for k, d in dests.items() if getattr(args, d, None) is not None}


def build_engine_client(
    args: argparse.Namespace, *, placement: Placement | None = None, policy: str | None = None
) -> EngineClient:
    """The engine of the flags (an `AsyncLLM`), or of the flags with another placement and
    colocated policy (`drt-run bench --compare` builds one per entry).
    ``args.served_model_name``, when present, names the model for clients.

    The flags become configs here, not in the engine: the CLI schema sits above the engine
    (entrypoints -> engine), so `AsyncLLM` only takes configs (`AsyncLLM.from_config`)."""
    from distserve_rt.engine.async_llm import AsyncLLM

    config, placement, disagg = configs_from_args(args, placement)
    # Checked where an engine is about to start, not in configs_from_args: configs for a
    # GPU deployment can be built (and tested) on a CPU-only machine.
    check_device(config.device)
    if policy is not None:
        config = config.replace(policy=policy)
    return AsyncLLM.from_config(config, placement, disagg, getattr(args, "served_model_name", None))
