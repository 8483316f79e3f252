"""CLI conventions: --version, a fast --help (no torch import), help text and defaults on every
command and option, one dtype spelling with the old ones as aliases, log levels, prompts from
stdin or a file decoded as a batch, generate --chat, and `multitoken chat` fed on stdin.

References: decoding each prompt alone through `multitoken.decoding.generate` (a batch must give
the same rows), and the chat template rendered by hand.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import multitoken
from multitoken.cli import build_parser, main
from multitoken.config import TrainConfig
from multitoken.data.tokenizer import Tokenizer
from multitoken.decoding import generate
from multitoken.io.checkpoint import save_run
from multitoken.experiments.config import SUITES, suite
from conftest import tiny_model

SRC = str(Path(multitoken.__file__).parent.parent)
TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A byte-level tiny run with medusa heads and a chat template."""
    torch.manual_seed(0)
    tok = Tokenizer.bytes()
    tok.chat_template = TEMPLATE
    model = tiny_model("medusa", 2, vocab_size=tok.vocab_size, eos_id=tok.eos_id, max_seq_len=160).eval()
    d = tmp_path_factory.mktemp("run")
    save_run(d, model, tok)
    return d, model, tok


def alone(model, tok, ids: list[int], n: int) -> str:
    out, _ = generate(model, [ids], n, eos_id=tok.eos_id)
    return tok.decode([t for t in out[0] if t != tok.eos_id])


def test_help_imports_no_torch_and_version_prints():
    code = "import sys, runpy; sys.argv = ['multitoken', '--help']\ntry:\n    runpy.run_module('multitoken', run_name='__main__')\n" \
           "except SystemExit:\n    pass\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": SRC}, timeout=120)
    assert out.stdout.strip().endswith("NO-TORCH") and "generate" in out.stdout, out.stdout + out.stderr
    ver = subprocess.run([sys.executable, "-m", "multitoken", "--version"], capture_output=True, text=True,
                         env={"PYTHONPATH": SRC}, timeout=120)
    assert ver.returncode == 0 and ver.stdout.strip() == f"multitoken {multitoken.__version__}"


def _parsers(parser: argparse.ArgumentParser, path: str = "multitoken"):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield f"{path} {name}", sub
                yield from _parsers(sub, f"{path} {name}")


def test_every_command_has_a_description_and_every_option_help():
    missing = []
    for path, p in _parsers(build_parser()):
        if not p.description:
            missing.append(f"{path}: no description")
        for a in p._actions:
            if a.option_strings and not a.help and not isinstance(a, argparse._HelpAction):
                missing.append(f"{path} {a.option_strings[0]}: no help")
    assert missing == []


def test_defaults_are_shown_in_help(capsys):
    assert main(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "most new tokens per prompt (default: 128)" in text and "(default: 1.0)" in text
    assert "0 = greedy (default: 0.0)" in text and "(default: [])" not in text  # a 0 default shows, an empty list does not


def test_one_dtype_spelling_with_aliases(run, capsys):
    d, _, _ = run
    for spelling in ("float32", "fp32"):
        assert main(["generate", "--run", str(d), "--prompt", "ab", "--max-new-tokens", "2", "--device", "cpu",
                     "--dtype", spelling, "--json"]) == 0
        capsys.readouterr()
    assert TrainConfig(dtype="bf16").dtype == "bfloat16" and TrainConfig(dtype="FP32").dtype == "float32"


def test_prompts_from_stdin_and_a_file_are_one_batch(run, capsys, monkeypatch, tmp_path):
    d, model, tok = run
    prompts = ["def f(x):", "class A:", "import os"]
    want = [alone(model, tok, tok.encode(p), 10) for p in prompts]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(prompts) + "\n\n"))
    assert main(["generate", "--run", str(d), "--max-new-tokens", "10", "--device", "cpu", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == want
    (tmp_path / "p.txt").write_text("\n".join(prompts))
    assert main(["generate", "--run", str(d), "--prompts", str(tmp_path / "p.txt"), "--max-new-tokens", "10",
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out.split("\n")[:3] == want and "batch" not in captured.out
    assert "tau=" in captured.err


def test_generate_chat_renders_the_template(run, capsys):
    d, model, tok = run
    assert main(["generate", "--run", str(d), "--prompt", "hi", "--chat", "--max-new-tokens", "8", "--device", "cpu",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    ids = tok.encode("[user] hi\n[assistant] ", special=True)
    assert data["text"] == alone(model, tok, ids, 8)


def test_chat_loop_keeps_the_conversation_and_prints_tau(run, capsys, monkeypatch):
    d, model, tok = run
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nmore\n/exit\nnever read\n"))
    assert main(["chat", "--run", str(d), "--max-new-tokens", "6", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    first = alone(model, tok, tok.encode("[user] hi\n[assistant] ", special=True), 6)
    second = alone(model, tok, tok.encode(f"[user] hi\n[assistant] {first}\n[user] more\n[assistant] ", special=True), 6)
    assert captured.out == f"{first}\n{second}\n"
    assert captured.err.count("[tau ") == 2 and "mode spec" in captured.err


def test_log_levels_from_the_option_and_the_environment(run, capsys, monkeypatch):
    d, _, _ = run
    argv = ["generate", "--run", str(d), "--prompt", "ab", "--max-new-tokens", "2", "--device", "cpu"]
    assert main(["--log-level", "warning", *argv]) == 0
    assert "tau=" not in capsys.readouterr().err
    monkeypatch.setenv("MULTITOKEN_LOG_LEVEL", "warning")
    assert main(argv) == 0
    assert "tau=" not in capsys.readouterr().err
    assert main(["--log-level", "info", *argv]) == 0  # the option wins over the environment
    assert "tau=" in capsys.readouterr().err
    monkeypatch.setenv("MULTITOKEN_LOG_LEVEL", "loud")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "MULTITOKEN_LOG_LEVEL" in err and "\n" not in err


def test_suite_names_say_what_they_are_and_the_old_name_still_works():
    assert "grid" in SUITES and "issue14" not in SUITES
    assert suite("issue14") is SUITES["grid"]


def test_help_texts_have_no_markup(capsys):
    for cmd in ("demo", "generate", "chat", "convert"):
        assert main([cmd, "--help"]) == 0
        assert "`" not in capsys.readouterr().out, cmd


def test_generate_decodes_an_exported_folder_with_its_heads(run, tmp_path, capsys):
    d, model, tok = run
    assert main(["export", "--run", str(d), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert main(["generate", "--run", str(tmp_path / "hf"), "--prompt", "def f(x):", "--max-new-tokens", "10",
                 "--device", "cpu", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["stats"]["mode"] == "spec" and data["text"] == alone(model, tok, tok.encode("def f(x):"), 10)


def test_convert_and_generate_take_a_cached_hub_id(run, tmp_path, capsys, monkeypatch):
    import shutil

    d, model, tok = run
    assert main(["export", "--run", str(d), "--out", str(tmp_path / "hf")]) == 0
    snap = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / ("ab" * 20)
    shutil.copytree(tmp_path / "hf", snap)
    (tmp_path / "hub" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny" / "refs" / "main").write_text(snap.name)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert main(["convert", "--hf", "acme/tiny", "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    for name in ("acme/tiny", str(tmp_path / "run")):
        assert main(["generate", "--run", name, "--prompt", "ab", "--max-new-tokens", "6", "--device", "cpu", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["text"] == alone(model, tok, tok.encode("ab"), 6)


def test_generate_without_mode_decodes_a_model_without_heads_plainly(tmp_path, capsys):
    """No --mode: a run without heads decodes plainly (speculative decoding would need heads and
    refuse), giving what plain greedy decoding gives."""
    torch.manual_seed(1)
    tok = Tokenizer.bytes()
    model = tiny_model("none", 0, vocab_size=tok.vocab_size, eos_id=tok.eos_id, max_seq_len=64).eval()
    save_run(tmp_path / "plain", model, tok)
    assert main(["generate", "--run", str(tmp_path / "plain"), "--prompt", "ab", "--max-new-tokens", "6", "--device", "cpu",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["stats"]["mode"] == "ntp" and out["text"] == alone(model, tok, tok.encode("ab"), 6)
