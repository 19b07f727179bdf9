"""One run of ab_trees.py's disaggregated job: prints [output tok/s, median TPOT ms]."""

import json
import time

from distserve_rt import LLM, SamplingParams

if __name__ == "__main__":
    llm = LLM("dummy:llama-tiny", placement="disaggregated", kv_cache_memory_bytes=256 << 20,
              log_stats_interval_s=0)  # fmt: skip
    prompts = [{"prompt_token_ids": [3 + (7 * i + j) % 500 for j in range(64)]} for i in range(48)]
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    llm.generate(prompts[:4], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tpot = sorted(o.metrics.tpot for o in outputs)[len(outputs) // 2]
    print(json.dumps([len(prompts) * 128 / seconds, tpot * 1e3]))
    llm.shutdown()
