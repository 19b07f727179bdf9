"""Request workloads: length datasets, synthetic lengths, arrival processes, SLO presets."""

from distserve_rt.workloads.arrivals import arrival_times, unit_interarrivals
from distserve_rt.workloads.datasets import DATASET_ALIASES, DATASETS, load_lengths
from distserve_rt.workloads.length_file import LengthFile, LengthFileError, load_length_file
from distserve_rt.workloads.multi_turn import Conversation, MultiTurnWorkload, Turn
from distserve_rt.workloads.slo_presets import SLO_PRESETS, SLOPreset, get_slo_preset
from distserve_rt.workloads.workload import LengthDist, Workload

__all__ = [
    "Conversation",
    "DATASETS",
    "DATASET_ALIASES",
    "SLO_PRESETS",
    "LengthDist",
    "LengthFile",
    "LengthFileError",
    "MultiTurnWorkload",
    "SLOPreset",
    "Turn",
    "Workload",
    "arrival_times",
    "get_slo_preset",
    "load_length_file",
    "load_lengths",
    "unit_interarrivals",
]
