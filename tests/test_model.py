"""The backbone and its static KV cache: cached decoding equals the full forward pass."""

import pytest
import torch

from conftest import FAMILIES, tiny_model
from multitoken.errors import UserError
from multitoken.model.kv_cache import KVCache

ATOL = 1e-5  # float32; different matmul shapes round differently, nothing more


@pytest.mark.parametrize("kind", ["none"] + FAMILIES)
def test_incremental_cache_equals_full_forward(kind):
    model = tiny_model(kind, 0 if kind == "none" else 2).eval()
    idx = torch.randint(0, 61, (2, 24))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache.for_model(model.config, 2)
        pieces = []
        for a, b in [(0, 9), (9, 10), (10, 17), (17, 24)]:  # prefill, single steps, multi-token chunks
            pieces.append(model(idx[:, a:b], cache=cache))
            cache.advance(b - a)
    # Sequential modules need future tokens, so a cached pass returns the main depth only.
    n = 1 if kind == "sequential" else len(full)
    for d in range(n):
        got = torch.cat([p[d] for p in pieces], dim=1)
        torch.testing.assert_close(got, full[d], atol=ATOL, rtol=0)


def test_rows_at_different_positions_match_their_own_full_pass():
    model = tiny_model().eval()
    a, b = torch.randint(0, 61, (1, 12)), torch.randint(0, 61, (1, 7))
    cache = KVCache.for_model(model.config, 2)
    with torch.no_grad():
        # Right-padded prefill: row 1 is shorter, its padding is overwritten later.
        prompt = torch.cat([a[:, :10], torch.cat([b[:, :5], torch.zeros(1, 5, dtype=torch.long)], 1)])
        model(prompt, cache=cache)
        cache.advance(torch.tensor([10, 5]))
        step = torch.cat([a[:, 10:12], b[:, 5:7]])  # each row continues from its own position
        out = model(step, cache=cache)[0]
        ref_a, ref_b = model(a)[0][:, 10:12], model(b)[0][:, 5:7]
    torch.testing.assert_close(out[0], ref_a[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1], ref_b[0], atol=ATOL, rtol=0)


def test_rewind_then_rewrite_equals_never_having_drafted():
    model = tiny_model().eval()
    idx = torch.randint(0, 61, (1, 16))
    with torch.no_grad():
        cache = KVCache.for_model(model.config, 1)
        model(idx[:, :10], cache=cache)
        cache.advance(10)
        model(torch.randint(0, 61, (1, 4)), cache=cache)  # drafted tokens, all rejected
        cache.rewind(10)  # rejecting only moves the position back
        out = model(idx[:, 10:16], cache=cache)[0]
        ref = model(idx)[0][:, 10:16]
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_tree_slots_mask_and_compaction():
    """Two candidate branches in scratch slots; after compaction the kept branch looks never branched."""
    model = tiny_model().eval()
    prefix = torch.randint(0, 61, (1, 8))
    x, y1, y2 = 5, 7, 9  # tree: x at depth 1; children y1, y2 at depth 2
    with torch.no_grad():
        cache = KVCache.for_model(model.config, 1)
        model(prefix, cache=cache)
        cache.advance(8)
        tokens = torch.tensor([[x, y1, y2]])
        pos = torch.tensor([[8, 9, 9]])  # RoPE position = prefix length + depth
        slots = torch.tensor([[8, 9, 10]])  # scratch slots in node order
        mask = cache.causal_mask(torch.tensor([[8, 8, 8]]))  # everyone sees the prefix and the root x
        mask[0, 1, 9] = True  # y1 sees itself
        mask[0, 2, 10] = True  # y2 sees itself, not y1
        tree = model(tokens, cache=cache, input_pos=pos, slots=slots, mask=mask)[0]
        ref2 = model(torch.cat([prefix, torch.tensor([[x, y2]])], 1))[0]
        torch.testing.assert_close(tree[0, 2], ref2[0, 9], atol=ATOL, rtol=0)
        # Accept x, y2: move slot 10 to 9 and continue as if y1 had never existed.
        cache.compact(torch.tensor([[10]]), torch.tensor([[9]]))
        cache.advance(2)
        nxt = torch.tensor([[3]])
        out = model(nxt, cache=cache)[0]
        ref = model(torch.cat([prefix, torch.tensor([[x, y2, 3]])], 1))[0][:, -1:]
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", FAMILIES)
def test_heads_dropped_is_the_plain_model(kind):
    """DeepSeek's inference mode: the main model alone, identical to a model built without heads."""
    with_heads = tiny_model(kind, 2, seed=3).eval()
    plain = tiny_model("none", 0, seed=4).eval()
    state = {k: v for k, v in with_heads.state_dict().items() if not k.startswith("mtp.")}
    plain.load_state_dict(state)
    idx = torch.randint(0, 61, (2, 20))
    with torch.no_grad():
        main_only = with_heads(idx, heads=False)
        assert len(main_only) == 1
        torch.testing.assert_close(main_only[0], plain(idx)[0], atol=0, rtol=0)
        torch.testing.assert_close(with_heads(idx)[0], plain(idx)[0], atol=0, rtol=0)


def test_sequence_longer_than_context_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(UserError, match="exceeds max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_tied_embeddings_share_storage():
    model = tiny_model()
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = tiny_model(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.embed_tokens.weight


@pytest.mark.parametrize("kind", ["none"] + FAMILIES)
def test_fused_projections_keep_names_values_and_outputs_and_follow_the_weights(kind, tmp_path):
    """Fusing q/k/v and gate/up changes where the weights live (so engines notice), not their names,
    values, checkpoints or outputs (atol 0 in float32 against the unfused model, an outside copy);
    an in-place update of one parameter reaches the fused matmul, and .to() fuses again."""
    import copy

    from multitoken.io.checkpoint import load_run, save_run
    from multitoken.model.layers import fuse_projections

    model = tiny_model(kind, 0 if kind == "none" else 2, attention_bias=True).eval()
    ref = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    before = model.layers[0].self_attn.k_proj.weight.data_ptr()
    fuse_projections(model)
    assert [n for n, _ in model.named_parameters()] == names and model.layers[0].self_attn.k_proj.weight.data_ptr() != before
    idx = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        for a, b in zip(model(idx), ref(idx)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        for m in (model, ref):
            m.layers[1].self_attn.v_proj.weight.mul_(-1.5)
            m.layers[1].mlp.up_proj.weight.add_(0.1)
        for a, b in zip(model(idx), ref(idx)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        model.double()
        ref.double()
        for a, b in zip(model(idx), ref(idx)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    attn = model.layers[0].self_attn
    assert attn._fused[0].dtype == torch.float64 and attn.q_proj.weight.data_ptr() == attn._fused[0].data_ptr()
    save_run(tmp_path / "run", model.float())
    loaded, _ = load_run(tmp_path / "run", with_tokenizer=False)
    with torch.no_grad():
        for a, b in zip(loaded(idx), ref.float()(idx)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
