"""AsyncLLM over both placements: streaming (first token first), abort by closing the
stream, stats, health, overload, flags -> configs."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from distserve_rt.config import DisaggConfig, Placement
from distserve_rt.engine.async_llm import AsyncLLM
from distserve_rt.engine.protocol import EngineClient, EngineOverloadedError
from distserve_rt.entrypoints.engine_args import add_engine_args, configs_from_args
from distserve_rt.models.presets import get_preset
from tests.engine.disagg_helpers import PROMPTS, engine_config, greedy


def _llm(placement: str, **kwargs) -> AsyncLLM:
    return AsyncLLM.from_config(
        engine_config(), placement, DisaggConfig(launcher="thread"), **kwargs
    )


async def _collect(llm: AsyncLLM, request_id: str, prompt, max_tokens: int):
    return [o async for o in llm.generate(prompt, greedy(max_tokens), request_id)]


@pytest.mark.parametrize("placement", ["colocated", "disaggregated"])
def test_streams_first_token_first_and_reports_stats(placement):
    async def main():
        async with _llm(placement) as llm:
            assert isinstance(llm, EngineClient)
            await llm.check_health()
            results = await asyncio.gather(
                *(_collect(llm, f"r{i}", {"prompt_token_ids": p}, 6) for i, p in enumerate(PROMPTS))
            )
            text = await _collect(llm, "text", "Hello", 4)
            stats = llm.stats()
        return results, text, stats

    results, text, stats = asyncio.run(main())
    for outputs in results:
        assert len(outputs[0].outputs[0].token_ids) == 1  # the first token, streamed at once
        assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 6
        assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
    assert text[-1].outputs[0].text and text[-1].prompt == "Hello"
    roles = [s.role for s in stats.instances]
    assert roles == (["colocated"] if placement == "colocated" else ["prefill", "decode"])


def test_disaggregated_stream_equals_colocated_and_closing_it_aborts():
    async def main(placement):
        async with _llm(placement, max_num_pending=2) as llm:
            outputs = await _collect(llm, "a", {"prompt_token_ids": PROMPTS[3]}, 8)
            stream = llm.generate({"prompt_token_ids": PROMPTS[2]}, greedy(500), "long")
            first = await stream.__anext__()
            blocker = llm.generate({"prompt_token_ids": PROMPTS[1]}, greedy(500), "b")
            await blocker.__anext__()
            with pytest.raises(EngineOverloadedError):
                await llm.generate({"prompt_token_ids": [5]}, greedy(2), "c").__anext__()
            await stream.aclose()  # the client went away: the request is aborted
            await blocker.aclose()
            for _ in range(200):
                if all(s.num_running == 0 for s in llm.stats().instances):
                    break
                await asyncio.sleep(0.02)
            return outputs[-1].outputs[0].token_ids, first, llm.stats()

    colocated, *_ = asyncio.run(main("colocated"))
    disagg, first, stats = asyncio.run(main("disaggregated"))
    assert disagg == colocated and len(first.outputs[0].token_ids) == 1
    assert all(s.num_running == 0 and s.num_waiting == 0 for s in stats.instances)
    assert stats.transfers.transport == "shm" and stats.transfers.num_transfers >= 1


def test_flags_build_configs_and_reject_unsupported_parallelism():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(
        ["--placement", "disaggregated", "--num-decode-instances", "2", "--max-model-len", "64"]
    )
    config, placement, disagg = configs_from_args(args)
    assert placement.decode.num_instances == 2 and placement.prefill.num_instances == 1
    assert config.max_model_len == 64 and disagg.pin_cpus
    with pytest.raises(ValueError, match="--num-decode-instances need --placement disagg"):
        configs_from_args(parser.parse_args(["--num-decode-instances", "2"]))
    args = parser.parse_args(["--placement", "disaggregated", "--decode-tp", "4"])
    with pytest.raises(ValueError, match=r"decode instances \(tp=4, pp=1\) do not fit"):
        configs_from_args(args)[1].check_supported(get_preset("llama-tiny"))  # 2 KV heads
    with pytest.raises(ValueError, match="only 1 are available"):
        Placement.parse("disaggregated").cpu_core_groups(available=[0])
