"""Newer model families against transformers (litgpt's test_against_hf style): Llama-3.1's RoPE
scaling, Qwen3's q/k norms, Gemma-3 (its (1 + w) norms, four norms per block, scaled embedding,
GeGLU, query_pre_attn_scalar, local/global layers with their own RoPE bases, final soft-capping,
the 262k vocabulary) and lists of EOS ids.

Each model is a tiny random transformers model whose norms are moved off their identity values
(a norm at 1, or a Gemma norm at 0, would hide a mapping that skips it). Logits are compared at
fp32 with atol 1e-5; greedy decoding through our static KV cache is compared token for token
with transformers' own ``generate``, which checks the cached path (and the local layers' RoPE
pair inside it) against an outside implementation.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from multitoken.decoding import generate
from multitoken.errors import UserError
from multitoken.io.checkpoint import load_run
from multitoken.io.hf import config_from_hf, convert_hf, export_hf
from test_hf import FP32_ATOL, VOCAB, ids, save_hf

BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, eos_token_id=256,
            bos_token_id=None, pad_token_id=None, initializer_range=0.1)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
GEMMA = dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=64, max_position_embeddings=128,
             layer_types=["sliding_attention", "full_attention", "sliding_attention"],
             rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})
FAMILIES = {
    "llama3": (transformers.LlamaConfig, dict(rope_parameters=LLAMA3_ROPE)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=16)),
    "gemma3": (transformers.Gemma3TextConfig, GEMMA),
    "gemma3_softcap": (transformers.Gemma3TextConfig, {**GEMMA, "final_logit_softcapping": 4.0}),
}


def family_model(name: str, **overrides):
    cls, kw = FAMILIES[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cls(**{**BASE, **kw, **overrides})).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.2 * torch.randn_like(p))
    return model


def converted(tmp_path, ref):
    convert_hf(save_hf(ref, tmp_path / "hf"), tmp_path / "run")
    return load_run(tmp_path / "run")[0]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_equal_transformers_fp32(tmp_path, name):
    ref = family_model(name)
    model = converted(tmp_path, ref)
    x = ids(n=40)
    with torch.no_grad():
        want, got = ref(x).logits, model.logits(model(x)[0])
    assert want.abs().max() > 1.0
    torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("name", ["llama3", "qwen3", "gemma3"])
def test_cached_greedy_decoding_equals_transformers_generate(tmp_path, name):
    ref = family_model(name)
    model = converted(tmp_path, ref)
    prompt = ids(n=9, batch=1)
    want = ref.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 9:].tolist()
    got, _ = generate(model, prompt[0].tolist(), 20)
    assert got[0] == want


def test_gemma3_config_maps_every_feature():
    model = family_model("gemma3_softcap")
    cfg = config_from_hf(model.config.to_dict())
    assert (cfg.local_layers, cfg.rope_local_theta, cfg.rope_theta) == ([0, 2], 100.0, 1e6)
    assert (cfg.rope_scaling.kind, cfg.rope_scaling.factor) == ("linear", 4.0)
    assert cfg.norm_plus_one and cfg.qk_norm and cfg.sandwich_norms and cfg.scale_embeddings and cfg.tie_embeddings
    assert cfg.hidden_act == "gelu_tanh" and cfg.attn_scale == 24 ** -0.5 and cfg.final_logit_softcap == 4.0
    assert cfg.max_seq_len == cfg.sliding_window == 64  # capped to the window, where it equals full attention


def test_gemma3_full_vocabulary(tmp_path):
    """Gemma-3's 262,144-token vocabulary (embedding tied, scaled by sqrt(dim)) at a tiny width."""
    ref = family_model("gemma3", vocab_size=262_144, hidden_size=16, intermediate_size=32, head_dim=8,
                       num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    model = converted(tmp_path, ref)
    x = torch.tensor([[0, 5, 262_143, 131_072, 200_000, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model.logits(model(x)[0]), ref(x).logits, atol=FP32_ATOL, rtol=0)
    assert model.config.vocab_size == 262_144


@pytest.mark.parametrize("name", ["llama3", "qwen3", "gemma3"])
def test_export_loads_back_in_transformers_with_equal_logits(tmp_path, name):
    ref = family_model(name, eos_token_id=[256, 258])
    converted(tmp_path, ref)
    export_hf(tmp_path / "run", tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(ref)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ref(x).logits, atol=FP32_ATOL, rtol=0)
    assert back.config.eos_token_id == [256, 258]


def test_every_eos_id_is_kept_and_decoding_stops_on_any(tmp_path):
    ref = family_model("llama3", eos_token_id=[256, 257])
    folder = save_hf(ref, tmp_path / "hf")
    (tmp_path / "hf" / "generation_config.json").write_text('{"eos_token_id": [257, 259]}')
    convert_hf(folder, tmp_path / "run")
    model, tok = load_run(tmp_path / "run")
    assert model.config.eos_id == tok.eos_id == 256 and model.config.stop_ids == [256, 257, 259]
    prompt = ids(n=6, batch=1)[0].tolist()
    plain, _ = generate(model, prompt, 30)
    stop = plain[0][4]  # any later token of the free run, made an EOS id
    first = plain[0].index(stop)
    out, _ = generate(model, prompt, 30, eos_id=[9999 % VOCAB, stop])
    assert out[0] == plain[0][: first + 1]


def test_unsupported_family_variants_are_one_line_errors():
    hf = {**FAMILIES["gemma3"][0](**{**BASE, **GEMMA}).to_dict(), "use_bidirectional_attention": True}
    with pytest.raises(UserError, match="bidirectional"):
        config_from_hf(hf)
    with pytest.raises(UserError, match="multimodal"):
        config_from_hf({"model_type": "gemma3"})
    hf = {**BASE, "model_type": "llama", "rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}
    with pytest.raises(UserError, match="yarn"):
        config_from_hf(hf)


@pytest.mark.parametrize("heads", ["medusa:2", "sequential:2", "parallel:1"])
def test_speculative_decoding_of_gemma3_with_fresh_heads_equals_transformers_greedy(tmp_path, heads):
    """Heads on a Gemma-3 backbone build Gemma blocks and read the scaled embedding; whatever they
    draft, the verified output is transformers' greedy output."""
    from multitoken.config import HeadsConfig

    ref = family_model("gemma3")
    convert_hf(save_hf(ref, tmp_path / "hf"), tmp_path / "run", heads=HeadsConfig.parse(heads))
    model = load_run(tmp_path / "run")[0]
    prompt = ids(n=7, batch=1)
    want = ref.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 7:].tolist()
    got, stats = generate(model, prompt[0].tolist(), 16, mode="spec")
    assert got[0] == want and stats.mode == "spec"
