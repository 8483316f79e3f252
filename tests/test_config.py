import dataclasses
import math
import typing

import pytest

from multitoken.checks import INT63, Floats, Ints
from multitoken.cli import main
from multitoken.config import MAX_HEAD_DEPTH, PRESETS, HeadsConfig, ModelConfig, TrainConfig, from_dict
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
    (dict(vocab_size=300, eos_id=300), "outside the vocabulary"),  # ids run 0..vocab_size-1: the edge itself
    (dict(vocab_size=300, eos_id=-1), "eos_id=-1"),
])
def test_bad_configurations_give_one_clear_error(kwargs, match):
    with pytest.raises(UserError, match=match) as e:
        ModelConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_the_last_id_of_the_vocabulary_is_a_valid_eos():
    assert ModelConfig(vocab_size=300, eos_id=299).eos_id == 299


@pytest.mark.parametrize("field,last,first_bad", [
    # (field, the last value in range, the first value past it), from what each field means:
    ("eos_id", 299, 300),                  # token ids run 0 .. vocab_size - 1
    ("eos_ids", [5, 299], [5, 300]),       # every stop id too
    ("local_layers", [0, 3], [0, 4]),      # layer indices run 0 .. n_layers - 1
    ("max_seq_len", 64, 65),               # with local layers, the context must fit the window (64)
])
def test_every_relational_bound_accepts_its_edge_and_refuses_one_past_it(field, last, first_bad):
    """Ranges that depend on another field (vocabulary, layers, window): the edge itself is valid,
    one past it is a one-line error naming the field. Off-by-ones at these edges passed the
    earlier cases, which tried values far outside (round 7: eos_id == vocab_size was accepted)."""
    base = dict(vocab_size=300, n_layers=4, sliding_window=64, max_seq_len=64, local_layers=[0])
    assert getattr(ModelConfig(**{**base, field: last}), field) == last
    with pytest.raises(UserError, match=field) as e:
        ModelConfig(**{**base, field: first_bad})
    assert "\n" not in str(e.value)


def test_round_trip_through_dict_and_unknown_keys_rejected():
    cfg = ModelConfig.from_preset("tiny", heads=HeadsConfig("sequential", 2))
    again = from_dict(ModelConfig, cfg.to_dict())
    assert again == cfg
    with pytest.raises(UserError, match="unknown ModelConfig key"):
        from_dict(ModelConfig, {**cfg.to_dict(), "n_layer": 3})
    with pytest.raises(UserError, match="unknown preset"):
        ModelConfig.from_preset("gigantic")


# ---- numbers from users: ASCII, finite, in range --------------------------------------------------


@pytest.mark.parametrize("text,value", [("8", 8), ("+8", 8), (" 8 ", 8), ("007", 7), (str(INT63), INT63)])
def test_ints_parse_ascii_decimal(text, value):
    assert Ints(0).parse(text) == value


# int() accepts '١٠' (Arabic-Indic ten), '1_000' and surrounding Unicode; isdigit() accepts '²', which int() refuses.
@pytest.mark.parametrize("text", ["²", "١٠", "٣", "1_000", "8.0", "1e3", "", " ", "0x10", "nan", "-1", str(INT63 + 1), "８"])
def test_ints_refuse_everything_else(text):
    with pytest.raises(ValueError):
        Ints(0).parse(text)


@pytest.mark.parametrize("text,value", [("0.5", 0.5), (".5", 0.5), ("5.", 5.0), ("1e-3", 1e-3), ("1E3", 1000.0), ("-0", 0.0),
                                        ("+2.5e+2", 250.0)])
def test_floats_parse_ascii_decimal(text, value):
    assert Floats().parse(text) == value


@pytest.mark.parametrize("text", ["nan", "NaN", "-nan", "inf", "-Infinity", "1e999", "-1e999", "٠.٥", "0x1p3", "1_0.5", "", " ",
                                  "half", "1,5"])
def test_floats_refuse_non_finite_and_non_ascii(text):
    with pytest.raises(ValueError):
        Floats().parse(text)


def test_ranges_fail_nan_whatever_the_bounds():
    nan = float("nan")
    for rng in (Floats(), Floats(0), Floats(0, 1), Floats(0, lo_open=True), Floats(hi=1), Floats(1e-6, 1e6, or_zero=True)):
        assert rng.problem(nan) is not None and rng.problem(math.inf) is not None and rng.problem(-math.inf) is not None
    assert Floats(0, 1, lo_open=True).problem(0.0) and Floats(0, 1, hi_open=True).problem(1.0)
    assert Floats(0, 1).problem(0.0) is None and Floats(0, 1).problem(1.0) is None
    assert Ints(1, 3).problem(True) and Ints(1, 3).problem(2.0) and Ints(1, 3).problem("2") and Ints(1, 3).problem(2) is None


def _numeric_fields(cls):
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if hints[f.name] in (int, float)]


def _bad_values(cls, name):
    """Values no numeric field may hold; ints also refuse floats and sizes past int64."""
    bad = [float("nan"), float("inf"), float("-inf"), "12", None, True]
    return bad + ([2.0, -(2**70), 2**70] if typing.get_type_hints(cls)[name] is int else [])


@pytest.mark.parametrize("name", _numeric_fields(TrainConfig))
def test_every_number_of_train_config_is_checked(name):
    for bad in _bad_values(TrainConfig, name):
        with pytest.raises(UserError, match=name) as e:
            TrainConfig(**{name: bad}).validate()
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", _numeric_fields(ModelConfig))
def test_every_number_of_model_config_is_checked(name):
    for bad in _bad_values(ModelConfig, name):
        with pytest.raises(UserError, match=name):
            ModelConfig(**{name: bad})


@pytest.mark.parametrize("name", _numeric_fields(HeadsConfig))
def test_every_number_of_heads_config_is_checked(name):
    for bad in _bad_values(HeadsConfig, name):
        with pytest.raises(UserError, match=name):
            ModelConfig(heads=dataclasses.replace(HeadsConfig("medusa", 2), **{name: bad}))


@pytest.mark.parametrize("kwargs,match", [
    (dict(betas=(float("nan"), 0.9)), "betas"), (dict(betas=(1.0, 0.9)), "betas"), (dict(betas=(0.9,)), "betas"),
    (dict(loss_weights=[1.0, float("nan"), 1.0]), "loss_weights"), (dict(loss_weights=[1.0, -1.0]), "loss_weights"),
    (dict(loss_weights=[0.0, 0.0]), "positive"), (dict(mtp_lambda="nan"), "schedule"), (dict(mtp_lambda="0.3,inf@5"), "schedule"),
    (dict(mtp_lambda="-0.1"), "schedule"), (dict(mtp_lambda="0.3,0.1@²"), "schedule"), (dict(min_lr=0.1, lr=0.01), "min_lr"),
    (dict(heads="medusa:1000000"), "^heads="), (dict(compile=1), "compile"), (dict(preset=3), "preset"),
])
def test_train_config_lists_schedules_and_types_are_checked(kwargs, match):
    with pytest.raises(UserError, match=match):
        TrainConfig(**kwargs).validate()


def test_loss_weights_and_schedules_refuse_nan_in_the_library():
    from multitoken.training.loss import MTPLoss, parse_schedule

    with pytest.raises(UserError, match="loss weight"):
        MTPLoss(1, weights=[1.0, float("nan")])
    for spec in (float("nan"), float("inf"), -1.0, "nan", [(0, float("nan"))], [(-1, 0.3)]):
        with pytest.raises(UserError, match="schedule"):
            parse_schedule(spec)
    assert parse_schedule("0.3,0.1@10") == [(0, 0.3), (10, 0.1)]


@pytest.mark.parametrize("spec", ["parallel:²", "parallel:١", "medusa:1000000", f"medusa:{MAX_HEAD_DEPTH + 1}", "medusa:0",
                                  "medusa:2.0", "medusa: 2x"])
def test_head_depths_are_ascii_and_bounded(spec):
    with pytest.raises(UserError, match=f"expected parallel:N.*from 1 to {MAX_HEAD_DEPTH}"):
        HeadsConfig.parse(spec)
    assert HeadsConfig.parse(f"medusa:{MAX_HEAD_DEPTH}").depth == MAX_HEAD_DEPTH


def test_bounds_do_not_refuse_real_shapes():
    """Llama-3.1-405B's shape (126 layers, d=16384, 128k context, 128k vocabulary) and SmolLM2's pass."""
    ModelConfig(vocab_size=128256, dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, intermediate_size=53248,
                max_seq_len=131072, rope_theta=500000.0, norm_eps=1e-5, heads=HeadsConfig("medusa", 5))
    ModelConfig.from_preset("smollm2-135m", max_seq_len=8192, heads=HeadsConfig("sequential", 1))
    TrainConfig(batch_size=4096, seq_len=8192, steps=10**7, lr=1.0, weight_decay=0.0, grad_clip=0.0, seed=INT63).validate()


@pytest.mark.parametrize("name", [n for n in _numeric_fields(TrainConfig)])
def test_every_numeric_train_option_refuses_nan_in_one_line(name, capsys):
    opt = "--" + name.replace("_", "-")
    assert main(["train", "--data", "d", "--out", "o", opt, "nan"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: multitoken train: argument {opt}: 'nan' is not"), err


def test_parser_errors_are_one_line_and_help_still_works(capsys):
    assert main(["generate", "--prompt", "x"]) == 2  # --run missing (a missing prompt may come on stdin)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: multitoken generate: ") and "--help" in err
    assert main(["train", "--help"]) == 0
    assert "--lr LR" in capsys.readouterr().out


# ---- fused inputs (sequential:N:fused) -----------------------------------------------------------------
@pytest.mark.parametrize("spec,canonical", [("sequential:4:shared:fused", "sequential:4:shared:fused"),
                                            ("sequential:4:fused:shared", "sequential:4:shared:fused"),
                                            ("sequential:2:fused", "sequential:2:fused")])
def test_fused_heads_spec_parses_and_prints_one_way(spec, canonical):
    h = HeadsConfig.parse(spec)
    assert (h.kind, h.depth, h.fused, h.shared) == ("sequential", int(spec.split(":")[1]), True, "shared" in spec)
    assert str(h) == canonical and HeadsConfig.parse(str(h)) == h


@pytest.mark.parametrize("spec", ["sequential:2:fused:fused", "parallel:2:fused", "medusa:3:fused", "sequential:2:fusd",
                                  "sequential:fused", "sequential:2::fused"])
def test_bad_fused_specs_are_one_line_errors(spec):
    with pytest.raises(UserError, match=r"expected parallel:N, sequential:N\[:shared\]\[:fused\]") as e:
        HeadsConfig.parse(spec)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("heads,match", [
    (HeadsConfig("parallel", 2, fused=True), "heads.fused is for sequential modules"),
    (HeadsConfig("sequential", 2, fused_layers=[1, 4]), "without heads.fused"),
    (HeadsConfig("sequential", 2, fused=True, fused_layers=[1, 3]), r"up to n_layers=4 \(h\^0\), e.g. \[1, 2, 4\]"),
    (HeadsConfig("sequential", 2, fused=True, fused_layers=[2, 1, 4]), "increasing block counts"),
    (HeadsConfig("sequential", 2, fused=True, fused_layers=[2, 2, 4]), "increasing block counts"),
    (HeadsConfig("sequential", 2, fused=True, fused_layers=[4]), "2 or more"),
    (HeadsConfig("sequential", 2, fused=True, fused_layers=[0, 5]), "2 or more"),
    (HeadsConfig("sequential", 2, fused=True, fused_layers="2,4"), "2 or more"),
])
def test_bad_fused_configs_are_one_line_errors(heads, match):
    with pytest.raises(UserError, match=match) as e:
        ModelConfig(n_layers=4, heads=heads)
    assert "\n" not in str(e.value)


def test_fused_layers_are_resolved_stored_and_read_back_exactly():
    """The flag picks the default layers when the model config is built (the caller's HeadsConfig is
    left alone); config.json stores them, and a run without the flag keeps its old keys."""
    asked = HeadsConfig.parse("sequential:4:shared:fused")
    cfg = ModelConfig.from_preset("smollm2-135m", heads=asked)
    assert cfg.heads.fused_layers == [2, 15, 30] and asked.fused_layers == []
    assert cfg.to_dict()["heads"] == {"kind": "sequential", "depth": 4, "medusa_layers": 1, "shared": True, "fused": True,
                                      "fused_layers": [2, 15, 30]}
    assert from_dict(ModelConfig, cfg.to_dict()) == cfg
    own = ModelConfig(n_layers=4, heads=HeadsConfig("sequential", 2, fused=True, fused_layers=[0, 4]))
    assert from_dict(ModelConfig, own.to_dict()).heads.fused_layers == [0, 4]
    assert set(ModelConfig(heads=HeadsConfig("sequential", 2)).to_dict()["heads"]) == {"kind", "depth", "medusa_layers"}
