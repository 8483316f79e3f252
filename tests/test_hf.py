"""Hugging Face interop: logits equal transformers' on tiny random Llama / Qwen2 / Mistral models,
exported runs load in transformers with their heads kept, and unsupported checkpoints are refused.

Tolerances: fp32 atol 1e-5 (the two implementations run the same ops in the same order; in
practice the difference is 0 or a few ulps); bf16 (both sides in bf16) atol 0.05 on logits of
magnitude ~5, i.e. about one bf16 rounding step of the largest logit.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from multitoken.checkpoint import load_run, save_run
from multitoken.cli import main as cli_main
from multitoken.config import HeadsConfig, ModelConfig
from multitoken.errors import UserError
from multitoken.hf import config_from_hf, convert_hf, export_hf
from multitoken.model import Transformer

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is needed to compare against it")
from multitoken.data.tokenizer import Tokenizer  # noqa: E402

VOCAB = 300  # > the byte tokenizer's 257 ids: rows past the tokenizer are allowed, as in real models
FP32_ATOL, BF16_ATOL = 1e-5, 5e-2


def hf_model(model_type: str, **overrides):
    """A tiny random transformers model whose weights are large enough to make logits O(5)."""
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig}[model_type]
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rope_theta=5000.0, rms_norm_eps=1e-5,
              eos_token_id=256, bos_token_id=None, initializer_range=0.1)
    if model_type == "mistral":
        kw["sliding_window"] = None
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cls(**{**kw, **overrides})).eval()
    with torch.no_grad():  # norms at 1 and biases at 0 would hide a missed mapping
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    return model


def save_hf(model, folder) -> str:
    model.save_pretrained(folder)
    Tokenizer.bytes().save(folder)
    return str(folder)


def ids(n: int = 24, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", {}),
    ("llama", dict(tie_word_embeddings=True, head_dim=32)),  # head_dim != hidden/heads
    ("qwen2", {}),  # q/k/v biases
    ("mistral", {}),
])
def test_convert_gives_transformers_logits_fp32(tmp_path, model_type, overrides):
    ref = hf_model(model_type, **overrides)
    convert_hf(save_hf(ref, tmp_path / "hf"), tmp_path / "run")
    model, tok = load_run(tmp_path / "run")
    x = ids()
    with torch.no_grad():
        want, got = ref(x).logits, model.logits(model(x)[0])
    assert want.abs().max() > 1.0  # a meaningful comparison, not two near-zero tensors
    torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=0)
    assert tok.eos_id == model.config.eos_id == 256
    assert model.config.tie_embeddings == bool(overrides.get("tie_word_embeddings", False))


def test_convert_bf16_matches_transformers_in_bf16(tmp_path):
    ref = hf_model("qwen2")
    convert_hf(save_hf(ref, tmp_path / "hf"), tmp_path / "run", dtype="bf16")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "run" / "model.safetensors"), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    model, _ = load_run(tmp_path / "run", dtype=torch.bfloat16)
    x = ids()
    with torch.no_grad():
        want, got = ref.to(torch.bfloat16)(x).logits.float(), model.logits(model(x)[0]).float()
    torch.testing.assert_close(got, want, atol=BF16_ATOL, rtol=0)


def test_config_fields_map_exactly():
    hf = dict(model_type="qwen2", vocab_size=500, hidden_size=96, intermediate_size=200, num_hidden_layers=3,
              num_attention_heads=6, num_key_value_heads=2, head_dim=24, max_position_embeddings=777,
              rms_norm_eps=3e-6, rope_parameters={"rope_type": "default", "rope_theta": 12345.0},
              tie_word_embeddings=True, eos_token_id=[7, 9])
    cfg = config_from_hf(hf)
    assert (cfg.vocab_size, cfg.dim, cfg.intermediate_size, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (500, 96, 200, 3, 6, 2, 24)
    assert (cfg.max_seq_len, cfg.norm_eps, cfg.rope_theta, cfg.tie_embeddings, cfg.attention_bias, cfg.eos_id) == (777, 3e-6, 12345.0, True, True, 7)
    # the older top-level rope_theta spelling
    assert config_from_hf({**hf, "rope_parameters": None, "rope_theta": 500.0, "model_type": "llama"}).rope_theta == 500.0


@pytest.mark.parametrize("change,message", [
    (dict(model_type="gpt2"), "llama, qwen2, mistral"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "rope"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope"),
    (dict(hidden_act="gelu"), "silu"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(attention_bias=True), "o_proj"),
])
def test_unsupported_configs_are_one_line_errors(change, message):
    base = dict(model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    with pytest.raises(UserError, match=message) as e:
        config_from_hf({**base, **change})
    assert "\n" not in str(e.value)


def test_sliding_window_caps_max_seq_len_where_it_equals_full_attention(tmp_path):
    ref = hf_model("mistral", sliding_window=32)
    convert_hf(save_hf(ref, tmp_path / "hf"), tmp_path / "run")
    model, _ = load_run(tmp_path / "run")
    assert model.config.max_seq_len == 32
    x = ids(n=32, batch=1)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(model(x)[0]), ref(x).logits, atol=FP32_ATOL, rtol=0)


def test_pickled_weights_are_refused_and_stray_weights_never_dropped(tmp_path):
    folder = tmp_path / "hf"
    save_hf(hf_model("llama"), folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="pickled"):
        convert_hf(folder, tmp_path / "run")
    # A tensor we have no place for is an error, not a silent drop.
    folder2 = tmp_path / "hf2"
    save_hf(hf_model("llama"), folder2)
    state = load_file(folder2 / "model.safetensors")
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(3)
    save_file(state, folder2 / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="no place"):
        convert_hf(folder2, tmp_path / "run2")


def test_convert_adds_fresh_heads_initialised_from_the_backbone(tmp_path):
    ref = hf_model("llama")
    convert_hf(save_hf(ref, tmp_path / "hf"), tmp_path / "run", heads=HeadsConfig("medusa", 2))
    model, _ = load_run(tmp_path / "run")
    x = ids()
    with torch.no_grad():
        out = model(x)
        main = model.logits(out[0])
        torch.testing.assert_close(main, ref(x).logits, atol=FP32_ATOL, rtol=0)
        # Medusa's init: zero residual branches and the LM head copied, so every head starts as the main head.
        torch.testing.assert_close(model.logits(out[2], 2), main, atol=0, rtol=0)


def native_run(tmp_path, kind: str, depth: int, tie: bool) -> Transformer:
    torch.manual_seed(3)
    cfg = ModelConfig(vocab_size=VOCAB, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, intermediate_size=96, max_seq_len=64,
                      rope_theta=5000.0, tie_embeddings=tie, eos_id=256, heads=HeadsConfig(kind, depth))
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn_like(p)) if "norm" in name or name.endswith("bias") else p.mul_(4)
    save_run(tmp_path / "native", model, Tokenizer.bytes())
    return model.eval()


@pytest.mark.parametrize("kind,depth,tie", [("none", 0, True), ("sequential", 2, True), ("parallel", 2, False), ("medusa", 3, True)])
def test_export_loads_in_transformers_and_round_trips_with_heads(tmp_path, kind, depth, tie):
    model = native_run(tmp_path, kind, depth, tie)
    export_hf(tmp_path / "native", tmp_path / "export")
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["multitoken"]["heads"] == {"kind": kind, "depth": depth, "medusa_layers": 1}
    names = set(load_file(tmp_path / "export" / "model.safetensors"))
    expected = {"none": set(), "sequential": {"model.layers.3.enorm.weight", "model.layers.4.hnorm.weight", "model.layers.4.eh_proj.weight",
                                               "model.layers.3.shared_head.norm.weight", "model.layers.4.self_attn.q_proj.weight"},
                "parallel": {"mtp.parallel.0.self_attn.q_proj.weight", "mtp.parallel.1.mlp.down_proj.weight"},
                "medusa": {"medusa_head.2.0.linear.weight", "medusa_head.2.0.linear.bias", "medusa_head.2.1.weight"}}[kind]
    assert expected <= names
    if kind == "sequential":
        assert cfg["num_nextn_predict_layers"] == depth == cfg["num_mtp_layers"]

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()  # may warn about the head weights
    x = ids()
    with torch.no_grad():
        want = model.logits(model(x, heads=False)[0])
        torch.testing.assert_close(hf(x).logits, want, atol=FP32_ATOL, rtol=0)

    assert cli_main(["convert", "--hf", str(tmp_path / "export"), "--out", str(tmp_path / "back")]) == 0
    back, tok = load_run(tmp_path / "back")
    assert back.config.heads == model.config.heads and tok.eos_id == 256
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with torch.no_grad():
        for h1, h2 in zip(model(x), back(x)):
            torch.testing.assert_close(h1, h2, atol=0, rtol=0)


def test_export_keeps_bf16_and_convert_refuses_conflicting_heads(tmp_path):
    model = native_run(tmp_path, "sequential", 1, True)
    save_run(tmp_path / "native16", model.to(torch.bfloat16), Tokenizer.bytes())
    export_hf(tmp_path / "native16", tmp_path / "export")
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "export" / "model.safetensors").values())
    with pytest.raises(UserError, match="already carries sequential:1"):
        convert_hf(tmp_path / "export", tmp_path / "back", heads=HeadsConfig("medusa", 2))
    convert_hf(tmp_path / "export", tmp_path / "back")
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "back" / "model.safetensors").values())


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["convert", "--hf", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "config.json" in err and "\n" not in err
