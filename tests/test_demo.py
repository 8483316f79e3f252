"""The README's main job runs end to end (a few steps here; the real demo trains for minutes)."""

import json

import pytest

from multitoken.cli import main


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reuses_its_work(tmp_path, capsys):
    args = ["demo", "--workdir", str(tmp_path), "--steps", "3", "--max-new-tokens", "8", "--threads", "1"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert summary["steps"] == 3 and len(summary["prompts"]) == 3
    assert all(p["identical"] for p in summary["prompts"])  # speculative == plain greedy
    assert all(1.0 <= p["tau"] <= 4.0 for p in summary["prompts"])
    assert (tmp_path / "run" / "loss.png").is_file()
    capsys.readouterr()
    assert main(args) == 0  # a second run reuses the data and the finished run
    out = capsys.readouterr().out
    assert "reused" in out and "continuing the run found there" in out
