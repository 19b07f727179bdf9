"""The config layer: the one range rule, `Parallelism`, and the configs that use them."""

import math
import re

import pytest

from distserve_rt.config import (
    POLICY_NAMES,
    DisaggConfig,
    EngineConfig,
    Parallelism,
    PhaseConfig,
    Placement,
    SchedulerConfig,
    check_range,
)
from distserve_rt.core.scheduler import POLICIES


@pytest.mark.parametrize(
    ("kwargs", "value", "message"),
    [
        ({"low": 1, "integer": True}, 0, "x must be an int >= 1, got 0"),
        ({"low": 1, "integer": True}, True, "x must be an int >= 1, got True"),
        ({"low": 1, "integer": True}, 2.0, "x must be an int >= 1, got 2.0"),
        ({"low": 0, "high": 1, "low_open": True}, 0, "x must be a number in (0, 1], got 0"),
        ({"low": 0, "high": 1, "high_open": True}, 1.0, "x must be a number in [0, 1), got 1.0"),
        ({"low": 0, "high": math.inf, "high_open": True}, math.nan, "in [0, inf), got nan"),
        ({"low": 0, "high": math.inf, "high_open": True}, math.inf, "in [0, inf), got inf"),
        ({"low": 0, "low_open": True, "unit": "seconds"}, "1", "x must be a number of seconds > 0"),
        ({"high": 5}, 6, "x must be a number <= 5, got 6"),
    ],
)
def test_check_range_refuses_with_name_value_and_range(kwargs, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_range("x", value, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "value"),
    [
        ({"low": 1, "integer": True}, 1),
        ({"low": 0, "high": 1, "low_open": True}, 1),
        ({"low": 0, "high": 1, "high_open": True}, 0.0),
        ({"low": 0, "high": math.inf, "high_open": True}, 1e9),
        ({}, -3.5),
    ],
)
def test_check_range_accepts_values_in_range(kwargs, value):
    check_range("x", value, **kwargs)


def test_every_config_uses_the_shared_rule():
    """One message shape whichever config refuses the value."""
    cases = [
        (lambda: EngineConfig(max_num_seqs=0), "max_num_seqs must be an int >= 1, got 0"),
        (lambda: EngineConfig(watermark=1), "watermark must be a number in [0, 1), got 1"),
        (lambda: SchedulerConfig(max_model_len=False), "max_model_len must be an int >= 1"),
        (lambda: PhaseConfig(cpu_cores=0), "cpu_cores must be an int >= 1, got 0"),
        (lambda: DisaggConfig(max_retries=-1), "max_retries must be an int >= 0, got -1"),
        (lambda: DisaggConfig(kv_lease_timeout_s=0), "a number of seconds > 0, got 0"),
        (lambda: Parallelism(1, 0), "pp_size must be an int >= 1, got 0"),
    ]
    for build, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            build()


def test_parallelism_is_the_one_spelling_of_tp_x_pp():
    assert Parallelism(2, 3).world_size == 6
    assert str(Parallelism(2, 1)) == "tp=2, pp=1"
    config = EngineConfig(tensor_parallel_size=2, pipeline_parallel_size=3)
    assert config.parallelism == Parallelism(2, 3)
    assert PhaseConfig(tp=4, pp=1).parallelism == Parallelism(4, 1)
    placement = Placement.disaggregated(PhaseConfig(tp=2, pp=2), PhaseConfig(tp=1))
    assert placement.max_num_ranks == 4
    assert placement.describe() == "1 prefill x (tp=2, pp=2) + 1 decode x (tp=1, pp=1)"


def test_policy_names_match_the_schedulers():
    assert tuple(POLICIES) == POLICY_NAMES
    with pytest.raises(ValueError, match="policy must be one of"):
        EngineConfig(policy="fcfs")
