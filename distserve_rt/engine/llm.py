"""`LLM`: offline batch generation, shaped like vLLM's ``LLM``.

from distserve_rt import LLM, SamplingParams
llm = LLM("dummy:llama-tiny", policy="chunked_prefill")
outputs = llm.generate(["Hello", {"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=8))
outputs[0].outputs[0].text, outputs[0].outputs[0].token_ids
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from tqdm import tqdm

from distserve_rt.config import DisaggConfig, Placement
from distserve_rt.engine.core import make_engine_core
from distserve_rt.engine.llm_kwargs import engine_config_from_kwargs
from distserve_rt.engine.protocol import EngineCore
from distserve_rt.outputs import RequestOutput
from distserve_rt.sampling_params import SamplingParams
from distserve_rt.tokenizer import load_chat_template
from distserve_rt.tokenizer.base import Message

# A prompt: text, or {"prompt_token_ids": [...]} (already tokenized).
Prompt = str | dict[str, Any]


class LLM:
    """An engine for offline use: colocated (`LLMEngine`) or disaggregated (`Controller`).

    Args:
        model: a local HF directory, a hub id (``org/name``) in the local Hugging Face cache
            (``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``; nothing is
            downloaded) or ``dummy:<preset>``.
        tokenizer: the tokenizer's directory or cached hub id when not the model's.
        placement: a `Placement`, "colocated" (default), "disaggregated" (1 prefill + 1
            decode instance) or a placement YAML file. Disaggregated instances are spawned
            processes: scripts need an ``if __name__ == "__main__":`` guard.
        disagg_config: a `DisaggConfig` (leases, retries, pinning) for disaggregated ones.
        kwargs: vLLM's keywords (`engine.llm_kwargs`): the `EngineConfig` fields (dtype,
            seed, revision, tokenizer_revision, trust_remote_code (custom code is never
            run), max_model_len, gpu_memory_utilization (GPU only), tensor_parallel_size,
            policy, device, max_num_seqs, ...); ``enforce_eager`` is accepted and changes
            nothing: there are no CUDA graphs here, every step runs eagerly. A keyword this
            engine cannot honour is a ValueError saying why, an unknown one a TypeError.
    """

    def __init__(
        self,
        model: str = "dummy:llama-tiny",
        tokenizer: str | None = None,
        *,
        placement: Placement | str | None = None,
        disagg_config: DisaggConfig | None = None,
        **kwargs: Any,
    ):
        if tokenizer is not None:
            kwargs["tokenizer"] = tokenizer
        config = engine_config_from_kwargs(model=model, **kwargs)
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

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        """Generates a reply to one conversation (a list of ``{"role", "content"}`` dicts)
        or to each of a list of them, as vLLM's ``LLM.chat``: each is rendered with the
        tokenizer's chat template (or `chat_template`: inline Jinja or a file), and the text
        generated from as `generate` would (so ``chat(m)`` equals
        ``generate(tokenizer.apply_chat_template(m, tokenize=False))``).

        `chat_template_kwargs`: extra variables for the template. `continue_final_message`:
        continue the last message instead of starting a reply (needs
        ``add_generation_prompt=False``). Tool calling (`tools`) is not supported: a
        NotImplementedError, rather than a prompt silently without the tools."""
        if tools is not None:
            raise NotImplementedError(
                "LLM.chat(tools=...): tool calling is not supported (no tool parsers)"
            )
        tokenizer = self.llm_engine.tokenizer
        if tokenizer is None:
            raise ValueError("LLM.chat needs a tokenizer; this engine runs without one")
        conversations = _conversations(messages)
        template = None if chat_template is None else load_chat_template(chat_template)
        prompts = [
            tokenizer.apply_chat_template(
                conversation,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                chat_template=template,
                continue_final_message=continue_final_message,
                **(chat_template_kwargs or {}),
            )
            for conversation in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

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


def _conversations(messages: Any) -> list[Sequence[Message]]:
    """One conversation (a list of message dicts) or a list of them, as a list of them."""
    if isinstance(messages, Sequence) and not isinstance(messages, (str, bytes)):
        if messages and all(
            isinstance(m, Sequence) and not isinstance(m, (str, bytes)) for m in messages
        ):
            return list(messages)
        if messages and all(isinstance(m, Mapping) for m in messages):
            return [messages]
    raise ValueError(
        "messages must be a conversation (a non-empty list of {'role', 'content'} dicts) or "
        f"a list of conversations, got {messages!r}"
    )
