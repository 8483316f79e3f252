"""`layers.dense`: oneDNN over a packed weight for large CPU matmuls without gradients.

Against outside references: F.linear (the same matmul, to rounding), a row computed alone (a
row's result must not depend on the rows beside it: that is what makes a verification pass
compute each token exactly as a plain step), and plain greedy decoding of a model big enough to
take this path.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from multitoken.config import HeadsConfig, ModelConfig
from multitoken.decoding.api import engine_for, generate
from multitoken.model import Transformer
from multitoken.model import layers
from multitoken.model.layers import DENSE_MIN, dense

pytestmark = pytest.mark.skipif(not layers._onednn(), reason="this torch has no oneDNN (mkldnn) CPU kernels")


def test_dense_equals_f_linear_and_a_row_does_not_depend_on_its_neighbours():
    """Several rows: oneDNN, each row's result whatever the number of rows beside it (from 2 to
    300); one row: MKL's F.linear itself."""
    torch.manual_seed(0)
    w, b = torch.randn(1024, 512) * 0.05, torch.randn(1024)
    assert w.numel() >= DENSE_MIN
    x = torch.randn(300, 512)
    with torch.no_grad():
        torch.testing.assert_close(dense(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        pairs = torch.cat([dense(x[i : i + 2], w, b)[:1] for i in range(40)])  # each row beside one other
        for m in (2, 3, 4, 5, 8, 9, 40, 300):
            assert torch.equal(dense(x[:m], w, b)[:40], pairs[:m]), m
        assert torch.equal(dense(x[None, :5], w, b)[0], pairs[:5])  # (B, q, C) inputs too
        assert torch.equal(dense(x[:1], w, b), F.linear(x[:1], w, b))


def test_dense_follows_weights_written_in_place_and_trains_through_f_linear():
    torch.manual_seed(1)
    w = torch.randn(600, 512)
    x = torch.randn(3, 512)
    with torch.no_grad():
        before = dense(x, w)
        w.mul_(2.0)  # an optimizer step: the packed copy must not be reused
        torch.testing.assert_close(dense(x, w), 2 * before, rtol=1e-5, atol=1e-5)
    wp = torch.nn.Parameter(w.clone())
    y = dense(x, wp)  # gradients on: the autograd path
    y.sum().backward()
    torch.testing.assert_close(wp.grad, x.sum(0).expand_as(wp))


def test_speculative_greedy_equals_plain_on_a_model_that_takes_the_onednn_path():
    cfg = ModelConfig.from_preset("tiny", dim=512, n_heads=8, n_kv_heads=4, intermediate_size=1024, vocab_size=1024,
                                  max_seq_len=256, heads=HeadsConfig.parse("medusa:3"))
    torch.manual_seed(2)
    model = Transformer(cfg).eval()
    assert model.layers[0].mlp.down_proj.weight.numel() >= DENSE_MIN and model.lm_head.weight.numel() >= DENSE_MIN
    with torch.no_grad():  # heads that draft something: their residual branches off zero
        for head in model.mtp.heads:
            head.blocks[0].linear.weight.normal_(0, 0.05)
    prompts = [[5, 6, 7, 8, 9], [100, 3, 77]]
    plain, _ = generate(model, prompts, 40)
    for mode in ("spec", "tree"):
        out, stats = generate(model, prompts, 40, mode=mode)
        assert out == plain, mode
    # and plain decoding equals greedy decoding by full forward passes (no cache)
    with torch.no_grad():
        seq = list(prompts[0])
        for _ in range(40):
            seq.append(int(model.logits(model(torch.tensor([seq]), heads=False)[0][0, -1]).argmax()))
    assert plain[0] == seq[len(prompts[0]):]


@pytest.mark.slow
def test_compiled_decoding_of_a_model_on_the_onednn_path_compiles_and_equals_eager():
    """torch.compile traces `dense` with F.linear (dynamo cannot trace the packed copy's lookup by
    address): compiled blocks must run compiled, not fall back to eager, and decode as eager does."""
    cfg = ModelConfig.from_preset("tiny", dim=512, n_heads=8, n_kv_heads=4, intermediate_size=1024, vocab_size=512,
                                  n_layers=2, max_seq_len=128, heads=HeadsConfig.parse("medusa:2"))
    torch.manual_seed(3)
    model = Transformer(cfg).eval()
    assert model.layers[0].mlp.down_proj.weight.numel() >= DENSE_MIN
    prompts = [[5, 6, 7, 8, 9], [100, 3, 77]]
    eager, _ = generate(model, prompts, 16, mode="spec")
    out, stats = generate(model, prompts, 16, mode="spec", compile=True)
    assert engine_for(model, len(prompts), compile=True).runner.compile_error is None  # it did not fall back
    assert stats.compile_time_s > 0 and out == eager
