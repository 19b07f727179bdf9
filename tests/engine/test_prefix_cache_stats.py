"""Prefix-cache counters where people read them: the engine's stats, the periodic stats
line, the Prometheus collector (vLLM's prefix_cache_queries / _hits), and the CLI flag."""

from __future__ import annotations

import argparse

from distserve_rt import LLM, SamplingParams
from distserve_rt.engine.protocol import EngineStats, InstanceStats
from distserve_rt.engine.stats import StatsLogger
from distserve_rt.entrypoints import engine_args
from distserve_rt.metrics.prometheus import EngineStatsCollector
from tests.engine.test_prefix_caching import make_engine
from tests.engine.test_stats_log import DrivenClock, Lines


def test_engine_stats_count_queries_and_hits():
    engine = make_engine(True, "chunked_prefill", 64, None)
    prompt = {"prompt_token_ids": list(range(3, 3 + 20))}  # 2 full blocks of 8, then 4
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    llm = LLM.from_engine(engine)
    llm.generate([prompt], params, use_tqdm=False)
    llm.generate([prompt], params, use_tqdm=False)
    (instance,) = engine.stats().instances
    assert (instance.prefix_cache_queries, instance.prefix_cache_hits) == (40, 16)
    off = make_engine(False, "chunked_prefill", 64, None)
    LLM.from_engine(off).generate([prompt, prompt], params, use_tqdm=False)
    assert off.stats().instances[0].prefix_cache_queries == 0


def _stats(queries: int, hits: int) -> EngineStats:
    instance = InstanceStats("colocated-0", "colocated", 1, 0, 0.5, True, queries, hits)
    return EngineStats([instance])


def test_stats_line_shows_the_hit_rate_only_when_caching_ran():
    clock, lines = DrivenClock(), Lines()
    logger = StatsLogger(lines, 10.0, clock)  # type: ignore[arg-type]
    logger.observe(busy=True)
    logger.record(num_prefill_tokens=10, num_decode_tokens=0, num_preemptions=0)
    clock.t = 10.0
    assert logger.maybe_log(lambda: _stats(400, 100))
    assert "| prefix cache hit rate 25.0% |" in lines.lines[-1]
    logger.record(num_prefill_tokens=10, num_decode_tokens=0, num_preemptions=0)
    clock.t = 20.0
    assert logger.maybe_log(lambda: _stats(0, 0))
    assert "prefix cache" not in lines.lines[-1]


def test_prometheus_exports_queries_and_hits_per_instance():
    families = {f.name: f for f in EngineStatsCollector(lambda: _stats(400, 100)).collect()}
    labels = {"instance": "colocated-0", "role": "colocated"}
    for name, value in (("queries", 400), ("hits", 100)):
        family = families[f"distserve_instance_prefix_cache_{name}"]
        assert family.type == "counter"
        (sample,) = [s for s in family.samples if s.name.endswith("_total")]
        assert (sample.labels, sample.value) == (labels, value)


def test_cli_flag_turns_it_off_and_on():
    parser = argparse.ArgumentParser()
    engine_args.add_engine_args(parser)

    def config(*argv: str):
        return engine_args.configs_from_args(parser.parse_args(list(argv)))[0]

    assert config().enable_prefix_caching
    assert not config("--no-enable-prefix-caching").enable_prefix_caching
    assert config("--enable-prefix-caching").enable_prefix_caching
