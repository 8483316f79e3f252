"""Training vs drafting: the training forward replays what `ModuleDrafter` computes, depth by depth.

The reference is the decoding path itself: a chain decode (KV caches, the drafter's sliding
window, steps that accept 0 to k drafts) records the draft logits of every step, and the training
forward over the same committed text must give them at the anchor (the last committed position):
with the training-time test on the committed text alone, and with teacher forcing once the
drafter's own drafts are appended (docs/training.md, "Training vs drafting").
"""

import itertools

import pytest
import torch

from conftest import FUSED, SHARED, tiny_model
from multitoken.decoding import strategies
from multitoken.decoding.sampling import Sampling
from multitoken.decoding.state import DecodeState
from multitoken.training.loss import MTPLoss

GEMMA_LIKE = dict(sandwich_norms=True, attn_scale=0.3, qk_norm=True, norm_plus_one=True, hidden_act="gelu_tanh",
                  local_layers=[0], sliding_window=64, final_logit_softcap=30.0)
"""Block features the training streams must take from the block (a scale, sandwich norms, local RoPE)."""


def decode_and_record(model, prompt: torch.Tensor, k: int, accepts: list[int], monkeypatch) -> list[dict]:
    """A greedy chain decode whose step i accepts accepts[i] drafts (the main head is made to agree:
    the accepted drafts are what it emits), so the drafter's window moves by 1 to k+1 positions.

    Returns, after the prefill and after each step: the committed text plus the pending token
    (1, C+1), C, the drafts (1, k) and the draft logits (1, k, V) for positions C+1..C+k.
    """
    script = iter(accepts)

    def scripted(y, drafts):
        n = torch.full((y.shape[0],), next(script), dtype=torch.long)
        y[:, : n[0]] = drafts[:, : n[0]]  # the emitted row, in place: the cache holds the drafts' keys there
        return n, y.gather(1, n[:, None]).squeeze(1)

    monkeypatch.setattr(strategies, "accept_greedy", scripted)
    n = prompt.shape[1]
    st = DecodeState(model, 1, scratch=k + 2, rand_width=2 * k + 1)
    st.ensure_tree_buffers(k)  # the chain then keeps its draft logits in st.lq
    lengths = torch.tensor([n])
    st.emitter.reset(lengths, 1000, model.config.max_seq_len, None)
    chain = strategies.Chain(model, st, Sampling(), k)
    chain.prefill(prompt, lengths)
    out = []
    for i in range(len(accepts) + 1):
        C = int(st.cache.pos[0])
        seq = torch.cat([prompt, st.emitter.out[:, : int(st.emitter.count[0])]], 1)
        assert seq.shape[1] == C + 1  # committed tokens, then the pending one
        out.append(dict(seq=seq, C=C, drafts=st.drafts.clone(), logits=st.lq[:, :k].clone()))
        if i < len(accepts):
            chain.step()
    return out


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


@pytest.mark.parametrize("kind,vocab,block", [("sequential", False, "llama"), (SHARED, False, "llama"),
                                              ("sequential", True, "llama"), ("sequential", False, "gemma"),
                                              (FUSED, False, "llama")])
def test_training_forward_replays_the_drafter_at_every_depth(kind, vocab, block, monkeypatch):
    k = 4
    torch.manual_seed(0)
    model = tiny_model(kind, k, seed=3, n_layers=2, **(GEMMA_LIKE if block == "gemma" else {}))
    model.mtp.ttt = True
    train_a_little(model)
    model.eval()
    ids = torch.arange(2, 61, 2) if vocab else None  # a draft vocabulary: drafts and their argmax stay inside it
    model.mtp.set_draft_vocab(ids)
    cols = ids if vocab else torch.arange(61)
    prompt = torch.randint(2, 61, (1, 9))
    steps = decode_and_record(model, prompt, k, [0, 4, 1, 3, 2, 4, 0], monkeypatch)
    wrong = 0
    with torch.no_grad():
        for s in steps:
            C, ref = s["C"], s["logits"][0][:, cols]  # (k, V')
            h = model(s["seq"])  # training-time test: the committed text alone
            got = torch.stack([model.logits(h[d][0, C - 1], d) for d in range(1, k + 1)])[:, cols]
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
            model.mtp.ttt = False  # teacher forcing: exact once the drafts themselves are the data
            h = model(torch.cat([s["seq"], s["drafts"][:, : k - 1]], 1))
            got = torch.stack([model.logits(h[d][0, C - 1], d) for d in range(1, k + 1)])[:, cols]
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
            h = model(s["seq"])  # ... and not on the committed text, where it reads the data past C
            got = torch.stack([model.logits(h[d][0, C - 1], d) for d in range(2, k + 1)])[:, cols]
            wrong += int((got - ref[1:]).abs().amax() > 1e-3)
            model.mtp.ttt = True
    assert wrong == len(steps)  # the replay tells training modes apart


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
