"""Training-time test: the training forward at depth 2 computes what the drafter computes (and at
depth 1, with fused inputs too)."""

import pytest
import torch

from conftest import FUSED, SHARED, tiny_model
from multitoken.decoding.drafting import ModuleDrafter, decode_pass
from multitoken.decoding.sampling import Sampling
from multitoken.decoding.state import DecodeState
from multitoken.training.loss import MTPLoss


def drafter_logits(model, prompt: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefill of a greedy chain decode, step by step: (pending token (1,), draft logits (1, k, V))."""
    n = prompt.shape[1]
    st = DecodeState(model, 1, scratch=2 * k + 2, rand_width=2 * k + 1)
    drafter = ModuleDrafter(model, st, k)
    pos = torch.arange(n)[None]
    main, last, _ = decode_pass(model, prompt, st.cache, pos, pos, st.cache.causal_mask(pos), k)  # as a chain's prefill
    lengths = torch.tensor([n])
    st.cache.rewind(lengths)
    x = model.logits(main[:, -1]).argmax(-1)  # the pending token: the model's own next token
    drafter.record(pos, last, torch.cat([prompt[:, 1:], prompt[:, :1]], 1))
    st.seq.scatter_(1, lengths[:, None], x[:, None])
    _, _, logits = drafter.draft(lengths, Sampling(), True, torch.zeros(1, k), win=pos, at=lengths - 1)
    return x, logits


def train_a_little(model, steps: int = 3) -> None:
    """A few SGD steps of TTT training: the modules compared are trained ones, not their init."""
    opt = torch.optim.SGD([p for p in model.mtp.parameters()], lr=0.5)
    model.freeze_backbone()
    loss_fn = MTPLoss(model.depth, [1.0] * (model.depth + 1), eos_id=1, distill=True, skip_main=True)
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        w = torch.randint(2, 61, (2, 17), generator=g)
        loss_fn(model, model(w[:, :-1]), w).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("kind", ["sequential", SHARED, FUSED])
def test_ttt_training_forward_at_depth_2_equals_the_drafter(kind):
    """The replay: the training forward's depths 1 and 2 at the last committed position equal the
    drafter's logits there. Fused heads (fc random, so the low and middle states count) catch a
    drafter that records h^0 instead of depth 1's fused input."""
    torch.manual_seed(0)
    model = tiny_model(kind, 2, seed=3, n_layers=2)
    model.mtp.ttt = True
    if model.mtp.fc is not None:
        with torch.no_grad():
            model.mtp.fc.weight.normal_(0, 0.3)
    train_a_little(model)
    model.eval()
    prompt = torch.randint(2, 61, (1, 9))
    with torch.no_grad():
        x, ref = drafter_logits(model, prompt, 2)
        seq = torch.cat([prompt, x[:, None]], 1)  # what is committed plus the pending token
        n = prompt.shape[1]
        hiddens = model(seq)
        got = [model.logits(hiddens[k][:, n - 1], k) for k in (1, 2)]
        torch.testing.assert_close(got[0], ref[:, 0], atol=1e-5, rtol=1e-5)  # depth 1 reads the pending token
        torch.testing.assert_close(got[1], ref[:, 1], atol=1e-5, rtol=1e-5)  # depth 2 its own draft
        model.mtp.ttt = False  # teacher forcing feeds depth 2 a token the drafter never sees there
        plain = model.logits(model(seq)[2][:, n - 1], 2)
    assert (plain - ref[:, 1]).abs().max() > 1e-3


def test_ttt_changes_only_depths_two_and_up_and_trains():
    model = tiny_model("sequential", 3, seed=1, n_layers=2)
    model.freeze_backbone()
    w = torch.randint(2, 61, (2, 13))
    plain = model(w[:, :-1])
    model.mtp.ttt = True
    ttt = model(w[:, :-1])
    torch.testing.assert_close(ttt[1], plain[1], atol=0, rtol=0)
    assert not torch.allclose(ttt[2], plain[2]) and not torch.allclose(ttt[3], plain[3])
    MTPLoss(3, [1.0] * 4, eos_id=1, distill=True, skip_main=True)(model, ttt, w).loss.backward()
    assert all(p.grad is not None for p in model.mtp.parameters() if p.requires_grad)


def test_eh_pass_through_starts_the_module_on_the_hidden_state_alone():
    """eh_proj(cat[enorm(emb), hnorm(h)]) == hnorm(h) after the init, whatever the token."""
    model = tiny_model("sequential", 2, seed=2)
    model.init_heads_from_backbone(pass_through=True)
    m = model.mtp.module(1)
    h, emb = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    out = m.eh_proj(torch.cat([m.enorm(emb), m.hnorm(h)], -1))
    torch.testing.assert_close(out, m.hnorm(h), atol=1e-6, rtol=0)


def test_ttt_on_heads_that_cannot_use_it_is_a_one_line_error():
    from multitoken.errors import UserError
    from multitoken.training.trainer import enable_ttt

    with pytest.raises(UserError, match="--ttt needs"):
        enable_ttt(tiny_model("parallel", 2))
