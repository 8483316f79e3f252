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

from multitoken.cli import main as cli_main
from multitoken.config import HeadsConfig, ModelConfig
from multitoken.errors import UserError
from multitoken.io.checkpoint import load_run, save_run
from multitoken.io.hf import config_from_hf, convert_hf, export_hf
from multitoken.model import Transformer

import transformers  # CI installs it (the dev extra): a missing install must fail, not skip 21 tests

from multitoken.data.tokenizer import Tokenizer

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


def test_convert_bf16_runs_in_bf16_and_matches_transformers(tmp_path):
    """load_run(dtype=bf16) really computes in bf16, within a bound set by bf16's epsilon.

    Comparing against transformers in bf16 alone cannot tell bf16 from fp32: two bf16
    implementations differ by as much as fp32 and bf16 do (measured max 0.039 vs 0.036 on
    logits of magnitude ~3). So the dtypes are asserted, and both runs are compared with an fp32
    reference of the same bf16-rounded weights: the fp32 run agrees to 1e-5, the bf16 run differs
    measurably (mean > 1e-4; measured 5e-3) and by at most 4 bf16 epsilons of the largest logit.
    """
    ref = hf_model("qwen2")
    convert_hf(save_hf(ref, tmp_path / "hf"), tmp_path / "run", dtype="bf16")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "run" / "model.safetensors"), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    model, _ = load_run(tmp_path / "run", dtype=torch.bfloat16)
    assert {n: p.dtype for n, p in model.named_parameters()} == {n: torch.bfloat16 for n, _ in model.named_parameters()}
    assert all(b.dtype == torch.bfloat16 for b in model.buffers())
    model32, _ = load_run(tmp_path / "run")
    assert all(p.dtype == torch.float32 for p in model32.parameters())
    with torch.no_grad():
        for p in ref.parameters():  # the fp32 reference holds exactly the stored (bf16) weights
            p.copy_(p.to(torch.bfloat16).float())
    x = ids()
    with torch.no_grad():
        want32 = ref(x).logits
        got = model.logits(model(x)[0])
        got32 = model32.logits(model32(x)[0])
        want16 = ref.to(torch.bfloat16)(x).logits.float()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got32, want32, atol=FP32_ATOL, rtol=0)
    diff = (got.float() - want32).abs()
    eps = torch.finfo(torch.bfloat16).eps
    assert float(diff.mean()) > 1e-4, "bf16 run agrees with fp32 like an fp32 run: it did not compute in bf16"
    assert float(diff.max()) <= 4 * eps * float(want32.abs().max())
    torch.testing.assert_close(got.float(), want16, atol=BF16_ATOL, rtol=0)  # both in bf16: one rounding step


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
    (dict(model_type="gpt2"), "llama, qwen2, mistral, qwen3, gemma3_text"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "low_freq_factor"),
    (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "rope"),
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
                      rope_theta=5000.0, tie_embeddings=tie, eos_id=256, heads=HeadsConfig.parse(f"{kind}:{depth}" if depth else kind))
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn_like(p)) if "norm" in name or name.endswith("bias") else p.mul_(4)
    save_run(tmp_path / "native", model, Tokenizer.bytes())
    return model.eval()


@pytest.mark.parametrize("kind,depth,tie", [("none", 0, True), ("sequential", 2, True), ("parallel", 2, False), ("medusa", 3, True),
                                            ("sequential:shared", 3, True)])
def test_export_loads_in_transformers_and_round_trips_with_heads(tmp_path, kind, depth, tie):
    model = native_run(tmp_path, kind.replace(":shared", ""), f"{depth}:shared" if "shared" in kind else depth, tie)
    export_hf(tmp_path / "native", tmp_path / "export")
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    shared = {"shared": True} if "shared" in kind else {}
    assert cfg["model_type"] == "llama" and cfg["multitoken"]["heads"] == {"kind": kind.replace(":shared", ""), "depth": depth,
                                                                           "medusa_layers": 1, **shared}
    tensors = load_file(tmp_path / "export" / "model.safetensors")
    names = set(tensors)
    if shared:  # DeepSeek's layout, one module per depth: the shared module is written at every depth
        assert sum(n.startswith("model.layers.3.") for n in names) == sum(n.startswith("model.layers.5.") for n in names) > 10
        assert all(torch.equal(tensors[n], tensors[n.replace("layers.3.", f"layers.{L}.")])
                   for n in names if n.startswith("model.layers.3.") for L in (4, 5))
        kind = "sequential"
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


def test_fused_heads_are_refused_by_the_hf_export_in_one_line(tmp_path, capsys):
    """DeepSeek's / transformers' MTP layer reads h^0 alone: fc has no place there, so exporting fused
    heads is refused before anything is written, naming what to do instead."""
    native_run(tmp_path, "sequential", "2:shared:fused", True)
    with pytest.raises(UserError, match="through fc, which DeepSeek's and transformers' MTP layout has no place for.*heads file"):
        export_hf(tmp_path / "native", tmp_path / "export")
    assert not (tmp_path / "export").exists()
    assert cli_main(["export", "--run", str(tmp_path / "native"), "--out", str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no place for" in err and "\n" not in err


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["convert", "--hf", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "config.json" in err and "\n" not in err


# ---- export layouts pinned to the published names (not to our own mapping) -------------------------------
# DeepSeek-V3 (README_WEIGHTS.md): MTP module k is model.layers.{num_hidden_layers + k} with enorm, hnorm,
# eh_proj, shared_head.norm and a full decoder block; eh_proj takes cat[enorm(embedding), hnorm(h)] (the
# embedding first, as vLLM's and SGLang's DeepSeek MTP loaders compute it). Medusa (FasterDecoding/Medusa,
# medusa_model.py): medusa_head = ModuleList of Sequential(ResBlock x medusa_num_layers, Linear(bias=False)),
# ResBlock.linear has a bias; medusa_head.{i} predicts i+2 tokens ahead, i.e. our depth i+1.
DEEPSEEK_MTP_SUFFIXES = [
    "enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
]


def random_native(tmp_path, kind: str, depth: int, tie: bool = True, seed: int = 5) -> Transformer:
    """A saved native run whose every tensor is random and distinct (norms included), so that two
    tensors exported under each other's names change the numbers."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, intermediate_size=96, max_seq_len=64,
                      rope_theta=5000.0, tie_embeddings=tie, eos_id=256, heads=HeadsConfig.parse(f"{kind}:{depth}" if depth else kind))
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    save_run(tmp_path / "native", model, Tokenizer.bytes())
    return model.eval()


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def test_deepseek_mtp_export_has_the_published_names_and_computes_the_published_formula(tmp_path):
    """Names: exactly the published ones per module. Numbers: depth-k logits recomputed from the
    exported tensors alone (enorm on the embedding of t_{i+k}, hnorm on h^{k-1}, eh_proj, then the
    module's block and shared_head.norm run as a one-layer transformers Llama, then the LM head)
    equal our model's. Catches enorm/hnorm swapped (in export or in the module) and the
    concatenation order reversed, which keep every name."""
    L, D = 3, 2
    model = random_native(tmp_path, "sequential", D)
    export_hf(tmp_path / "native", tmp_path / "export")
    st = load_file(tmp_path / "export" / "model.safetensors")
    for k in range(D):
        got = {n.removeprefix(f"model.layers.{L + k}.") for n in st if n.startswith(f"model.layers.{L + k}.")}
        assert got == set(DEEPSEEK_MTP_SUFFIXES)
    assert not any(n.startswith("mtp.") or n.startswith(f"model.layers.{L + D}.") for n in st)
    assert json.loads((tmp_path / "export" / "config.json").read_text())["num_nextn_predict_layers"] == D

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    one = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=5000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False)).eval()
    x = ids()
    T = x.shape[1]
    captured = {}
    for m, key in ((hf, "main"), (one, "module")):
        m.model.norm.register_forward_hook(lambda mod, inp, out, key=key: captured.__setitem__(key, inp[0]))
    emb = st["model.embed_tokens.weight"]
    head = st.get("lm_head.weight", emb)
    with torch.no_grad():
        hf(x)
        h = captured["main"]  # h^0: the main model's last hidden state before its final norm
        ours = model(x)
        for k in range(1, D + 1):
            p = f"model.layers.{L + k - 1}."
            e = emb[x[:, k:]]  # embeddings of t_{i+k}, positions 0..T-k-1
            z = torch.cat([rms(e, st[p + "enorm.weight"]), rms(h[:, : T - k], st[p + "hnorm.weight"])], -1)
            z = z @ st[p + "eh_proj.weight"].T
            block = {"model.layers.0." + s: st[p + s] for s in DEEPSEEK_MTP_SUFFIXES[4:]}
            one.load_state_dict({**block, "model.norm.weight": st[p + "shared_head.norm.weight"],
                                 "lm_head.weight": head, "model.embed_tokens.weight": emb})
            want = one(inputs_embeds=z).logits
            h = captured["module"]  # h^k (before shared_head.norm) at positions 0..T-k-1, for depth k+1
            torch.testing.assert_close(model.logits(ours[k], k)[:, : T - k], want, atol=1e-4, rtol=1e-4)


def test_medusa_export_has_the_published_names_in_head_order(tmp_path):
    """medusa_head.{i}.{j}.linear.{weight,bias} and medusa_head.{i}.{L}.weight, and head i's logits
    recomputed from those tensors (W_i (x + silu(A x + b)) on the final normed hidden state, taken
    from transformers) equal our depth i+1: heads exported in reverse order fail."""
    D = 3
    model = random_native(tmp_path, "medusa", D)
    export_hf(tmp_path / "native", tmp_path / "export")
    st = load_file(tmp_path / "export" / "model.safetensors")
    expected = {f"medusa_head.{i}.{s}" for i in range(D) for s in ("0.linear.weight", "0.linear.bias", "1.weight")}
    assert {n for n in st if n.startswith("medusa_head.")} == expected
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert (cfg["medusa_num_heads"], cfg["medusa_num_layers"]) == (D, 1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    x = ids()
    with torch.no_grad():
        hs = hf.model(x).last_hidden_state  # normed, as Medusa's heads read it
        ours = model(x)
        for i in range(D):
            a, b, w = st[f"medusa_head.{i}.0.linear.weight"], st[f"medusa_head.{i}.0.linear.bias"], st[f"medusa_head.{i}.1.weight"]
            want = (hs + torch.nn.functional.silu(hs @ a.T + b)) @ w.T
            torch.testing.assert_close(model.logits(ours[i + 1], i + 1), want, atol=1e-4, rtol=1e-4)


def test_convert_takes_the_first_id_of_an_eos_list(tmp_path):
    """transformers' configs list several EOS ids with the primary one first (e.g. Llama 3)."""
    ref = hf_model("llama", eos_token_id=[256, 255, 10])
    convert_hf(save_hf(ref, tmp_path / "hf"), tmp_path / "run")
    model, tok = load_run(tmp_path / "run")
    assert model.config.eos_id == 256 and tok.eos_id == 256


def test_convert_refuses_a_tied_lm_head_that_differs_from_the_embedding(tmp_path):
    ref = hf_model("llama", tie_word_embeddings=True)
    folder = tmp_path / "hf"
    save_hf(ref, folder)
    state = load_file(folder / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    convert_hf(folder, tmp_path / "ok")  # an explicit copy that equals the embedding is fine
    state["lm_head.weight"][5, 3] += 0.5
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="lm_head.weight differs from the embedding"):
        convert_hf(folder, tmp_path / "run")


# ---- transformers' own MTP decoding on our exported modules ---------------------------------------------
@pytest.mark.parametrize("kind,depth", [("sequential", 1), ("sequential", 2), ("sequential:shared", 2)])
def test_exported_sequential_modules_draft_in_transformers_use_mtp(tmp_path, kind, depth):
    """An exported sequential model loads through `load_transformers_mtp`; transformers' generic MTP
    layer then computes exactly our depth-1 logits (norm weights random, so that a hidden state
    taken after the final norm would differ), and generate(use_mtp=True) gives our greedy output."""
    from transformers.modeling_layers import MtpModel

    from conftest import tiny_model
    from multitoken.decoding import generate
    from multitoken.io.hf import load_transformers_mtp

    torch.manual_seed(depth)
    model = tiny_model(kind, depth, vocab_size=61, max_seq_len=64, n_layers=3).eval()
    with torch.no_grad():
        for p in model.parameters():
            (p.uniform_(0.5, 1.5) if p.dim() == 1 else p.normal_(0, 0.15))
    save_run(tmp_path / "run", model)
    export_hf(tmp_path / "run", tmp_path / "hf")
    hf = load_transformers_mtp(tmp_path / "hf", dtype=torch.float32).eval()
    x = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13]])
    T = x.shape[1]
    with torch.no_grad():
        ours = model(x)
        mtp = MtpModel.from_pretrained(hf)
        h = hf(x, output_hidden_states=True).hidden_states[-1]
        _, theirs, _ = mtp(input_ids=x[:, 1:T - depth + 1], last_hidden_states=h[:, : T - depth], attention_mask=None,
                           position_ids=torch.arange(1, T - depth + 1)[None], mtp_cache=None)
    # Module 1 at position T-depth-1 predicts token T-depth+1. Deeper modules differ by design:
    # transformers hands the next layer the state after each layer's own norm, DeepSeek-V3 (and
    # we, and vLLM) the state before it (docs/interop.md); drafts differ, output does not.
    torch.testing.assert_close(theirs[:, 0], model.logits(ours[1][:, T - depth - 1], 1), atol=1e-4, rtol=1e-4)
    prompt = [[5, 6, 7, 8, 9, 10, 11]]
    ref, _ = generate(model, prompt, 24)
    out = hf.generate(torch.tensor(prompt), max_new_tokens=24, do_sample=False, use_mtp=True, pad_token_id=0)
    assert out[0, 7:].tolist() == ref[0]


@pytest.mark.parametrize("layers,pattern", [(12, 6), (8, 3), (7, 2), (6, None)])
def test_an_older_gemma3_config_without_layer_types_gets_transformers_global_layers(layers, pattern):
    """Gemma-3 configs from before `layer_types` give `sliding_window_pattern` (every N-th layer
    global, N = 6 when absent): the local layers read from such a config are the ones
    transformers' own Gemma3TextConfig derives from it."""
    from transformers import Gemma3TextConfig

    kw = dict(num_hidden_layers=layers, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=300, sliding_window=128, max_position_embeddings=512)
    ref = Gemma3TextConfig(**kw, **({} if pattern is None else {"sliding_window_pattern": pattern}))
    old = {k: v for k, v in ref.to_dict().items() if k not in ("layer_types", "sliding_window_pattern")}
    if pattern is not None:
        old["sliding_window_pattern"] = pattern
    want = [i for i, t in enumerate(ref.layer_types) if t == "sliding_attention"]
    assert config_from_hf(old).local_layers == want
    assert len(want) < layers  # some layer is global
