"""Plain generation: sampling helper, cached decoding == recomputation, output buffer, streaming, CLI."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import tiny_model
from multitoken.cli import main
from multitoken.data.tokenizer import Tokenizer
from multitoken.decoding.api import TextStream, generate
from multitoken.decoding.sampling import Sampling, draw, probs, sample
from multitoken.decoding.state import Emitter, prepare_prompts
from multitoken.errors import UserError
from multitoken.io.checkpoint import save_run


def varied(model, std: float = 0.15, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


# ---- sampling ----------------------------------------------------------------------------------------
def test_probs_applies_temperature_top_k_and_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    torch.testing.assert_close(probs(logits, Sampling(1.0)), logits.softmax(-1))
    torch.testing.assert_close(probs(logits, Sampling(0.5)), (logits / 0.5).softmax(-1))
    p = probs(logits, Sampling(1.0, top_k=2))
    torch.testing.assert_close(p, torch.cat([logits[:, :2].softmax(-1), torch.zeros(1, 3)], 1))
    full = logits.softmax(-1)[0]  # 0.64, 0.23, 0.09, ...: top-p 0.8 keeps the first two, 0.9 three
    assert (probs(logits, Sampling(1.0, top_p=0.8))[0] > 0).tolist() == [True, True, False, False, False]
    assert (probs(logits, Sampling(1.0, top_p=float(full[:2].sum()) + 0.01))[0] > 0).sum() == 3
    assert (probs(logits, Sampling(1.0, top_p=0.01))[0] > 0).tolist() == [True, False, False, False, False]
    assert probs(logits, Sampling(0.0)).tolist() == [[1.0, 0.0, 0.0, 0.0, 0.0]]
    assert sample(logits, Sampling(0.0)).tolist() == [0]


def test_draw_matches_the_distribution_and_is_seeded():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    g = torch.Generator().manual_seed(0)
    x = draw(p.expand(40000, 4), torch.rand(40000, generator=g))
    freq = torch.bincount(x, minlength=4).float() / 40000
    assert freq[3] == 0
    torch.testing.assert_close(freq, p, atol=0.01, rtol=0)
    # The inverse CDF at the edges: u = 0 gives the first token with mass, u -> 1 the last one.
    edges = torch.tensor([0.0, 0.5, 0.4999, 0.8, 1.0 - 2**-24])
    assert draw(torch.tensor([0.0, 0.5, 0.3, 0.2, 0.0]).expand(5, 5), edges).tolist() == [1, 2, 1, 3, 3]


@pytest.mark.parametrize("kwargs", [
    dict(temperature=-0.1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
    # NaN compares False with everything: a NaN temperature once passed `t < 0` and emitted token 0 forever
    dict(temperature=float("nan")), dict(temperature=float("inf")), dict(temperature=1e-30),
    dict(top_p=float("nan")), dict(top_p=float("inf")), dict(top_k=2.5), dict(temperature="1"),
])
def test_bad_sampling_settings_are_user_errors(kwargs):
    # The library names the setting; the CLI words the same error as its option.
    with pytest.raises(UserError, match="^(temperature|top_k|top_p)=") as e:
        Sampling(**kwargs)
    assert "\n" not in str(e.value)
    assert re.match("--(temperature|top-k|top-p) ", e.value.as_option())


def test_sampling_accepts_the_edges_of_its_ranges():
    for kwargs in (dict(temperature=0), dict(temperature=1e-6), dict(temperature=1e6), dict(top_p=1.0), dict(top_p=1e-9),
                   dict(top_k=0), dict(top_k=10**9), dict(temperature=2)):
        Sampling(**kwargs)


# ---- plain decoding ----------------------------------------------------------------------------------
def test_cached_greedy_equals_recomputing_the_whole_sequence_per_row():
    """Right-padded prompts of different lengths decode as if each row were alone, uncached."""
    model = varied(tiny_model())
    rows = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [3]]
    out, stats = generate(model, rows, 12)
    assert stats.steps == 11 and stats.tau == 1.0 and stats.new_tokens == 36
    with torch.no_grad():
        for r, o in zip(rows, out):
            seq = list(r)
            for _ in range(12):
                seq.append(int(model.logits(model(torch.tensor([seq]), heads=False)[0][0, -1]).argmax()))
            assert o == seq[len(r):]


def test_heads_are_dropped_in_plain_decoding():
    """A model with heads decodes exactly like its backbone alone."""
    torch.manual_seed(0)
    with_heads = varied(tiny_model("parallel", 2))
    backbone = tiny_model().eval()  # no heads at all, the same backbone weights
    missing = backbone.load_state_dict({k: v for k, v in with_heads.state_dict().items() if not k.startswith("mtp.")})
    assert not missing.missing_keys and not missing.unexpected_keys
    with torch.no_grad():
        seq = [4, 5, 6]
        for _ in range(10):
            seq.append(int(backbone.logits(backbone(torch.tensor([seq]))[0][0, -1]).argmax()))
    assert generate(with_heads, [[4, 5, 6]], 10)[0][0] == seq[3:]
    medusa = varied(tiny_model("medusa", 2), seed=1)
    out, _ = generate(medusa, [[4, 5, 6]], 10)
    with torch.no_grad():
        seq = [4, 5, 6]
        for _ in range(10):
            seq.append(int(medusa.logits(medusa(torch.tensor([seq]))[0][0, -1]).argmax()))
    assert out[0] == seq[3:]


def test_output_stops_at_eos_and_at_the_context():
    model = varied(tiny_model(max_seq_len=20))
    out, _ = generate(model, [[5, 6, 7], [8] * 15], 30)
    assert [len(o) for o in out] == [17, 5]  # prompt + output never exceeds max_seq_len
    eos = out[0][4]
    out2, _ = generate(model, [[5, 6, 7]], 30, eos_id=eos)
    assert out2[0] == out[0][: out[0].index(eos) + 1]


def test_emitter_applies_eos_and_budget_per_row():
    e = Emitter(2, width=10, q_max=3, device="cpu")
    e.reset(torch.tensor([2, 2]), max_new_tokens=4, max_seq_len=10, eos_id=9)
    taken = e.push(torch.tensor([[1, 9, 3], [4, 5, 6]]), torch.tensor([3, 2]))
    assert taken.tolist() == [2, 2] and e.done.tolist() == [True, False]
    taken = e.push(torch.tensor([[7, 7, 7], [1, 2, 3]]), torch.tensor([3, 3]))
    assert taken.tolist() == [0, 2] and bool(e.done.all())
    assert e.tokens() == [[1, 9], [4, 5, 1, 2]]


def test_prompt_errors():
    with pytest.raises(UserError, match="empty prompt"):
        prepare_prompts([[1, 2], []], 16)
    with pytest.raises(UserError, match="empty prompt"):
        prepare_prompts([], 16)
    with pytest.raises(UserError, match="shorten"):
        prepare_prompts([list(range(16))], 16)
    idx, lengths = prepare_prompts([[1, 2], [3]], 16)
    assert idx.tolist() == [[1, 2], [3, 0]] and lengths.tolist() == [2, 1]
    assert prepare_prompts(torch.tensor([4, 5]), 16)[0].tolist() == [[4, 5]]
    with pytest.raises(UserError):
        generate(tiny_model(), [[3]], 0)


# ---- streaming and CLI -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory: a byte-level tiny model with parallel heads (weights varied)."""
    torch.manual_seed(0)
    tok = Tokenizer.bytes()
    model = varied(tiny_model("parallel", 2, vocab_size=tok.vocab_size, eos_id=tok.eos_id, max_seq_len=48), 0.2)
    d = tmp_path_factory.mktemp("run")
    save_run(d, model, tok)
    return d, model, tok


def test_text_stream_yields_the_decoded_text_and_stops_on_a_stop_string(run_dir):
    _, model, tok = run_dir
    stream = TextStream(model, tok, "def f(x):", max_new_tokens=20, mode="spec")
    pieces = []
    for piece in stream:
        assert torch.is_grad_enabled()  # the stream's no_grad never leaks into the caller's code
        pieces.append(piece)
    ids = [t for t in stream.token_ids if t != tok.eos_id]
    assert "".join(pieces) == stream.text == tok.decode(ids)
    assert stream.stats.new_tokens == len(stream.token_ids) and stream.stats.steps >= 1
    assert stream.token_ids == generate(model, [tok.encode("def f(x):")], 20, mode="ntp", eos_id=tok.eos_id)[0][0]
    if len(stream.text) > 3:
        stop = stream.text[2:4]
        cut = TextStream(model, tok, "def f(x):", stop=[stop], max_new_tokens=20, mode="spec")
        assert "".join(cut) == cut.text == stream.text[: stream.text.index(stop)]


def test_cli_generate_json_and_stream(run_dir, capsys):
    d, model, tok = run_dir
    rc = main(["generate", "--run", str(d), "--prompt", "def f(x):", "--mode", "spec", "--max-new-tokens", "12",
               "--json"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert {"text", "token_ids", "tau", "acceptance_per_position", "tokens_per_second", "steps"} <= set(data)
    plain, _ = generate(model, [tok.encode("def f(x):")], 12, eos_id=tok.eos_id)
    assert data["token_ids"] == plain[0] and len(data["acceptance_per_position"]) == 2
    assert main(["generate", "--run", str(d), "--prompt", "def f(x):", "--mode", "tree", "--max-new-tokens", "8",
                 "--temperature", "0.8", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert "tau=" in captured.err


def test_cli_errors_are_one_line(run_dir, capsys, tmp_path):
    d, _, _ = run_dir
    cases = [
        ["--prompt", ""],
        ["--prompt", "x" * 60],
        ["--prompt", "hi", "--draft", "3"],
        ["--prompt-file", str(tmp_path / "missing.txt")],
    ]
    for extra in cases:
        assert main(["generate", "--run", str(d)] + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err


def test_every_seed_a_torch_generator_takes_is_accepted_and_no_other():
    """Seeds run over what torch.Generator.manual_seed takes (a uint64): 0 and 2**64-1 sample (the
    same seed twice, the same tokens); 2**64, which the generator refuses, is a one-line error."""
    from multitoken.errors import UserError

    torch.Generator().manual_seed(2**64 - 1)
    with pytest.raises((RuntimeError, ValueError, OverflowError)):
        torch.Generator().manual_seed(2**64)
    model = tiny_model("medusa", 2).eval()
    for seed in (0, 2**64 - 1):
        a = generate(model, [[1, 2, 3]], 6, mode="spec", temperature=1.0, seed=seed)[0]
        assert a == generate(model, [[1, 2, 3]], 6, mode="spec", temperature=1.0, seed=seed)[0]
    with pytest.raises(UserError, match="seed") as e:
        generate(model, [[1, 2, 3]], 6, temperature=1.0, seed=2**64)
    assert "\n" not in str(e.value)
