import pytest

from multitoken.config import PRESETS, HeadsConfig, ModelConfig, from_dict
from multitoken.errors import UserError
from multitoken.model import Transformer


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build_configs(name):
    cfg = ModelConfig.from_preset(name)
    assert cfg.head_dim * cfg.n_heads >= cfg.dim // 2


def test_tiny_preset_is_about_a_million_parameters():
    model = Transformer(ModelConfig.from_preset("tiny", heads=HeadsConfig("parallel", 2)))
    assert 0.5e6 < model.num_parameters() < 1.5e6


def test_large_preset_is_about_350m():
    cfg = ModelConfig.from_preset("large")
    d, L, f, V = cfg.dim, cfg.n_layers, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.n_kv_heads * cfg.head_dim
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f
    assert 300e6 < per_layer * L + V * d < 400e6


@pytest.mark.parametrize("spec,kind,depth", [("parallel:3", "parallel", 3), ("sequential:1", "sequential", 1),
                                             ("medusa:4", "medusa", 4), ("none", "none", 0)])
def test_heads_spec_parses(spec, kind, depth):
    h = HeadsConfig.parse(spec)
    assert (h.kind, h.depth) == (kind, depth)
    assert str(h) == spec


@pytest.mark.parametrize("spec", ["parallel", "parallel:x", "eagle:2", "parallel:-1", ""])
def test_bad_heads_spec_is_one_clear_error(spec):
    with pytest.raises(UserError, match="expected parallel:N"):
        HeadsConfig.parse(spec)


@pytest.mark.parametrize("kwargs,match", [
    (dict(heads=HeadsConfig("parallel", 0)), "at least one extra head"),
    (dict(heads=HeadsConfig("sequential", 0)), "at least one extra head"),
    (dict(n_layers=4, heads=HeadsConfig("parallel", 4)), "more heads than the model has layers"),
    (dict(n_layers=1, heads=HeadsConfig("parallel", 1)), "need a trunk"),
    (dict(dim=30, n_heads=4), "not divisible by n_heads"),
    (dict(n_heads=4, n_kv_heads=3), "multiple of n_kv_heads"),
    (dict(heads=HeadsConfig("eagle", 1)), "choose one of"),
    (dict(eos_id=999), "outside the vocabulary"),
])
def test_bad_configurations_give_one_clear_error(kwargs, match):
    with pytest.raises(UserError, match=match) as e:
        ModelConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_round_trip_through_dict_and_unknown_keys_rejected():
    cfg = ModelConfig.from_preset("tiny", heads=HeadsConfig("sequential", 2))
    again = from_dict(ModelConfig, cfg.to_dict())
    assert again == cfg
    with pytest.raises(UserError, match="unknown ModelConfig key"):
        from_dict(ModelConfig, {**cfg.to_dict(), "n_layer": 3})
    with pytest.raises(UserError, match="unknown preset"):
        ModelConfig.from_preset("gigantic")
