"""Tokenizers: the dummy models' byte tokenizer and HF tokenizer.json directories (checked
against transformers' fast tokenizer on the same file), chat templates."""

from __future__ import annotations

import json

import pytest
from jinja2.exceptions import TemplateError

from distserve_rt.models import PRESETS, get_preset
from distserve_rt.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, get_tokenizer
from distserve_rt.tokenizer.byte_tokenizer import NUM_SPECIAL_IDS
from tests.models.hf_fixtures import save_tokenizer

TEXTS = ["hello world", "the key value cache moves", "naïve 数据 🙂", ""]
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_dummy_preset_has_a_byte_tokenizer(name):
    tokenizer = get_tokenizer(f"dummy:{name}")
    config = get_preset(name)
    assert isinstance(tokenizer, Tokenizer)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        config.bos_token_id,
        config.eos_token_id,
    )
    assert tokenizer.vocab_size == config.vocab_size
    assert tokenizer.decode(tokenizer.encode("héllo")) == "héllo"


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trip(text):
    tokenizer = get_tokenizer("dummy:llama-tiny")
    ids = tokenizer.encode(text)
    assert ids[0] == 1 and len(ids) == 1 + len(text.encode())
    assert all(NUM_SPECIAL_IDS <= i < NUM_SPECIAL_IDS + 256 for i in ids[1:])
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(text, add_special_tokens=False) == ids[1:]


def test_byte_tokenizer_specials_and_high_ids():
    opt = get_tokenizer("dummy:opt-tiny")
    ids = [2, *opt.encode("ab", add_special_tokens=False), 1, 2]
    assert opt.decode(ids) == "ab"
    assert opt.decode(ids, skip_special_tokens=False) == "</s>ab<pad></s>"
    # Ids past the byte range (a random model emits them) alias bytes: always some text.
    assert opt.decode([NUM_SPECIAL_IDS + 256 + ord("z")]) == "z"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        opt.decode([512])


def test_byte_tokenizer_rejects_bad_setup():
    with pytest.raises(ValueError, match="vocab_size must be >= 259"):
        ByteTokenizer(100, 1, 2)
    with pytest.raises(ValueError, match="eos_token_id must be None or in"):
        ByteTokenizer(512, 1, 40)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return save_tokenizer(tmp_path_factory.mktemp("tok") / "plain")


@pytest.mark.parametrize("text", TEXTS)
def test_hf_tokenizer_matches_transformers(tokenizer_dir, text):
    from transformers import PreTrainedTokenizerFast

    ours = HFTokenizer(tokenizer_dir)
    ref = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_dir / "tokenizer.json"), bos_token="<s>", eos_token="</s>"
    )
    ids = ours.encode(text)
    assert ids == ref.encode(text)
    assert ids[0] == ours.bos_token_id == 1 and ours.eos_token_id == 2
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True) == text
    assert ours.vocab_size == len(ref)


def test_add_bos_token_prepends_when_post_processor_does_not(tmp_path):
    path = save_tokenizer(tmp_path / "nobos")
    data = json.loads((path / "tokenizer.json").read_text())
    data["post_processor"] = None
    (path / "tokenizer.json").write_text(json.dumps(data))
    tokenizer = HFTokenizer(path)
    assert tokenizer.encode("hello")[0] == 1
    assert 1 not in tokenizer.encode("hello", add_special_tokens=False)


def test_hf_tokenizer_errors(tmp_path, tokenizer_dir):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        get_tokenizer(str(tmp_path))
    path = save_tokenizer(tmp_path / "bad")
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>"}))
    with pytest.raises(ValueError, match="eos_token '<|end|>' is not in tokenizer.json"):
        HFTokenizer(path)


def test_ids_fall_back_to_model_config(tmp_path):
    path = save_tokenizer(tmp_path / "noconfig")
    (path / "tokenizer_config.json").unlink()
    tokenizer = get_tokenizer(str(path), get_preset("llama-tiny").replace(eos_token_id=0))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 0)


def test_default_chat_template(tokenizer_dir):
    expected = "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    assert HFTokenizer(tokenizer_dir).apply_chat_template(MESSAGES) == expected
    assert get_tokenizer("dummy:opt-tiny").apply_chat_template(MESSAGES) == expected
    with pytest.raises(ValueError, match=r"messages\[0\]\['content'\] must be a string"):
        get_tokenizer("dummy:opt-tiny").apply_chat_template([{"role": "user"}])


def test_model_chat_template(tmp_path):
    template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}"
        "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    tokenizer = HFTokenizer(save_tokenizer(tmp_path / "chat", chat_template=template))
    assert tokenizer.apply_chat_template(MESSAGES) == (
        "<s>[system] be brief</s>[user] hi</s>[assistant]"
    )
    assert not tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=False).endswith("]")
    path = tmp_path / "chat"
    (path / "chat_template.jinja").write_text("{{ raise_exception('no system role') }}")
    with pytest.raises(TemplateError, match="no system role"):
        HFTokenizer(path).apply_chat_template(MESSAGES)


def test_all_special_ids_match_transformers(tokenizer_dir):
    from transformers import PreTrainedTokenizerFast

    ours = HFTokenizer(tokenizer_dir)
    ref = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_dir / "tokenizer.json"), bos_token="<s>", eos_token="</s>"
    )
    assert set(ref.all_special_ids) <= set(ours.all_special_ids)
    assert {1, 2} <= set(ours.all_special_ids)
    # Byte tokenizer: the reserved ids below the byte range (bos/eos/pad live there).
    assert get_tokenizer("dummy:opt-tiny").all_special_ids == list(range(NUM_SPECIAL_IDS))
