"""The Python front door (pipeline.py, io/models.py): `multitoken.load(...)` by folder, run dir or
cached Hub id; `.generate()` on strings, batches and chat messages with our tokenizer or a Hugging
Face one; EOS lists from the config; the transformers adapter and custom_generate entry.

The reference throughout is transformers' own greedy ``generate`` on the same weights (an outside
implementation); speculative output must equal it token for token.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import multitoken
from multitoken.config import HeadsConfig
from multitoken.errors import UserError
from multitoken.io.hf import convert_hf, export_hf, from_transformers
from multitoken.io.heads_file import save_heads
from multitoken.pipeline import CUSTOM_GENERATE_DIR, hf_generate
from test_hf import hf_model, save_hf

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


@pytest.fixture(scope="module")
def ref():
    return hf_model("llama", eos_token_id=[256, 255])


@pytest.fixture
def folder(tmp_path, ref):
    path = save_hf(ref, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    return path


def hf_greedy(ref, ids: list[int], n: int, eos=None) -> list[int]:
    out = ref.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_load_a_folder_and_generate_text_equal_to_transformers(folder, ref):
    pipe = multitoken.load(folder)
    out = pipe.generate("hello there", max_new_tokens=12, eos_ids=[])
    ids = pipe.tokenizer.encode("hello there")
    assert out.token_ids == hf_greedy(ref, ids, 12)
    assert out.text == pipe.tokenizer.decode(out.token_ids) and out.stats.mode == "ntp"


def test_a_batch_of_strings_is_one_call_with_each_row_as_alone(folder):
    pipe = multitoken.load(folder)
    prompts = ["a", "a longer prompt here"]
    batch = pipe.generate(prompts, max_new_tokens=8, eos_ids=[])
    assert [c.token_ids for c in batch] == [pipe.generate(p, max_new_tokens=8, eos_ids=[]).token_ids for p in prompts]
    assert batch[0].stats.batch_size == 2


def test_chat_messages_use_the_template_with_ours_and_a_hugging_face_tokenizer(folder, ref):
    msgs = [{"role": "user", "content": "hi"}]
    ours = multitoken.load(folder)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    theirs = multitoken.load(folder, tokenizer=hf_tok)
    rendered = "<user>hi\n<assistant>"
    assert ours.encode(msgs) == ours.tokenizer.encode(rendered, special=True)
    a, b = ours.generate(msgs, max_new_tokens=6, eos_ids=[]), theirs.generate(msgs, max_new_tokens=6, eos_ids=[])
    assert a.token_ids == b.token_ids == hf_greedy(ref, ours.encode(msgs), 6)
    assert a.text == b.text


def test_eos_comes_from_the_config_and_every_id_stops(folder, ref):
    pipe = multitoken.load(folder)
    assert pipe.model.config.stop_ids == [256, 255]
    free = pipe.generate("xyz", max_new_tokens=20, eos_ids=[]).token_ids
    pipe.model.config.eos_ids = [256, free[3]]  # a token the free run emits, made the second EOS id
    out = pipe.generate("xyz", max_new_tokens=20)
    assert out.token_ids == free[: free.index(free[3]) + 1]
    assert out.token_ids == hf_greedy(ref, pipe.tokenizer.encode("xyz"), 20, eos=[256, free[3]])


def test_heads_make_spec_the_default_and_keep_the_output(folder, ref, tmp_path):
    pipe = multitoken.load(folder, heads="medusa:2")
    assert pipe.default_mode == "spec"
    out = pipe.generate("hello", max_new_tokens=16, eos_ids=[])
    assert out.stats.mode == "spec" and out.token_ids == hf_greedy(ref, pipe.tokenizer.encode("hello"), 16)
    save_heads(pipe.model, tmp_path / "heads.safetensors")
    again = multitoken.load(folder, heads=tmp_path / "heads.safetensors")
    assert again.model.config.heads == HeadsConfig("medusa", 2)


def test_an_exported_folder_loads_with_its_heads(folder, tmp_path):
    convert_hf(folder, tmp_path / "run", heads=HeadsConfig("sequential", 1))
    export_hf(tmp_path / "run", tmp_path / "export")
    pipe = multitoken.load(tmp_path / "export")
    assert pipe.model.config.heads == HeadsConfig("sequential", 1) and pipe.default_mode == "spec"
    assert pipe.generate("ok", max_new_tokens=4).stats.mode == "spec"


def test_a_cached_hub_id_loads_offline_and_a_missing_one_is_one_line(folder, tmp_path, monkeypatch):
    """A hand-built huggingface_hub cache: models--OWNER--NAME/refs/main names a snapshot folder."""
    import shutil

    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-llama" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, snap)
    (cache / "models--acme--tiny-llama" / "refs").mkdir()
    (cache / "models--acme--tiny-llama" / "refs" / "main").write_text(snap.name)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = multitoken.load("acme/tiny-llama")
    assert pipe.generate("hi", max_new_tokens=4, eos_ids=[]).token_ids == multitoken.load(folder).generate(
        "hi", max_new_tokens=4, eos_ids=[]).token_ids
    with pytest.raises(UserError, match="not in the Hugging Face cache") as e:
        multitoken.load("acme/absent-model")
    assert "\n" not in str(e.value)


def test_the_transformers_adapter_decodes_speculatively_with_our_heads(folder, ref, tmp_path):
    """A loaded transformers model + our heads file, no folder written: output identical to ours
    and to transformers' greedy decoding, through the adapter and through custom_generate."""
    ours = multitoken.load(folder, heads="medusa:2")
    heads = save_heads(ours.model, tmp_path / "heads.safetensors")
    ours = multitoken.load(folder, heads=heads)
    ids = torch.tensor([ours.tokenizer.encode("the adapter")])
    want = ours.generate("the adapter", max_new_tokens=16, eos_ids=[]).token_ids
    got = hf_generate(ref, ids, heads=heads, max_new_tokens=16, eos_token_id=[])
    assert got[0, ids.shape[1]:].tolist() == want == hf_greedy(ref, ids[0].tolist(), 16)
    via = ref.generate(ids, custom_generate=CUSTOM_GENERATE_DIR, trust_remote_code=True, heads=str(heads),
                       max_new_tokens=16, eos_token_id=[])
    assert torch.equal(via, got)
    assert from_transformers(ref).config == multitoken.load(folder).model.config


@pytest.mark.parametrize("call,message", [
    (lambda p: p.generate(42), "string.*chat messages"),
    (lambda p: p.generate(""), "empty prompt"),
    (lambda p: p.generate([]), "non-empty list"),
    (lambda p: p.generate(["ok", 3]), "string.*chat messages"),
    (lambda p: p.generate("x", max_new_tokens="5"), "max_new_tokens"),
    (lambda p: p.generate("x", temperature="hot"), "temperature"),
    (lambda p: p.generate("x", mode="fast"), "mode"),
    (lambda p: p.generate("x", stop="END"), "stop"),
    (lambda p: p.generate("x", eos_ids=[10**9]), "eos_ids"),
    (lambda p: p.generate("x", mode="spec"), "heads"),
])
def test_bad_input_to_the_api_is_one_line(folder, call, message):
    pipe = multitoken.load(folder)
    with pytest.raises(UserError, match=message) as e:
        call(pipe)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs,message", [
    (dict(name=3), "Hub id"),
    (dict(name="no/such/dir"), "does not exist"),
    (dict(heads="medusa:x"), "heads"),
    (dict(heads="missing.safetensors"), "does not exist"),
    (dict(dtype="fp8"), "dtype"),
])
def test_bad_input_to_load_is_one_line(folder, kwargs, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=message) as e:
        multitoken.load(**{"name": folder, **kwargs})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("prompt", ["hello", ["a", "b"], [1.5, 2], None, 3, torch.zeros(2, 3), [True, 2], [[1, -2]]])
def test_the_token_level_generate_refuses_text_and_odd_types_in_one_line(prompt):
    """multitoken.generate takes token ids; text or floats are a UserError naming the fix, not torch's TypeError."""
    from conftest import tiny_model

    with pytest.raises(UserError) as e:
        multitoken.generate(tiny_model().eval(), prompt, 4)
    assert "\n" not in str(e.value)
