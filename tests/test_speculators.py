"""`multitoken export --format speculators`: our sequential heads as vLLM's speculators drafter.

The reference is the `speculators` package itself (0.9.0, the release io/speculators.py follows):
its config class reads our config.json, its model class declares exactly the weights we write, and
its ``MTPDraftModel`` loaded from our folder (embedding and LM head from the verifier folder, as
vLLM does) computes our depth-1 logits. CI installs it without its dependencies, which would pull a
CUDA torch (.ci/run); elsewhere these tests skip with the install command. The refusals need no
package.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model
from multitoken.cli import main as cli_main
from multitoken.data.tokenizer import Tokenizer
from multitoken.errors import UserError
from multitoken.io.checkpoint import save_run
from multitoken.io.hf import export_hf
from multitoken.io.speculators import SPECULATORS_VERSION, export_speculators

INSTALL = f"pip install --no-deps speculators=={SPECULATORS_VERSION} hs-connectors=={SPECULATORS_VERSION} loguru"
VOCAB = 300


def qwen3_run(tmp_path, kind: str, depth: int, tie: bool, **overrides):
    """A saved run (Qwen3-family backbone: q/k norms) with random weights, norms far from 1, and its
    Hugging Face export (the verifier)."""
    model = tiny_model(kind, depth, seed=depth, vocab_size=VOCAB, n_layers=3, qk_norm=True, tie_embeddings=tie,
                       eos_id=256, **overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            (p.uniform_(0.5, 1.5) if p.dim() == 1 else p.normal_(0, 0.15))
    save_run(tmp_path / "run", model, Tokenizer.bytes())
    export_hf(tmp_path / "run", tmp_path / "verifier")
    return model


def speculators_or_skip():
    return pytest.importorskip("speculators", reason=f"needs the speculators package: {INSTALL}")


@pytest.mark.parametrize("kind,depth,tie", [("sequential", 1, False), ("sequential:shared", 3, True)])
def test_speculators_loads_our_export_and_computes_our_first_draft(tmp_path, kind, depth, tie):
    speculators_or_skip()
    from speculators import SpeculatorModel, SpeculatorModelConfig
    from speculators.models.mtp import MTPDraftModel, MTPSpeculatorConfig
    from safetensors.torch import load_file

    model = qwen3_run(tmp_path, kind, depth, tie)
    export_speculators(tmp_path / "run", tmp_path / "spec", verifier=str(tmp_path / "verifier"))
    cfg = SpeculatorModelConfig.from_pretrained(tmp_path / "spec")
    assert isinstance(cfg, MTPSpeculatorConfig)
    assert cfg.num_speculative_steps == 1 and cfg.num_nextn_predict_layers == 1
    assert cfg.speculators_config.verifier.name_or_path == str((tmp_path / "verifier").resolve())
    assert cfg.speculators_config.verifier.architectures == ["Qwen3ForCausalLM"]
    layer = cfg.transformer_layer_config
    assert (layer.model_type, layer.hidden_size, layer.vocab_size, layer.num_hidden_layers) == ("qwen3", 32, VOCAB, 3)

    # Every tensor we write is one the model definition declares, with its shape; every weight it
    # declares is written, except those it takes from the verifier.
    declared = {k: tuple(v.shape) for k, v in MTPDraftModel(cfg).state_dict().items()}
    from_verifier = {"embed_tokens.weight", "lm_head.weight", "verifier_lm_head.weight"}
    written = {k: tuple(v.shape) for k, v in load_file(tmp_path / "spec" / "model.safetensors").items()}
    assert written == {k: s for k, s in declared.items() if k not in from_verifier}

    draft = SpeculatorModel.from_pretrained(str(tmp_path / "spec")).eval()
    assert isinstance(draft, MTPDraftModel)
    x = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    T = x.shape[1]
    seen = {}
    hook = model.norm.register_forward_hook(lambda mod, inp, out: seen.__setitem__("h0", inp[0]))
    with torch.no_grad():
        ours = model(x)
        hook.remove()
        # speculators' forward: step k reads t_{i+k+1}'s embedding and the verifier's last hidden
        # state before its final norm (its training data's verifier_last_hidden_states), as ours.
        theirs, _, _ = draft(input_ids=x, hidden_states=seen["h0"])
        assert len(theirs) == 1
        mine = model.logits(ours[1], 1)[:, : T - 2]
        assert mine.abs().max() > 1
        torch.testing.assert_close(theirs[0], mine, atol=1e-5, rtol=0)
        if depth > 1:
            # Why one token per step: asked for more, speculators feeds step 2 the layer's output
            # after final_layernorm, our module 2 reads it before the norm, so the drafts part.
            draft.config.speculators_config.proposal_methods[0].speculative_tokens = depth
            theirs, _, _ = draft(input_ids=x, hidden_states=seen["h0"])
            valid = T - depth - 1
            torch.testing.assert_close(theirs[0][:, :valid], mine[:, :valid], atol=1e-5, rtol=0)
            assert (theirs[1][:, :valid] - model.logits(ours[2], 2)[:, :valid]).abs().max() > 0.1


def test_the_config_json_carries_the_published_fields(tmp_path):
    """Without the package: the fields speculators' MTP config and vLLM's reader use, by name."""
    qwen3_run(tmp_path, "sequential", 1, False)
    export_speculators(tmp_path / "run", tmp_path / "spec", verifier=str(tmp_path / "verifier"))
    cfg = json.loads((tmp_path / "spec" / "config.json").read_text())
    assert cfg["speculators_model_type"] == "mtp" and cfg["architectures"] == ["MTPDraftModel"]
    assert cfg["num_nextn_predict_layers"] == 1 and cfg["speculators_version"] == SPECULATORS_VERSION
    sc = cfg["speculators_config"]
    assert sc["algorithm"] == "mtp" and sc["default_proposal_method"] == "greedy"
    assert sc["proposal_methods"] == [{"proposal_type": "greedy", "speculative_tokens": 1, "verifier_accept_k": 1,
                                       "accept_tolerance": 0.0}]
    assert sc["verifier"]["architectures"] == ["Qwen3ForCausalLM"]
    assert cfg["transformer_layer_config"]["model_type"] == "qwen3"
    assert "num_nextn_predict_layers" not in cfg["transformer_layer_config"]


# ---- what does not map is refused in one line --------------------------------------------------------
def test_heads_and_backbones_that_do_not_map_are_refused(tmp_path):
    for kind, match in (("medusa", "no speculators model type"), ("parallel", "no speculators model type")):
        qwen3_run(tmp_path / kind, kind, 2, False)
        with pytest.raises(UserError, match=match):
            export_speculators(tmp_path / kind / "run", tmp_path / kind / "spec", verifier=str(tmp_path / kind / "verifier"))
    fused = tiny_model("sequential:shared:fused", 2, vocab_size=VOCAB, eos_id=256, qk_norm=True).eval()  # mtp has no fc
    save_run(tmp_path / "fused", fused, Tokenizer.bytes())
    with pytest.raises(UserError, match="mtp layer reads the verifier's last hidden state alone.*multitoken serve"):
        export_speculators(tmp_path / "fused", tmp_path / "out", verifier="owner/name")
    llama = tiny_model("sequential", 1, vocab_size=VOCAB, eos_id=256).eval()  # SmolLM2's family
    save_run(tmp_path / "llama", llama, Tokenizer.bytes())
    with pytest.raises(UserError, match="only from Qwen3-family decoder layers .* this backbone is llama: export the DeepSeek layout"):
        export_speculators(tmp_path / "llama", tmp_path / "out", verifier="owner/name")
    plain = tiny_model(vocab_size=VOCAB, eos_id=256, qk_norm=True).eval()
    save_run(tmp_path / "plain", plain, Tokenizer.bytes())
    with pytest.raises(UserError, match="no MTP heads"):
        export_speculators(tmp_path / "plain", tmp_path / "out")
    qwen3_run(tmp_path / "q", "sequential", 1, False)
    with pytest.raises(UserError, match="give --verifier"):
        export_speculators(tmp_path / "q" / "run", tmp_path / "out")
    other = tiny_model("sequential", 1, vocab_size=VOCAB, eos_id=256, dim=64, qk_norm=True).eval()
    save_run(tmp_path / "other", other, Tokenizer.bytes())
    export_hf(tmp_path / "other", tmp_path / "other_hf")
    with pytest.raises(UserError, match="hidden size 64 .* the heads 32"):
        export_speculators(tmp_path / "q" / "run", tmp_path / "out", verifier=str(tmp_path / "other_hf"))
    assert not (tmp_path / "out").exists()


def test_a_verifier_with_another_vocabulary_is_refused(tmp_path):
    """Same hidden size (32), vocabulary 308 instead of 300: not the backbone the heads were trained on."""
    qwen3_run(tmp_path / "q", "sequential", 1, False)
    other = tiny_model("sequential", 1, vocab_size=VOCAB + 8, eos_id=256, qk_norm=True).eval()
    save_run(tmp_path / "other", other, Tokenizer.bytes())
    export_hf(tmp_path / "other", tmp_path / "other_hf")
    with pytest.raises(UserError, match="vocabulary 308, the heads 32 and 300"):
        export_speculators(tmp_path / "q" / "run", tmp_path / "out", verifier=str(tmp_path / "other_hf"))
    assert not (tmp_path / "out").exists()


def test_cli_export_format_speculators(tmp_path, capsys):
    qwen3_run(tmp_path, "sequential", 1, False)
    assert cli_main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "spec"), "--format",
                          "speculators", "--verifier", str(tmp_path / "verifier")]) == 0
    assert "1 draft token per step" in capsys.readouterr().out
    # again into the same folder (an earlier export of this kind is replaced), then a refusal in one line
    assert cli_main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "spec"), "--format",
                          "speculators", "--verifier", str(tmp_path / "verifier")]) == 0
    capsys.readouterr()
    assert cli_main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "x"), "--verifier", "a/b"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--verifier is for --format speculators" in err
