"""Configuration of the runtime: validated dataclasses every layer may import.

The lowest package of the serving stack: `worker`, `core`, `transfer`, `engine` and
`entrypoints` read these; config imports none of `engine`, `worker` or `entrypoints`
(tests/test_import_layers.py). Building configs from CLI flags is the CLI's job
(`entrypoints.engine_args`).

- `EngineConfig` (`engine.py`): one engine instance (model, device, KV, limits, TP x PP).
- `SchedulerConfig` (`scheduler.py`): the limits a batching policy respects.
- `Parallelism` (`parallelism.py`): an instance's TP x PP.
- `Placement`, `PhaseConfig`, `PlacementKind` (`placement.py`): where the phases run.
- `DisaggConfig`, `LeaseExpiryAction` (`disagg.py`): the disaggregated runtime's knobs.
- `check_range` (`validation.py`): the one numeric-range rule and message they share.
"""

from distserve_rt.config.disagg import DisaggConfig, LeaseExpiryAction
from distserve_rt.config.engine import DTYPE_NAMES, EngineConfig, GiB
from distserve_rt.config.parallelism import Parallelism
from distserve_rt.config.placement import PhaseConfig, Placement, PlacementKind
from distserve_rt.config.scheduler import POLICY_NAMES, SchedulerConfig
from distserve_rt.config.validation import check_range

__all__ = [
    "DTYPE_NAMES",
    "POLICY_NAMES",
    "DisaggConfig",
    "EngineConfig",
    "GiB",
    "LeaseExpiryAction",
    "Parallelism",
    "PhaseConfig",
    "Placement",
    "PlacementKind",
    "SchedulerConfig",
    "check_range",
]
