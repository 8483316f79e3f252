"""The three head families: shapes, what each depth may see, which parameters learn."""

import pytest
import torch

from conftest import FAMILIES, tiny_model
from multitoken.errors import UserError
from multitoken.model.heads.sequential import shift_tokens
from multitoken.training.loss import MTPLoss


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("depth", [1, 2])
def test_one_hidden_state_per_depth(kind, depth):
    model = tiny_model(kind, depth)
    out = model(torch.randint(0, 61, (3, 11)))
    assert len(out) == depth + 1
    assert all(h.shape == (3, 11, 32) for h in out)
    assert model.logits(out[-1], depth).shape == (3, 11, 61)


def test_parallel_head_is_a_block_on_the_trunk_with_the_shared_norm():
    model = tiny_model("parallel", 2).eval()
    idx = torch.randint(0, 61, (1, 9))
    with torch.no_grad():
        out = model(idx)
        rope = model.rope(torch.arange(9))
        trunk = model.run_layers(model.embed_tokens(idx), 0, 2, rope)  # first L-1 = 2 blocks
        main = model.norm(model.layers[2](trunk, rope))
        head2 = model.norm(model.mtp.blocks[1](trunk, rope))
    torch.testing.assert_close(out[0], main, atol=0, rtol=0)
    torch.testing.assert_close(out[2], head2, atol=0, rtol=0)


def test_sequential_module_sees_the_token_k_ahead_and_nothing_later():
    """Depth k at position i reads t_{i+k} (the embedding input) but never t_{i+k+1} (its target)."""
    model = tiny_model("sequential", 2).eval()
    idx = torch.randint(2, 61, (1, 12))
    i = 4
    with torch.no_grad():
        base = model(idx)
        for k in (1, 2):
            changed_input = idx.clone()
            changed_input[0, i + k] = (idx[0, i + k] + 1) % 61
            changed_target = idx.clone()
            changed_target[0, i + k + 1] = (idx[0, i + k + 1] + 1) % 61
            assert not torch.allclose(model(changed_input)[k][0, i], base[k][0, i])
            torch.testing.assert_close(model(changed_target)[k][0, i], base[k][0, i], atol=0, rtol=0)


def test_sequential_module_matches_the_released_layout():
    model = tiny_model("sequential", 1).eval()
    idx = torch.randint(2, 61, (1, 8))
    m = model.mtp.layers[0]
    names = {n for n, _ in m.named_parameters()}
    assert {"enorm.weight", "hnorm.weight", "eh_proj.weight", "norm.weight", "self_attn.q_proj.weight"} <= names
    assert m.eh_proj.weight.shape == (32, 64)  # d x 2d
    with torch.no_grad():
        rope = model.rope(torch.arange(8))
        last = model.run_layers(model.embed_tokens(idx), 0, 3, rope)
        emb = model.embed_tokens(shift_tokens(idx, 1, model.config.eos_id))
        x = m.eh_proj(torch.cat([m.enorm(emb), m.hnorm(last)], -1))  # embedding first
        want = m.norm(m.mlp(m.post_attention_layernorm(h := x + m.self_attn(m.input_layernorm(x), *rope))) + h)
    torch.testing.assert_close(model(idx)[1], want, atol=1e-6, rtol=0)


def test_medusa_heads_start_as_copies_of_the_main_head():
    model = tiny_model("medusa", 3).eval()
    idx = torch.randint(0, 61, (2, 7))
    with torch.no_grad():
        out = model(idx)
        main_logits = model.logits(out[0], 0)
        for k in (1, 2, 3):
            torch.testing.assert_close(model.logits(out[k], k), main_logits, atol=0, rtol=0)
    assert model.mtp.heads[0].lm_head.weight is not model.lm_head.weight  # own projection


def _grads(model, kind):
    window = torch.randint(0, 61, (2, 13))
    out = model(window[:, :-1])
    loss_fn = MTPLoss(model.depth, eos_id=1, weights=[1.0] * (model.depth + 1))
    loss_fn(model, out, window).loss.backward()
    return {n: (p.grad is not None and p.grad.abs().sum().item() > 0) for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", FAMILIES)
def test_every_parameter_learns(kind):
    model = tiny_model(kind, 2)
    if kind == "medusa":  # zero-initialised residual branches: nudge them so every weight has a gradient path
        with torch.no_grad():
            for p in model.mtp.parameters():
                p.add_(0.01 * torch.randn_like(p))
    got = _grads(model, kind)
    assert all(got.values()), [n for n, g in got.items() if not g]


@pytest.mark.parametrize("kind", FAMILIES)
def test_frozen_backbone_gets_no_gradient(kind):
    model = tiny_model(kind, 2)
    model.freeze_backbone()
    got = _grads(model, kind)
    for n, p in model.named_parameters():
        if n.startswith("mtp."):
            assert p.requires_grad
        else:
            assert not p.requires_grad and p.grad is None, n
    assert any(got[n] for n in got if n.startswith("mtp."))


def test_freeze_without_heads_is_a_clear_error():
    with pytest.raises(UserError, match="no MTP heads"):
        tiny_model().freeze_backbone()


@pytest.mark.parametrize("kind", FAMILIES)
def test_init_from_backbone(kind):
    model = tiny_model(kind, 2).eval()
    model.init_heads_from_backbone()
    idx = torch.randint(0, 61, (1, 10))
    with torch.no_grad():
        out = model(idx)
    if kind == "parallel":  # every head starts as the main head
        torch.testing.assert_close(out[1], out[0], atol=0, rtol=0)
    if kind == "sequential":
        assert torch.equal(model.mtp.layers[1].mlp.up_proj.weight, model.layers[-1].mlp.up_proj.weight)
    if kind == "medusa":
        assert torch.equal(model.mtp.heads[1].lm_head.weight, model.lm_head.weight)
