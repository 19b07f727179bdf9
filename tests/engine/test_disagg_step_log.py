"""The instances' step logs reach the controller (`Controller.enable_step_log`): what the
simulator comparison reads for 1P1D, as it reads `LLMEngine`'s step log colocated."""

from __future__ import annotations

import pytest

from distserve_rt.config import DisaggConfig, Placement
from distserve_rt.engine.controller import Controller
from tests.engine.disagg_helpers import PROMPTS, engine_config, run

MAX_TOKENS = 6


def test_each_instance_logs_its_own_steps_and_the_controller_gathers_them():
    config = engine_config(enable_prefix_caching=False)
    with Controller(config, Placement.disaggregated(), DisaggConfig(launcher="thread")) as c:
        log = c.enable_step_log(1 << 12)
        outputs = run(c, max_tokens=MAX_TOKENS)
        logs = log.by_instance()
        assert set(logs) == {"prefill-0", "decode-0"}
        prefill, decode = logs["prefill-0"], logs["decode-0"]
        # Every prompt token was prefilled once, on the prefill instance, in prefill steps.
        assert {r.shape.kind for r in prefill} == {"prefill"}
        assert sum(r.shape.num_prefill_tokens for r in prefill) == sum(map(len, PROMPTS))
        # The decode instance ran the other tokens: one per request per decode step.
        assert {r.shape.kind for r in decode} == {"decode"}
        assert sum(r.shape.num_decodes for r in decode) == len(PROMPTS) * (MAX_TOKENS - 1)
        assert all(0 < r.execute_s <= r.duration_s for r in prefill + decode)
        for steps in (prefill, decode):  # each instance's steps in order, with their starts
            starts = [r.start_s for r in steps]
            assert None not in starts and starts == sorted(starts)
        assert log.records() == prefill + decode and len(outputs) == len(PROMPTS)
        # Gathering stopped the logs: the next requests are not recorded anywhere.
        run(c, max_tokens=2)
        again = c.enable_step_log(16)
        assert all(records == [] for records in again.by_instance().values())


def test_a_capacity_below_one_is_refused():
    config, threads = engine_config(), DisaggConfig(launcher="thread")
    message = "step log capacity must be a positive int, got 0"
    with (
        Controller(config, Placement.disaggregated(), threads) as c,
        pytest.raises(ValueError, match=message),
    ):
        c.enable_step_log(0)
