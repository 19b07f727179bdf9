"""bench/multi_turn.py's replay: every turn of every conversation is served closed loop
(the next turn's prompt holds the engine's own answer, so the colocated cache hits it, as
many tokens as the simulator predicts), and its argument errors."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from tqdm import tqdm

from distserve_rt.engine import EngineConfig, LLMEngine
from distserve_rt.workloads.multi_turn import MultiTurnWorkload
from tests.engine.fakes import FakeCausalLM

_PATH = Path(__file__).resolve().parents[2] / "bench" / "multi_turn.py"
_spec = importlib.util.spec_from_file_location("bench_multi_turn", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # its dataclasses look their module up there
_spec.loader.exec_module(bench)


def test_replay_serves_every_turn_and_hits_the_cache():
    w = MultiTurnWorkload.generate(
        3, rate=50.0, scale=0.03, think_s=0.0, max_seq_len=250, vocab_size=64, seed=1
    )
    config = EngineConfig(
        model="fake", block_size=16, log_stats_interval_s=0, max_num_seqs=8,
        max_num_batched_tokens=64, kv_cache_memory_bytes=64 << 20,
    )  # fmt: skip
    engine = LLMEngine(config, model=FakeCausalLM())
    with tqdm(total=w.num_requests, disable=True) as bar:
        got = bench.replay(engine, w, bar)
    stats = engine.block_manager.stats()
    engine.shutdown()
    assert got["ttft"].size == w.num_requests and got["num_errors"] == 0
    assert stats.prefix_cache_hits > 0
    engine = LLMEngine(config, model=FakeCausalLM())
    setup = bench.Setup("colocated", True)
    sim = bench.simulated_counters(setup, engine, w, 1 << 20, 256)
    engine.shutdown()
    assert (sim.prefix_cache_queries, sim.prefix_cache_hits) == (
        stats.prefix_cache_queries,
        stats.prefix_cache_hits,
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--turns", "3"], "--turns must be MIN,MAX"), (["--threads", "0"], "--threads must be")],
)
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err
