"""The three head families: shapes, what each depth may see, which parameters learn."""

import pytest
import torch
import torch.nn.functional as F

from conftest import FAMILIES, FUSED, tiny_model
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


@pytest.mark.parametrize("kind", FAMILIES + [FUSED])
def test_every_parameter_learns(kind):
    model = tiny_model(kind, 2)
    if kind == "medusa":  # zero-initialised residual branches: nudge them so every weight has a gradient path
        with torch.no_grad():
            for p in model.mtp.parameters():
                p.add_(0.01 * torch.randn_like(p))
    got = _grads(model, kind)
    assert all(got.values()), [n for n, g in got.items() if not g]


@pytest.mark.parametrize("kind", FAMILIES + [FUSED])
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


# ---- fused inputs (sequential:N:fused, EAGLE-3's fc over a low, a middle and a high state) ----------
def block_states(model, idx):
    """The state after every block count 0..L of a full forward, read by hooks on the embedding and
    the blocks (an outside reference: nothing of the backbone's own bookkeeping)."""
    seen = {}
    def first_embedding(m, a, out):  # the heads call the embedding again later, on the tokens ahead
        if 0 not in seen:
            seen[0] = out

    hooks = [model.embed_tokens.register_forward_hook(first_embedding)]
    for i, block in enumerate(model.layers):
        hooks.append(block.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i + 1, out)))
    try:
        out = model(idx)
    finally:
        for h in hooks:
            h.remove()
    return out, seen


@pytest.mark.parametrize("layers", [None, [0, 3, 4], [2, 4]])
def test_fused_input_is_fc_over_the_block_states_of_one_forward(layers):
    """Depth 1 reads fc(cat[h_a, h_b, h_c]) over the states after the configured blocks (default 2, L/2,
    L: here L=4 gives 1, 2, 4), computed by hand from hooked block outputs; hnorm applies to it as to
    h^0, and depth 2 reads depth 1's state as before."""
    from multitoken.config import HeadsConfig

    heads = HeadsConfig("sequential", 2, fused=True, fused_layers=layers or [])
    model = tiny_model("sequential", 2, seed=4, n_layers=4, heads=heads).eval()
    want_layers = layers or [1, 2, 4]
    assert model.config.heads.fused_layers == want_layers and model.mtp.fc.weight.shape == (32, 32 * len(want_layers))
    with torch.no_grad():
        model.mtp.fc.weight.normal_(0, 0.3)  # every part counts, not only h^0's
        idx = torch.randint(2, 61, (2, 9))
        out, seen = block_states(model, idx)
        fused = F.linear(torch.cat([seen[i] for i in want_layers], -1), model.mtp.fc.weight)  # (B, T, C)
        rope = model.rope(torch.arange(9))
        torch.testing.assert_close(model.mtp.hidden_input(model.backbone(idx, rope)), fused, atol=0, rtol=0)
        h1 = model.mtp.module(1)
        emb = model.embed_tokens(shift_tokens(idx, 1, model.config.eos_id))
        x = h1.eh_proj(torch.cat([h1.enorm(emb), h1.hnorm(fused)], -1))
        h = x + h1.self_attn(h1.input_layernorm(x), *rope)
        h = h + h1.mlp(h1.post_attention_layernorm(h))
        torch.testing.assert_close(out[1], h1.norm(h), atol=1e-6, rtol=0)
        h2 = model.mtp.module(2)
        depth2 = h2.norm(h2(h, model.embed_tokens(shift_tokens(idx, 2, model.config.eos_id)), rope))
        torch.testing.assert_close(out[2], depth2, atol=1e-6, rtol=0)


def test_fused_heads_start_as_ordinary_ones():
    """fc starts as [0 | 0 | I] (random init and init from the backbone alike): every depth equals the
    same heads without the fused input, bit for bit."""
    fused = tiny_model(FUSED, 3, seed=5).eval()
    plain = tiny_model("sequential:shared", 3, seed=5).eval()
    plain.load_state_dict({k: v for k, v in fused.state_dict().items() if k != "mtp.fc.weight"})
    idx = torch.randint(2, 61, (2, 11))
    for start in (lambda m: None, lambda m: m.init_heads_from_backbone()):
        start(fused), start(plain)
        with torch.no_grad():
            for a, b in zip(fused(idx), plain(idx)):
                torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_default_fused_layers_are_low_middle_and_h0():
    from multitoken.config import default_fused_layers

    assert default_fused_layers(30) == [2, 15, 30]  # SmolLM2-135M
    assert default_fused_layers(4) == [1, 2, 4] and default_fused_layers(3) == [0, 1, 3] and default_fused_layers(1) == [0, 1]


def test_medusa_decoding_states_follow_weights_written_in_place():
    """Decoding stacks the one-block heads' weights once; an in-place write (an optimizer step,
    load_state_dict) must show in the next decoding pass: h + SiLU(W h + b) by hand, per head."""
    from types import SimpleNamespace

    model = tiny_model("medusa", 2, seed=0).eval()
    h = torch.randn(1, 3, model.config.dim)
    states = SimpleNamespace(main=h)
    with torch.no_grad():
        model.mtp.decode_states(model.shared, 2, states, None, None, None, None)  # stacked now
        for head in model.mtp.heads:
            head.blocks[0].linear.weight.add_(torch.randn_like(head.blocks[0].linear.weight))
            head.blocks[0].linear.bias.add_(0.5)
        got = model.mtp.decode_states(model.shared, 2, states, None, None, None, None)
    for k, head in enumerate(model.mtp.heads):
        lin = head.blocks[0].linear
        torch.testing.assert_close(got[:, :, k], h + F.silu(h @ lin.weight.T + lin.bias))
