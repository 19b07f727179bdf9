"""TP=2 in two real processes (torch.distributed, gloo) gives the logits and greedy tokens of
TP=1: Llama with GQA (2 kv heads split over 2 ranks), OPT with an odd vocabulary (padded
vocab shards), Qwen2 (q/k/v biases sharded with their rows), Qwen3 (replicated q/k norms),
Phi-3 (each rank reads its rows of the fused qkv and gate_up tensors), Gemma (tied, scaled
embeddings) and the llama-tiny dummy (whose weights do not depend on the layout)."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distserve_rt.distributed import ParallelContext
from distserve_rt.models import load_model
from tests.models.hf_fixtures import save_llama, save_opt
from tests.models.paged_runner import PagedRunner, greedy_generate

PROMPTS = [[5, 9, 100, 7, 33, 250, 18, 4, 4, 61, 99], [70, 71, 72]]
NUM_NEW_TOKENS = 6


def _run(model_name: str, parallel: ParallelContext) -> dict[str, torch.Tensor]:
    model, _ = load_model(model_name, dtype="float32", parallel=parallel)
    prefill = PagedRunner(model).step(prefills=list(enumerate(PROMPTS)))
    tokens = greedy_generate(PagedRunner(model), PROMPTS[0], NUM_NEW_TOKENS)
    return {"prefill": prefill, "tokens": torch.tensor(tokens)}


def _worker(rank: int, port: int, models: list[str], out_path: str) -> None:
    torch.set_num_threads(1)  # two ranks share the CI's two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        parallel = ParallelContext(tp_size=2, tp_rank=rank, tp_group=dist.group.WORLD)
        results = {name: _run(name, parallel) for name in models}
        if rank == 0:
            torch.save(results, out_path)
        # Both ranks done before either tears gloo down: a rank destroying its group while
        # the peer's last collective is still in flight aborted with std::terminate.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_tp2_equals_tp1(tmp_path, checkpoint_dirs):
    models = [
        str(checkpoint_dirs("llama-gqa")),
        str(save_opt(tmp_path / "opt_odd_vocab", vocab_size=321)),
        str(save_llama(tmp_path / "llama_tied", tie_word_embeddings=True)),
        str(checkpoint_dirs("qwen2")),
        str(checkpoint_dirs("qwen3")),
        str(checkpoint_dirs("phi3")),
        str(checkpoint_dirs("gemma")),
        "dummy:llama-tiny",
    ]
    out_path = str(tmp_path / "tp2.pt")
    mp.spawn(_worker, args=(_free_port(), models, out_path), nprocs=2, join=True)
    tp2 = torch.load(out_path)
    for name in models:
        expected = _run(name, ParallelContext())
        torch.testing.assert_close(tp2[name]["prefill"], expected["prefill"], rtol=1e-4, atol=1e-4)
        assert tp2[name]["tokens"].tolist() == expected["tokens"].tolist(), name
