"""The study in phases (multitoken.experiments): runs already under --results are not trained again
and their numbers enter the table; results measured on other data are refused; picks of later
phases choose from stored runs; second-token acceptance in greedy generation against a naive
speculative loop written here (full forward passes, no cache)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from multitoken.cli import build_parser, main
from multitoken.cli.ablate import study_config
from multitoken.errors import UserError
from multitoken.experiments.study import build_study

GEN_PROMPTS, GEN_TOKENS, SEQ_LEN = 4, 8, 32


def write_corpus(folder: Path, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    for i in range(40):
        lines = [f"# module {i}", "", f"def f{i}(x):"]
        lines += [f"    x = x + {rng.randrange(10)}" for _ in range(rng.randrange(4, 9))]
        (folder / f"m{i:02d}.py").write_text("\n".join(lines + ["    return x"]) + "\n")
    return folder


def prepare(corpus: Path, out: Path) -> Path:
    assert main(["prepare", "--corpus", str(corpus), "--glob", "*.py", "--tokenizer", "bpe:300", "--out", str(out),
                 "--val-fraction", "0.2", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """data/ (bpe:300 over small .py files), and a study of plain + parallel:1 stored in results/."""
    root = tmp_path_factory.mktemp("study")
    prepare(write_corpus(root / "corpus"), root / "data")
    torch.set_num_threads(1)
    assert main(args(root / "data", root / "out", root / "results")) == 0
    return root


def args(data: Path, out: Path, results: Path, *extra: str, configs=("plain=none", "p2=parallel:1/w=geometric:0.5")) -> list[str]:
    grid = ["--configs", *configs, "--seeds", "1", "--axes", "tokens"] if configs else []
    return ["ablate", "--data", str(data), "--out", str(out), "--results", str(results), *grid, "--steps", "6",
            "--batch-size", "2", "--seq-len", str(SEQ_LEN), "--eval-every", "3", "--line-cases", "4",
            "--gen-prompts", str(GEN_PROMPTS), "--gen-tokens", str(GEN_TOKENS), "--device", "cpu", "--quiet", *extra]


def no_training(monkeypatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("a run whose result is under --results was trained again")

    monkeypatch.setattr("multitoken.training.trainer.train", refuse)
    monkeypatch.setattr("multitoken.experiments.measure.measure_run", refuse)


def test_finished_runs_are_stored_with_identity_fingerprint_and_commit(root):
    stored = sorted((root / "results").glob("runs/**/ablate_result.json"))
    assert [p.parent.relative_to(root / "results").as_posix() for p in stored] == \
        ["runs/tiny/p2/seed0-steps6", "runs/tiny/plain/seed0-steps6"]
    meta = json.loads((root / "data" / "meta.json").read_text())
    for p in stored:
        r = json.loads(p.read_text())
        assert r["data"]["sha256"] == meta["data_sha256"] and r["identity"]["seed"] == 0 and "commit" in r
        assert r == json.loads((root / "out" / p.relative_to(root / "results")).read_text())
    assert (root / "results" / "ablate.md").is_file() and (root / "results" / "ablate.png").is_file()


def test_a_stored_run_is_not_trained_again_and_enters_the_table(root, tmp_path, monkeypatch, capsys):
    no_training(monkeypatch)
    assert main(args(root / "data", tmp_path / "fresh", root / "results")) == 0  # a new machine: empty --out
    assert "trained 0 steps" in capsys.readouterr().out
    report = json.loads((tmp_path / "fresh" / "ablate.json").read_text())
    stored = json.loads((root / "results" / "runs/tiny/p2/seed0-steps6/ablate_result.json").read_text())
    row = next(r for r in report["rows"] if r["config"] == "p2")
    assert report["complete"] and row["val_loss"] == stored["val_loss"] and row["seeds"] == 1
    assert f"{stored['val_loss']:.4f}" in (tmp_path / "fresh" / "ablate.md").read_text()


def test_other_settings_are_trained_not_taken_from_the_store(root, tmp_path, monkeypatch):
    """Same configuration and seed, one more step: another run (it would train, so training is refused here)."""
    no_training(monkeypatch)
    with pytest.raises(AssertionError, match="trained again"):
        main(args(root / "data", tmp_path / "o", root / "results", configs=("plain=none",)) + ["--steps", "7"])


def test_results_measured_on_other_data_are_refused_in_one_line(root, tmp_path, monkeypatch, capsys):
    no_training(monkeypatch)
    corpus = tmp_path / "corpus"
    shutil.copytree(root / "corpus", corpus)
    (corpus / "m00.py").write_text((corpus / "m00.py").read_text() + "y = 1\n")  # one file differs
    other = prepare(corpus, tmp_path / "other")
    before = {p: p.read_bytes() for p in (root / "results").rglob("*") if p.is_file()}
    assert main(args(other, tmp_path / "o", root / "results")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "fingerprint" in err and "rebuild the data identically" in err
    assert {p: p.read_bytes() for p in (root / "results").rglob("*") if p.is_file()} == before
    # a stored file whose record was altered is refused too, whatever the run
    results = tmp_path / "results"
    shutil.copytree(root / "results", results)
    f = results / "runs/tiny/plain/seed0-steps6/ablate_result.json"
    r = json.loads(f.read_text())
    r["data"]["sha256"] = "0" * 64
    f.write_text(json.dumps(r))
    with pytest.raises(UserError, match="fingerprint"):
        build_study(study_config(build_parser().parse_args(args(root / "data", tmp_path / "o2", results))))


def test_phase_suites_plan_their_runs_and_picks_choose_from_stored_runs(root, tmp_path):
    def study(suite: str, results: Path):
        a = args(root / "data", tmp_path / suite, results, "--preset", "tiny", configs=()) + ["--suite", suite]
        return build_study(study_config(build_parser().parse_args(a)))

    phase1 = study("phase1-seq-vs-plain", root / "results").plan()
    assert [(s.variant.name, s.seed, s.steps, axes) for s, axes in phase1.runs] == \
        [(n, seed, 6, ("tokens",)) for seed in (0, 1, 2) for n in ("plain", "seq1")]
    phase4 = study("phase4-seeds", root / "results")
    plan = phase4.plan()
    assert plan.picks == {"best:2": ["p2"]}  # the only stored candidate
    assert [(s.variant.name, s.seed, phase4.result(s) is not None) for s, _ in plan.runs] == \
        [(n, seed, seed == 0) for seed in (0, 1, 2) for n in ("plain", "p2")]
    with pytest.raises(UserError, match="run the earlier phases first"):  # nothing to choose the best parallel from
        build_study(study_config(build_parser().parse_args(
            args(root / "data", tmp_path / "p3", root / "results", "--byte-data", str(root / "data"), "--preset", "base",
                 configs=()) + ["--suite", "phase3-equal-compute-and-bytes"])))
    with pytest.raises(UserError, match="--seeds"):
        build_study(study_config(build_parser().parse_args(
            args(root / "data", tmp_path / "x", root / "results", configs=()) + ["--suite", "phase1-seq-vs-plain", "--seeds", "2"])))


def naive_spec_greedy(model, prompt: list[int], new_tokens: int, eos: int) -> tuple[int, int]:
    """Greedy chain speculative decoding with one draft, from full forward passes: the main head
    proposes x, the depth-1 head at the last accepted position drafts the token after x; a step
    feeds x and the draft and accepts the draft when it equals the main head's next token (then
    the main head's token after it is the bonus). Returns (accepted drafts, steps)."""
    def top(seq: list[int], depth: int) -> int:
        with torch.no_grad():
            h = model(torch.tensor([seq]))[depth][0, -1]
        return int(model.logits(h, depth).argmax())

    seq = list(prompt)
    x, d = top(seq, 0), top(seq, 1)
    out, steps, accepted = [x], 0, 0
    while len(out) < new_tokens and eos not in out:
        steps += 1
        g = top(seq + [x], 0)
        if d == g:
            accepted += 1
            bonus = top(seq + [x, d], 0)
            seq, out, x = seq + [x, d], out + [d, bonus], bonus
        else:
            seq, out, x = seq + [x], out + [g], g
        d = top(seq, 1)
    return accepted, steps


def test_generation_acceptance_equals_a_naive_speculative_loop_on_held_out_prompts(root):
    from multitoken.data.prepare import load_tokenizer
    from multitoken.data.shards import read_shard
    from multitoken.io.checkpoint import load_run

    result = json.loads((root / "results" / "runs/tiny/p2/seed0-steps6/ablate_result.json").read_text())
    model, _ = load_run(root / "out" / "runs/tiny/p2/seed0-steps6", device="cpu", with_tokenizer=False)
    model.eval()
    eos = load_tokenizer(root / "data").eos_id
    val = np.asarray(read_shard(root / "data" / "val.bin"))
    # held-out documents, by hand: cut at EOS; those of at least P + G tokens, evenly spaced; the P before the middle G
    docs = [d for d in np.split(val, np.flatnonzero(val == eos) + 1) if len(d)]
    docs = [d[:-1] if d[-1] == eos else d for d in docs]
    P = SEQ_LEN // 2
    long = [d for d in docs if len(d) >= P + GEN_TOKENS]
    assert len(long) > GEN_PROMPTS  # so that the spacing matters
    picked = [long[i * len(long) // GEN_PROMPTS] for i in range(GEN_PROMPTS)]
    starts = [(len(d) - P - GEN_TOKENS) // 2 for d in picked]
    prompts = [d[s : s + P].tolist() for d, s in zip(picked, starts)]
    index = {id(d): i for i, d in enumerate(docs)}
    assert result["generation"]["prompt_starts"] == [[index[id(d)], s] for d, s in zip(picked, starts)]
    counts = [naive_spec_greedy(model, p, GEN_TOKENS, eos) for p in prompts]
    accepted, steps = sum(a for a, _ in counts), sum(s for _, s in counts)
    gen = result["generation"]
    assert gen["prompts"] == GEN_PROMPTS and gen["row_steps"] == steps
    assert gen["tau"] == pytest.approx((accepted + steps) / steps)  # one draft: tokens per step = 1 + accepted
    assert result["second_token_acceptance_generation"] == pytest.approx(accepted / steps, abs=1e-9)
    assert result["second_token_acceptance_teacher_forced"] is not None
    plain = json.loads((root / "results" / "runs/tiny/plain/seed0-steps6/ablate_result.json").read_text())
    assert plain["generation"] is None and plain["second_token_acceptance_generation"] is None


@pytest.mark.parametrize("whole_runs", [True, False])
def test_whole_runs_does_not_begin_a_run_that_would_not_finish(root, tmp_path, monkeypatch, whole_runs):
    """A fake clock that training alone advances, 10 s per step; budget 100 s. The first run (6 steps)
    takes 60 s; the second would take 60 s + the 10 s kept for measuring (a tenth of the budget until
    a measurement is timed): with whole_runs it is not begun, without it 2 of its steps are trained
    before the budget stops the call."""
    from types import SimpleNamespace

    import multitoken.training.trainer as trainer
    from multitoken.experiments import study as study_module
    from multitoken.experiments.study import checkpoint_step, run_study

    clock = [0.0]
    real_train = trainer.train

    def timed_train(cfg, data, run_dir, **kw):
        start = checkpoint_step(Path(run_dir))
        out = real_train(cfg, data, run_dir, **kw)
        clock[0] += 10.0 * (kw["stop_after"] - start)
        return out

    monkeypatch.setattr(trainer, "train", timed_train)
    monkeypatch.setattr(study_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    a = args(root / "data", tmp_path / "out", tmp_path / "results", "--chunk-steps", "4")
    study = build_study(study_config(build_parser().parse_args(a)))
    status = run_study(study, max_minutes=100 / 60, whole_runs=whole_runs)
    second = tmp_path / "out" / "runs/tiny/p2/seed0-steps6"
    assert status["trained_runs"] == ["runs/tiny/plain/seed0-steps6"] and not status["complete"]
    assert status["trained_steps"] == (6 if whole_runs else 8)
    assert checkpoint_step(second) == (0 if whole_runs else 2)
