"""`LLM`: offline batch generation, shaped like vLLM's ``LLM``.

from distserve_rt import LLM, SamplingParams
llm = LLM("dummy:llama-tiny", policy="chunked_prefill")
outputs = llm.generate(["Hello", {"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=8))
outputs[0].outputs[0].text, outputs[0].outputs[0].token_ids
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from distserve_rt.config import DisaggConfig, EngineConfig, Placement
from distserve_rt.engine.core import make_engine_core
from distserve_rt.engine.protocol import EngineCore
from distserve_rt.outputs import RequestOutput
from distserve_rt.sampling_params import SamplingParams

# A prompt: text, or {"prompt_token_ids": [...]} (already tokenized).
Prompt = str | dict[str, Any]


class LLM:
    """An engine for offline use: colocated (`LLMEngine`) or disaggregated (`Controller`).

    Args:
        model: a local HF directory or ``dummy:<preset>``.
        dtype: "auto", "float32", "bfloat16" or "float16".
        placement: a `Placement`, "colocated" (default), "disaggregated" (1 prefill + 1
            decode instance) or a placement YAML file. Disaggregated instances are spawned
            processes: scripts need an ``if __name__ == "__main__":`` guard.
        disagg_config: a `DisaggConfig` (leases, retries, pinning) for disaggregated ones.
        engine_kwargs: the other `EngineConfig` fields (policy, device, max_num_seqs, ...).
    """

    def __init__(
        self,
        model: str = "dummy:llama-tiny",
        dtype: str = "auto",
        placement: Placement | str | None = None,
        disagg_config: DisaggConfig | None = None,
        **engine_kwargs,
    ):
        config = EngineConfig(model=model, dtype=dtype, **engine_kwargs)
        self.llm_engine: EngineCore = make_engine_core(config, placement, disagg_config)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stops the engine (the instance processes of a disaggregated placement)."""
        self.llm_engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @classmethod
    def from_engine(cls, engine: EngineCore) -> LLM:
        """Wraps an engine built by hand (a prebuilt model, a custom executor)."""
        llm = cls.__new__(cls)
        llm.llm_engine = engine
        llm._ids = itertools.count()
        return llm

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generates a completion for each prompt; returns the outputs in input order.

        `sampling_params`: None (defaults), one for all prompts, or one per prompt.
        Raises ValueError naming the index of an invalid prompt (before any is queued).
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = self._params_per_prompt(sampling_params, len(prompts))
        token_ids = [self._tokenize(i, p) for i, p in enumerate(prompts)]
        engine = self.llm_engine
        order: dict[str, int] = {}
        for i, (prompt, ids, sp) in enumerate(zip(prompts, token_ids, params, strict=True)):
            request_id = str(next(self._ids))
            text = prompt if isinstance(prompt, str) else None
            engine.add_request(request_id, ids, sp, prompt=text)
            order[request_id] = i
        results: list[RequestOutput | None] = [None] * len(prompts)
        with tqdm(total=len(prompts), desc="Processed prompts", disable=not use_tqdm) as bar:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        results[order[output.request_id]] = output
                        bar.update(1)
        return results  # type: ignore[return-value]

    def _params_per_prompt(
        self, sampling_params: SamplingParams | Sequence[SamplingParams] | None, n: int
    ) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        params = list(sampling_params)
        if len(params) != n:
            raise ValueError(
                f"sampling_params has {len(params)} entries for {n} prompts; pass one, "
                "or one per prompt"
            )
        for i, p in enumerate(params):
            if not isinstance(p, SamplingParams):
                raise ValueError(f"sampling_params[{i}] must be a SamplingParams, got {p!r}")
        return params

    def _tokenize(self, index: int, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError(f"prompts[{index}] is an empty string")
            tokenizer = self.llm_engine.tokenizer
            if tokenizer is None:
                raise ValueError(
                    f"prompts[{index}] is text but the engine has no tokenizer; pass "
                    '{"prompt_token_ids": [...]}'
                )
            return tokenizer.encode(prompt)
        if isinstance(prompt, dict) and set(prompt) == {"prompt_token_ids"}:
            ids = prompt["prompt_token_ids"]
            vocab_size = self.llm_engine.model_config.vocab_size
            valid = isinstance(ids, (list, tuple)) and len(ids) > 0
            valid = valid and all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids
            )
            if not valid:
                raise ValueError(
                    f"prompts[{index}]['prompt_token_ids'] must be a non-empty list of ints "
                    f"in [0, {vocab_size}), got {ids!r}"
                )
            return list(ids)
        raise ValueError(
            f'prompts[{index}] must be a str or {{"prompt_token_ids": [...]}}, got {prompt!r}'
        )
