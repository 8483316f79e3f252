"""Optional plotting and TensorBoard (the ``[viz]`` extra): a missing package skips the figure or
the event log with one message, never the run; the JSON and JSONL files carry the same numbers.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)
HINT = "pip install 'multitoken[viz]'"
_said: set[str] = set()


def pyplot(what: str) -> Any:
    """matplotlib.pyplot on the Agg backend, or None (after one message) when matplotlib is absent.

    Args:
        what: the figure that would be drawn (for the message), e.g. 'loss.png'.
    """
    try:
        import matplotlib
    except ImportError:
        _once("matplotlib", f"matplotlib is not installed: {what} skipped ({HINT})")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def summary_writer(log_dir: str, **kwargs: Any) -> Any:
    """A TensorBoard ``SummaryWriter`` for `log_dir`, or None (after one message) when tensorboard is absent."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        _once("tensorboard", f"tensorboard is not installed: TensorBoard logs skipped, metrics.jsonl has them ({HINT})")
        return None
    return SummaryWriter(log_dir, **kwargs)


def _once(key: str, message: str) -> None:
    if key not in _said:
        _said.add(key)
        log.info(message)
