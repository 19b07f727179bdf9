"""The periodic one-line stats log on a driven clock: due at the interval and not before,
silent while idle, rates over the busy window (idle time does not dilute them), the same
line for the colocated engine and the disaggregated controller."""

from __future__ import annotations

import functools

import pytest

from distserve_rt.config import DisaggConfig, EngineConfig, Placement
from distserve_rt.engine import controller as controller_module
from distserve_rt.engine import llm_engine as llm_engine_module
from distserve_rt.engine.controller import Controller
from distserve_rt.engine.llm_engine import LLMEngine
from distserve_rt.engine.protocol import EngineStats, InstanceStats, TransferTotals
from distserve_rt.engine.stats import StatsLogger
from tests.engine.disagg_helpers import PROMPTS, drain, engine_config, greedy, kv_idle, settle
from tests.engine.fakes import FakeCausalLM


class DrivenClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Lines:
    """Stands in for the logger: keeps the formatted lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, line: str) -> None:
        self.lines.append(line)


def _colocated_stats(running=2, waiting=1, usage=0.25) -> EngineStats:
    return EngineStats([InstanceStats("colocated-0", "colocated", running, waiting, usage)])


def _logger(interval_s=10.0):
    clock, lines = DrivenClock(), Lines()
    return StatsLogger(lines, interval_s, clock), clock, lines  # type: ignore[arg-type]


def test_line_is_due_at_the_interval_and_not_before():
    stats, clock, lines = _logger()
    clock.t = 5.0
    stats.observe(busy=True)  # work starts: the interval counts from here
    stats.record(num_prefill_tokens=100, num_decode_tokens=40, num_preemptions=2)
    clock.t = 14.99
    assert not stats.maybe_log(_colocated_stats) and not lines.lines
    clock.t = 15.0
    assert stats.maybe_log(_colocated_stats)
    assert lines.lines == [
        "prefill 10.0 tok/s, decode 4.0 tok/s (busy 10.0 s of 10.0 s) | running 2, waiting 1"
        " | KV usage 25.0% | preemptions 2"
    ]
    clock.t = 24.0
    stats.record(num_decode_tokens=9)
    assert not stats.maybe_log(_colocated_stats)  # the next interval counts from 15
    clock.t = 25.0
    assert stats.maybe_log(_colocated_stats)
    assert lines.lines[-1].startswith("prefill 0.0 tok/s, decode 0.9 tok/s (busy 10.0 s of 10.0 s)")
    assert lines.lines[-1].endswith("preemptions 0")  # counts restart after each line


def test_idle_time_does_not_dilute_the_rates_and_an_idle_window_is_silent():
    stats, clock, lines = _logger()
    stats.observe(busy=True)
    clock.t = 1.0
    stats.record(num_prefill_tokens=50, num_decode_tokens=20)
    stats.observe(busy=False)  # 1 s of work, then 9 s idle
    clock.t = 3.0
    stats.observe(busy=True)
    clock.t = 4.0
    stats.record(num_decode_tokens=10)
    stats.observe(busy=False)
    clock.t = 10.0
    assert stats.maybe_log(_colocated_stats)
    # 30 decode tokens in 2 busy seconds: 15 tok/s, not 30 / 10 s of wall time.
    assert lines.lines[0].startswith("prefill 25.0 tok/s, decode 15.0 tok/s (busy 2.0 s of 10.0 s)")
    for t in (20.0, 35.0, 100.0):
        clock.t = t
        assert not stats.maybe_log(_colocated_stats)
    assert len(lines.lines) == 1


def test_a_busy_period_still_open_counts_up_to_the_line():
    stats, clock, lines = _logger()
    stats.observe(busy=True)
    clock.t = 12.0
    stats.record(num_prefill_tokens=24)
    assert stats.maybe_log(_colocated_stats)  # still busy: busy since 0
    assert lines.lines[0].startswith("prefill 2.0 tok/s, decode 0.0 tok/s (busy 12.0 s of 12.0 s)")
    clock.t = 16.0
    stats.observe(busy=False)
    clock.t = 30.0
    assert stats.maybe_log(_colocated_stats)  # the tail of that period: 4 s
    assert "(busy 4.0 s of 18.0 s)" in lines.lines[1]


@pytest.mark.parametrize("interval_s", [0.0, -1.0])
def test_interval_zero_or_less_disables_the_line(interval_s):
    stats, clock, lines = _logger(interval_s)
    stats.observe(busy=True)
    stats.record(num_prefill_tokens=10)
    clock.t = 1e6
    assert not stats.maybe_log(_colocated_stats) and not lines.lines


def test_disaggregated_line_has_queues_per_phase_kv_per_instance_and_migrations():
    stats, clock, lines = _logger()
    instances = [
        InstanceStats("prefill-0", "prefill", 1, 3, 0.5),
        InstanceStats("decode-0", "decode", 4, 0, 0.125),
        InstanceStats("decode-1", "decode", 9, 9, 0.9, alive=False),  # stale: not counted
    ]
    totals = TransferTotals("shm", num_transfers=3, num_failures=1, bytes=6 * 10**9, seconds=2.0)
    snapshot = EngineStats(instances, totals)
    stats.observe(busy=True)
    stats.record(num_prefill_tokens=30, num_decode_tokens=10)
    clock.t = 10.0
    assert stats.maybe_log(lambda: snapshot)
    assert lines.lines[0] == (
        "prefill 3.0 tok/s, decode 1.0 tok/s (busy 10.0 s of 10.0 s)"
        " | prefill running 1, waiting 3 | decode running 4, waiting 0"
        " | KV usage prefill-0 50.0%, decode-0 12.5%, decode-1 dead"
        " | migrations 3 (3.00 GB/s), failed transfers 1"
    )
    # The instances report totals since start: the next line shows what happened since.
    snapshot.transfers = TransferTotals("shm", 5, 1, 8 * 10**9, 6.0)
    stats.record(num_decode_tokens=10)
    clock.t = 20.0
    assert stats.maybe_log(lambda: snapshot)
    assert lines.lines[1].endswith("| migrations 2 (0.50 GB/s), failed transfers 0")


def _drive(monkeypatch, module) -> DrivenClock:
    """The engine under test builds its StatsLogger on a driven clock."""
    clock = DrivenClock()
    monkeypatch.setattr(module, "StatsLogger", functools.partial(StatsLogger, clock=clock))
    return clock


def _stats_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "tok/s" in r.getMessage()]


def test_colocated_engine_rates_over_its_busy_steps(monkeypatch, caplog):
    clock = _drive(monkeypatch, llm_engine_module)
    config = EngineConfig(
        model="fake", block_size=8, kv_cache_memory_bytes=1 << 20, log_stats_interval_s=10
    )
    engine = LLMEngine(config, model=FakeCausalLM())
    params = greedy(4)  # one token from the prefill, three from decode steps

    def run_steps() -> int:
        num_steps = 0
        while engine.has_unfinished_requests():
            clock.t += 1.0
            engine.step()
            num_steps += 1
        return num_steps

    with caplog.at_level("INFO", logger="distserve_rt"):
        engine.add_request("a", [5, 6, 7, 8, 9], params)
        engine.add_request("b", [3, 4, 5, 6, 7], params)
        assert run_steps() == 4  # busy from the first step (t=1) to the last (t=4)
        assert not _stats_lines(caplog)
        clock.t = 100.0  # idle for 96 s
        engine.add_request("c", [1, 2, 3, 4, 5], params)
        assert run_steps() == 4
    # Logged at the first step after the idle stretch (t=101): 15 prompt tokens and 6
    # decode tokens over 3 busy seconds; wall time would have said 15 / 100.
    (line,) = _stats_lines(caplog)
    assert line.startswith("prefill 5.0 tok/s, decode 2.0 tok/s (busy 3.0 s of 100.0 s)")
    assert "| running 1, waiting 0 |" in line and line.endswith("| preemptions 0")


def test_a_failed_last_step_closes_the_busy_window(monkeypatch, caplog):
    from tests.engine.test_engine_robustness import FailingOnceExecutor

    clock = _drive(monkeypatch, llm_engine_module)
    config = EngineConfig(
        model="fake", block_size=8, kv_cache_memory_bytes=1 << 20, log_stats_interval_s=10
    )
    engine = LLMEngine(config, model=FakeCausalLM())
    engine.executor = FailingOnceExecutor(engine.executor.worker, poison="x")
    with caplog.at_level("INFO", logger="distserve_rt"):
        engine.add_request("x", [5, 6, 7], greedy(4))
        clock.t = 1.0
        (failed,) = engine.step()
        assert failed.outputs[0].finish_reason == "error"
        clock.t = 60.0  # idle since the failure
        engine.add_request("y", [5, 6, 7, 8, 9], greedy(4))
        while engine.has_unfinished_requests():
            engine.step()
            clock.t += 1.0
        clock.t = 200.0
        engine.add_request("z", [1, 2, 3, 4, 5], greedy(4))
        engine.step()
    (line,) = _stats_lines(caplog)
    assert line.startswith("prefill 3.3 tok/s, decode 1.0 tok/s (busy 3.0 s of 140.0 s)")


def test_controller_logs_the_same_line_from_the_messages_it_receives(monkeypatch, caplog):
    clock = _drive(monkeypatch, controller_module)
    prompts = PROMPTS[:2]
    config = engine_config(log_stats_interval_s=10)
    with (
        caplog.at_level("INFO", logger="distserve_rt"),
        Controller(config, Placement.disaggregated(), DisaggConfig(launcher="thread")) as c,
    ):
        for i, prompt in enumerate(prompts):
            c.add_request(str(i), prompt, greedy(4))  # busy from t=0
        clock.t = 2.0
        drain(c)  # every step sees t=2: two busy seconds, then idle
        settle(c, lambda: c.stats().transfers.num_transfers == 2 and kv_idle(c))
        assert not _stats_lines(caplog)
        clock.t = 50.0
        c.step(0.0)
        clock.t = 100.0
        c.step(0.0)  # an idle window: no line
    (line,) = _stats_lines(caplog)
    num_prompt_tokens = sum(len(p) for p in prompts)
    expected = f"prefill {num_prompt_tokens / 2:.1f} tok/s, decode 3.0 tok/s "
    assert line.startswith(expected + "(busy 2.0 s of 50.0 s)")
    assert "| prefill running 0, waiting 0 | decode running 0, waiting 0 |" in line
    assert "| KV usage prefill-0 0.0%, decode-0 0.0% |" in line
    assert "| migrations 2 (" in line and line.endswith("GB/s), failed transfers 0")


def test_prefix_cache_hits_count_as_prefill_like_the_controller(monkeypatch, caplog):
    # Two 20-token prompts sharing their first two 8-token blocks: the second computes 4
    # tokens but prefills 20, as the controller and vLLM's prompt throughput count it.
    clock = _drive(monkeypatch, llm_engine_module)
    config = EngineConfig(
        model="fake", block_size=8, kv_cache_memory_bytes=1 << 20, log_stats_interval_s=10
    )
    engine = LLMEngine(config, model=FakeCausalLM())
    shared = list(range(3, 19))
    with caplog.at_level("INFO", logger="distserve_rt"):
        for i, tail in enumerate(([40, 41, 42, 43], [50, 51, 52, 53])):
            engine.add_request(str(i), shared + tail, greedy(2))
            while engine.has_unfinished_requests():
                clock.t += 1.0
                engine.step()
        assert engine.stats().instances[0].prefix_cache_hits == 16
        clock.t = 11.0  # the interval counts from the first step (t=1)
        engine.add_request("last", [7, 7, 7], greedy(1))
        engine.step()
    (line,) = _stats_lines(caplog)
    # Each request is busy from its first step to its last (1 s): 2 busy seconds. 43
    # prompt tokens (computed: 20 + 4 + 3 = 27) and 2 decode tokens.
    assert line.startswith("prefill 21.5 tok/s, decode 1.0 tok/s (busy 2.0 s of 10.0 s)")
