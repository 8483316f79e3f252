"""The [viz] extra is optional: without matplotlib a figure is skipped with one message (and the
run goes on); without tensorboard the event log is. With them, the files are written."""

from __future__ import annotations

import logging
import sys

import pytest

from multitoken import viz
from multitoken.training.evaluate import plot_accuracy

RESULT = {"accuracy_per_depth": [0.9, 0.5, 0.3], "acceptance_per_position": [0.5, 0.2], "expected_tau": 1.7}


@pytest.fixture(autouse=True)
def _fresh_messages(monkeypatch):
    monkeypatch.setattr(viz, "_said", set())


def test_without_matplotlib_the_plot_is_skipped_with_one_message(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with caplog.at_level(logging.INFO, logger="multitoken"):
        plot_accuracy(RESULT, tmp_path / "acc.png")
        plot_accuracy(RESULT, tmp_path / "acc2.png")
    assert not list(tmp_path.iterdir())
    lines = [r.getMessage() for r in caplog.records if "matplotlib" in r.getMessage()]
    assert len(lines) == 1 and "multitoken[viz]" in lines[0]


def test_with_matplotlib_the_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib", reason="the dev extra installs viz")
    plot_accuracy(RESULT, tmp_path / "acc.png")
    assert (tmp_path / "acc.png").read_bytes()[:4] == b"\x89PNG"


def test_without_tensorboard_no_writer_and_one_message(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with caplog.at_level(logging.INFO, logger="multitoken"):
        assert viz.summary_writer(str(tmp_path / "tb")) is None
    assert any("tensorboard is not installed" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "tb").exists()
