"""Fakes for engine and scheduler tests.

* `FakeCausalLM`: a tiny deterministic model that really attends over the paged KV pool
  through `PagedAttention`, so a wrong slot, position, block table or prefix length changes
  its tokens. `reference_greedy` runs it one request at a time with no cache at all.
* `CheckingExecutor`: no model; checks every `SchedulerOutput` against the block manager
  and returns tokens that depend only on each request's token history (so preemption and
  chunking must not change them).
"""

from __future__ import annotations

import numpy as np
import torch

from distserve_rt.core.block_manager import BlockManager
from distserve_rt.core.scheduler import SchedulerConfig, SchedulerOutput
from distserve_rt.layers.attention import AttentionMetadata, PagedAttention
from distserve_rt.models.config import ModelConfig
from distserve_rt.worker.executor import Executor
from distserve_rt.worker.model_runner import ModelRunnerOutput

FAKE_CONFIG = ModelConfig(
    architecture="llama",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    name="fake",
)


class FakeCausalLM(torch.nn.Module):
    """Embedding + learned positions, `num_layers` x (q/k/v, paged attention, o, residual),
    an LM head with large-scale random weights (top-2 logit gaps far above fp32 noise)."""

    def __init__(self, config: ModelConfig = FAKE_CONFIG, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        h, d = config.hidden_size, config.head_dim

        def w(*shape: int, scale: float = 1.0) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.randn(*shape, generator=g) * scale, False)

        self.config = config
        self.start_layer, self.end_layer = 0, config.num_layers
        self.embed = w(config.vocab_size, h)
        self.pos = w(config.max_position_embeddings, h)
        self.qkv = torch.nn.ParameterList(
            w(h, (config.num_heads + 2 * config.num_kv_heads) * d, scale=h**-0.5)
            for _ in range(config.num_layers)
        )
        self.o = torch.nn.ParameterList(
            w(config.num_heads * d, h, scale=h**-0.5) for _ in range(config.num_layers)
        )
        self.lm_head = w(h, config.vocab_size, scale=4 * h**-0.5)
        self.attn = PagedAttention(config.num_heads, config.num_kv_heads, d, d**-0.5)

    def forward(self, input_ids, positions, kv_pool, metadata, intermediate=None):
        c = self.config
        x = self.embed[input_ids] + self.pos[positions]  # [T, hidden]
        for layer in range(c.num_layers):
            qkv = x @ self.qkv[layer]
            q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
            shape = (-1, c.num_kv_heads, c.head_dim)
            cache = None if kv_pool is None else kv_pool[:, layer]
            a = self.attn(
                q.reshape(-1, c.num_heads, c.head_dim),
                k.reshape(shape),
                v.reshape(shape),
                cache,
                metadata,
            )
            x = x + torch.tanh(a.reshape(len(x), -1) @ self.o[layer])
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden @ self.lm_head).float()

    def reference_greedy(self, prompt: list[int], num_tokens: int) -> list[int]:
        return reference_greedy(self, prompt, num_tokens)


@torch.inference_mode()
def reference_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    """Greedy decoding of any `CausalLM` with no KV cache: the whole sequence recomputed
    for each token, one request at a time (the plainest loop there is)."""
    tokens = list(prompt)
    for _ in range(num_tokens):
        n = len(tokens)
        metadata = AttentionMetadata(
            num_prefill_tokens=n,
            num_decode_tokens=0,
            slot_mapping=None,
            prefill_cu_seqlens=torch.tensor([0, n], dtype=torch.int32),
            prefill_max_seqlen=n,
        )
        hidden = model(torch.tensor(tokens), torch.arange(n), None, metadata)
        tokens.append(int(model.compute_logits(hidden[-1:]).argmax()))
    return tokens[len(prompt) :]


def history_token(token_ids: list[int], vocab_size: int = 64) -> int:
    """A token that depends on the whole history (order included), never EOS (2)."""
    h = 17
    for t in token_ids:
        h = (h * 1000003 + t) % 2147483647
    return 3 + h % (vocab_size - 3)


class CheckingExecutor(Executor):
    """No model: checks each step's KV bookkeeping, returns `history_token`s."""

    def __init__(self, block_manager_ref: list, config: ModelConfig = FAKE_CONFIG) -> None:
        self._config = config
        self._bm_ref = block_manager_ref  # filled by the test once the engine built it
        self.num_blocks = 0
        self.num_steps = 0

    @property
    def model_config(self) -> ModelConfig:
        return self._config

    def init_kv_cache(self, scheduler_config: SchedulerConfig) -> int:
        return self.num_blocks

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        self.num_steps += 1
        if self._bm_ref:
            check_scheduler_output(out, self._bm_ref[0])
        return ModelRunnerOutput([history_token(r.token_ids) for r in out.sampling_requests()])

    def shutdown(self) -> None:
        pass


def check_scheduler_output(out: SchedulerOutput, bm: BlockManager) -> None:
    """Every scheduled token has the slot its position maps to through the block table."""
    assert len(out.slot_mapping) == out.num_tokens
    start = 0
    for chunk in out.prefills:
        r = chunk.request
        assert chunk.prefix_len + chunk.num_new_tokens == r.num_computed_tokens
        assert r.num_computed_tokens <= r.num_tokens
        expected = bm.slot_mapping(r.seq_id, chunk.prefix_len, r.num_computed_tokens)
        np.testing.assert_array_equal(
            out.slot_mapping[start : start + chunk.num_new_tokens], expected
        )
        start += chunk.num_new_tokens
    for i, r in enumerate(out.decodes):
        assert r.num_computed_tokens == r.num_tokens == bm.num_tokens(r.seq_id)
        assert out.decode_seq_lens[i] == r.num_tokens
        assert out.slot_mapping[start + i] == bm.slot_mapping(r.seq_id, r.num_tokens - 1)[0]
