"""`LLM` as a vLLM user calls it: hub ids from the local HF cache, ``LLM.chat``,
``apply_chat_template(tokenize=False)`` and vLLM's keyword arguments (honoured, accepted
with nothing to do, or refused in one line)."""

from __future__ import annotations

import json

import pytest

from distserve_rt import LLM, SamplingParams
from tests.models.hf_fixtures import save_llama, save_tokenizer
from tests.models.test_hf_cache import COMMIT, make_cached_repo

TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "the cat sat"},
]
GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
SMALL = dict(kv_cache_memory_bytes=8 << 20, log_stats_interval_s=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama with a tokenizer carrying `TEMPLATE`."""
    path = save_llama(tmp_path_factory.mktemp("tiny") / "llama")
    save_tokenizer(path, chat_template=TEMPLATE)
    return path


@pytest.fixture(scope="module")
def llm(model_dir):
    with LLM(str(model_dir), **SMALL) as llm:
        yield llm


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, model_dir):
    """HF_HUB_CACHE holding `model_dir` as org/tiny-llama at refs/main."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    cache = tmp_path / "hub"
    repo = make_cached_repo(cache, "org/tiny-llama", {"main": COMMIT})
    snapshot = repo / "snapshots" / COMMIT
    snapshot.rmdir()
    snapshot.symlink_to(model_dir)  # huggingface_hub's snapshots are links too (to blobs)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_hub_id_loads_from_the_cache_like_the_directory(llm, hub_cache):
    expected = [o.outputs[0].token_ids for o in llm.generate(["the cat"], GREEDY, use_tqdm=False)]
    with LLM("org/tiny-llama", revision=COMMIT, tokenizer="org/tiny-llama", **SMALL) as cached:
        outputs = cached.generate(["the cat"], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected


def test_hub_id_not_cached_is_one_line(hub_cache):
    with pytest.raises(FileNotFoundError, match=r"^model 'org/absent' is not in the local") as e:
        LLM("org/absent", **SMALL)
    assert "\n" not in str(e.value)


def test_apply_chat_template_tokenize(llm):
    tokenizer = llm.get_tokenizer()
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == "[system] be brief\n[user] the cat sat\n[assistant]"
    ids = tokenizer.apply_chat_template(CONVERSATION, tokenize=True)
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    cont = tokenizer.apply_chat_template(
        CONVERSATION, add_generation_prompt=False, continue_final_message=True
    )
    assert cont == "[system] be brief\n[user] the cat sat"


def test_chat_equals_generate_on_the_rendered_prompt(llm):
    text = llm.get_tokenizer().apply_chat_template(CONVERSATION, tokenize=False)
    (expected,) = llm.generate(text, GREEDY, use_tqdm=False)
    (chat,) = llm.chat(CONVERSATION, GREEDY, use_tqdm=False)
    assert chat.prompt == text
    assert chat.prompt_token_ids == expected.prompt_token_ids
    assert chat.outputs[0].token_ids == expected.outputs[0].token_ids
    assert chat.outputs[0].text == expected.outputs[0].text
    # A list of conversations, and a template given to the call.
    other = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    outputs = llm.chat(
        [CONVERSATION, CONVERSATION[1:]], GREEDY, chat_template=other, use_tqdm=False
    )
    assert [o.prompt for o in outputs] == ["be brief the cat sat ", "the cat sat "]


def test_chat_refuses_tools_and_bad_messages(llm):
    with pytest.raises(NotImplementedError, match="tool calling is not supported"):
        llm.chat(CONVERSATION, tools=[{"type": "function"}])
    with pytest.raises(ValueError, match="messages must be a conversation"):
        llm.chat("hello")


def test_chat_template_flag_file_or_inline(model_dir, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}<{{ m['content'] }}>{% endfor %}")
    for value in (str(path), path.read_text()):
        with LLM(str(model_dir), chat_template=value, **SMALL) as llm:
            assert (
                llm.get_tokenizer().apply_chat_template(CONVERSATION) == "<be brief><the cat sat>"
            )
    with pytest.raises(FileNotFoundError, match="is neither a file nor a Jinja template"):
        LLM(str(model_dir), chat_template="no-such.jinja", **SMALL)


def test_vllm_kwargs_honoured_accepted_or_refused():
    with LLM("dummy:llama-tiny", enforce_eager=True, seed=7, max_model_len=64, **SMALL) as llm:
        assert llm.llm_engine.config.seed == 7
        assert llm.llm_engine.scheduler_config.max_model_len == 64
    with pytest.raises(TypeError, match=r"'max_model_length'; did you mean max_model_len\?"):
        LLM("dummy:llama-tiny", max_model_length=64)
    with pytest.raises(ValueError, match="quantization='awq' is not supported"):
        LLM("dummy:llama-tiny", quantization="awq")
    with pytest.raises(ValueError, match="gpu_memory_utilization=0.5 sizes GPU memory but"):
        LLM("dummy:llama-tiny", gpu_memory_utilization=0.5)


def test_custom_code_architecture_is_refused(model_dir, tmp_path):
    custom = tmp_path / "custom"
    custom.mkdir()
    config = json.loads((model_dir / "config.json").read_text())
    config.update(architectures=["MyModelForCausalLM"], model_type="mymodel")
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_my.MyModelForCausalLM"}
    (custom / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="needs the checkpoint's custom code .* never runs"):
        LLM(str(custom), trust_remote_code=True, **SMALL)


def test_logprobs_are_vllm_logprob_objects_matching_hf(llm, model_dir):
    """vLLM's type per position ({token id: Logprob(logprob, rank, decoded_token)}), with
    values and ranks from transformers' full forward pass (fp32, 1e-4)."""
    import torch

    from distserve_rt import Logprob
    from tests.models.hf_fixtures import load_hf

    prompt = [5, 17, 42, 99, 7, 3]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3)
    (out,) = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
    completion = out.outputs[0]
    hf = load_hf(model_dir)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + completion.token_ids[:-1]])).logits[0]
    ref = torch.log_softmax(logits.float(), dim=-1)[len(prompt) - 1 :]
    tokenizer = llm.get_tokenizer()
    assert len(completion.logprobs) == 4
    for pos, (token, row) in enumerate(zip(completion.token_ids, completion.logprobs, strict=True)):
        assert all(isinstance(lp, Logprob) for lp in row.values())
        top = ref[pos].topk(3).indices.tolist()
        assert list(row) == top  # greedy: the sampled token is the top one, listed once
        assert [row[t].rank for t in top] == [1, 2, 3] and token == top[0]
        for token_id, lp in row.items():
            assert lp.logprob == pytest.approx(ref[pos, token_id].item(), abs=1e-4)
            assert lp.decoded_token == tokenizer.decode([token_id], skip_special_tokens=False)
    assert completion.cumulative_logprob == pytest.approx(
        sum(
            row[t].logprob for t, row in zip(completion.token_ids, completion.logprobs, strict=True)
        )
    )


def test_sampled_token_outside_the_top_k_gets_its_vocabulary_rank(llm):
    params = SamplingParams(temperature=5.0, seed=3, max_tokens=12, ignore_eos=True, logprobs=1)
    (out,) = llm.generate({"prompt_token_ids": [5, 17, 42]}, params, use_tqdm=False)
    c = out.outputs[0]
    outside = [
        (row[t], row) for t, row in zip(c.token_ids, c.logprobs, strict=True) if row[t].rank != 1
    ]
    assert outside, "temperature 5 sampled only top tokens: pick another seed"
    for sampled, row in outside:
        (top,) = [lp for lp in row.values() if lp.rank == 1]
        assert len(row) == 2 and sampled.rank > 1 and sampled.logprob <= top.logprob
