"""The decoding API under its historical name.

The engine lives in the `multitoken.decoding` package (sampling -> state -> verification ->
strategies -> runner -> api); this module re-exports `generate`, `TextStream` and the sampling
helpers for code that imported them from here (the subcommand is cli/generate.py).
"""

from __future__ import annotations

from multitoken.decoding.api import MODES, GenerationStats, TextStream, decode, generate  # noqa: F401
from multitoken.decoding.sampling import Sampling, draw, probs, sample  # noqa: F401
from multitoken.decoding.state import Emitter, Tally, prepare_prompts  # noqa: F401
