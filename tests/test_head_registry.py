"""A fourth head family is one class plus a registry entry: nothing else in the package changes.

`EchoHeads` lives only in this file. Head k is a zero-initialised residual linear map on the main
head's normed state, unembedded by the shared LM head. Registered for one test, it trains through
the real trainer, evaluates, exports under its own names, and decodes greedily exactly as plain
decoding does.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from multitoken.config import HeadsConfig, ModelConfig
from multitoken.decoding.api import generate
from multitoken.io.checkpoint import load_run
from multitoken.io.hf import state_to_hf
from multitoken.model.heads import HeadFamily, kinds, register_family, unregister_family
from multitoken.training.evaluate import evaluate
from multitoken.training.trainer import train
from train_helpers import make_data, tiny_train_config


class EchoHeads(HeadFamily):
    kind = "echo"
    recompute = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.maps = nn.ModuleList(nn.Linear(cfg.dim, cfg.dim, bias=False) for _ in range(cfg.heads.depth))

    def forward(self, shared, states, rope, cache=None, slots=None, mask=None) -> list[Tensor]:
        return [states.main + m(states.main) for m in self.maps]

    def decode_states(self, shared, n, states, rope, cache, slots, mask) -> list[Tensor]:
        return [states.main + m(states.main) for m in self.maps[:n]]

    @torch.no_grad()
    def reset_parameters(self, shared) -> None:
        for m in self.maps:
            nn.init.zeros_(m.weight)

    def fsdp_units(self) -> Iterator[nn.Module]:
        return iter(self.maps)

    @classmethod
    def export_name(cls, name: str, cfg: ModelConfig) -> str:
        m = re.fullmatch(r"maps\.(\d+)\.weight", name)
        return f"echo_head.{m[1]}.weight" if m else super().export_name(name, cfg)


@pytest.fixture
def echo_family():
    register_family(EchoHeads)
    yield EchoHeads
    unregister_family(EchoHeads.kind)
    assert EchoHeads.kind not in kinds()


def test_a_fourth_family_trains_evaluates_exports_and_decodes_exactly(echo_family, tmp_path):
    assert HeadsConfig.parse("echo:2") == HeadsConfig("echo", 2)
    data = make_data(tmp_path)
    result = train(tiny_train_config(heads="echo:2", steps=2), data, tmp_path / "run", progress=False)
    assert result["step"] == 2

    model, _ = load_run(tmp_path / "run", with_tokenizer=False)
    assert isinstance(model.mtp, EchoHeads) and model.depth == 2
    assert model.default_loss_weights() == [1.0, 1.0, 1.0]  # the base class's default
    assert model.config.n_cache_layers == model.config.n_layers  # no cache layers of its own
    assert any(model.mtp.maps[0].weight.flatten() != 0)  # the heads learned in that step

    stats = evaluate(model, data, n_batches=2, batch_size=2, seq_len=32)
    assert len(stats["accuracy_per_depth"]) == 3

    assert {"echo_head.0.weight", "echo_head.1.weight"} <= set(state_to_hf(model))

    prompt = torch.randint(2, model.config.vocab_size, (2, 7))
    plain, _ = generate(model, prompt, max_new_tokens=24, mode="ntp")
    for mode in ("spec", "tree"):
        out, stats = generate(model, prompt, max_new_tokens=24, mode=mode)
        assert out == plain, mode
