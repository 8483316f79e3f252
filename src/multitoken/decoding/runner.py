"""The runner: live-slot buckets, compilation, CUDA graphs and the measured cost of each step.

A strategy's step reads and writes only the `DecodeState`, so the runner may run it
- eagerly (the CPU default, and what the tests exercise);
- with compiled blocks (`compile=True`, the CUDA default): torch.compile of `Block.cached`, one
  compilation that every block of the model (and of the heads) reuses, with automatic dynamic
  shapes after the first recompile, so a few compilations serve every step kind and bucket
  (whole-step compilation unrolls every layer and took 35-45 s per graph);
- captured as a CUDA graph (the CUDA default) and replayed: one launch per step instead of
  hundreds, which is what batch-1 decoding is bound by.
Attention only spans the live slots: the runner sets ``cache.live`` to the smallest bucket
(a power of two) that holds every row's position plus the step's fed tokens, from a bound the
host keeps without reading the device, so a step's cost grows with the tokens in the cache.

Capturing a graph runs the step a few times for warm-up. It does so with every row marked
done (nothing is emitted or committed, and the cache and drafter buffers are only written past
the committed positions or rewritten with the values they hold) and gives the small loop state
back afterwards, so a graph can be captured mid-generation when a new bucket is reached. The
same warm-up times a few replays: those are the step costs the draft-length choice uses.

On the CPU (no graphs) a step is synchronous, so the runner times every step it runs (two clock
reads of its thread's CPU time, `CPU_CLOCK`) and keeps the median of the last few per (step
kind, bucket). A kind it has not run yet
is timed once the same way a graph warm-up runs (every row marked done, the loop state given
back) and then follows the steps actually run. Those are the CPU's step costs for the draft-length choice.
"""

from __future__ import annotations

import collections
import logging
import os
import statistics
import time
from pathlib import Path

import torch

from multitoken.decoding.state import DecodeState

log = logging.getLogger(__name__)

MIN_BUCKET = 64
CPU_COSTS = True
"""Time CPU steps, so that `generate(draft=None)` chooses the draft length there too (the tests
turn it off: a choice that follows the clock would make their step counts vary)."""
CPU_PROBES = 3
"""Timed runs of a step kind the CPU runner has not run yet (after one untimed run)."""
CPU_CLOCK = time.thread_time
"""What CPU steps are timed with: the decoding thread's CPU time. It equals wall time on an idle
machine (the thread computes or spins at OpenMP barriers all step long) and leaves out the time
the scheduler gives other processes on a busy one, which is long enough to stall the longer
steps more often and made wall-clock costs pick plain steps there."""
CPU_WINDOW = 15
"""A CPU step kind's cost is the median of its last this many timed steps: one step stalled by
another process on a shared machine must not move the draft-length choice."""


def bucket(need: int, cap: int) -> int:
    """The smallest power of two >= need (at least MIN_BUCKET), capped at `cap`."""
    b = MIN_BUCKET
    while b < need:
        b *= 2
    return min(b, cap)


def use_compile_cache() -> None:
    """Keep inductor's compiled artefacts across processes in ~/.cache/multitoken (unless set)."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "multitoken" / "inductor"
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)


def backend(device: torch.device, compile: bool | None, graphs: bool | None) -> tuple[bool, bool]:
    """The one place the defaults live: (compile, graphs), None = on for CUDA, off elsewhere.

    CUDA graphs exist only on CUDA, so graphs=True elsewhere means off.
    """
    cuda = torch.device(device).type == "cuda"
    return (cuda if compile is None else bool(compile)), (cuda if graphs is None else bool(graphs) and cuda)


class CompiledBlock:
    """`Block.cached` under torch.compile, falling back to eager blocks if compilation fails.

    Compilation happens at a first call, before any kernel runs, so falling back there is safe.
    Each new model (new parameters) compiles again; the recompile limits are raised so that a
    process decoding several models keeps compiling instead of failing.
    """

    def __init__(self, runner: "Runner") -> None:
        import torch._dynamo

        from multitoken.model.layers import Block

        cfg = torch._dynamo.config
        for name, value in (("recompile_limit", 64), ("cache_size_limit", 64),
                            ("accumulated_recompile_limit", 4096), ("accumulated_cache_size_limit", 4096)):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), value))
        from torch._dynamo.utils import counters

        self.runner = runner
        self._counters = counters  # dynamo's graph count: a call that raises it compiled
        self.eager = Block.cached
        self.compiled = torch.compile(Block.cached, fullgraph=True)

    def __call__(self, *args):
        if self.runner.compile_error is None:
            counters = self._counters
            before = counters["stats"]["unique_graphs"]
            t0 = time.perf_counter()
            try:
                out = self.compiled(*args)
                if counters["stats"]["unique_graphs"] != before:  # this call compiled: count its time
                    self.runner.compile_time_s += time.perf_counter() - t0
                return out
            except Exception as e:  # a compiler failure must not stop decoding
                self.runner.compile_error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                log.warning(f"warning: compiled decoding failed ({self.runner.compile_error}); decoding with eager blocks")
        return self.eager(*args)


class Runner:
    """Runs strategy steps over one `DecodeState` (see the module docstring).

    Args:
        state: the decode state.
        compile: torch.compile the blocks (default: on CUDA; `backend`).
        graphs: capture each step as a CUDA graph (default: on CUDA; `backend`).
    """

    def __init__(self, state: DecodeState, compile: bool | None = None, graphs: bool | None = None) -> None:
        self.state = state
        self.compile, self.graphs = backend(state.device, compile, graphs)
        self._graphs: dict = {}
        self._pool = None
        self.compile_time_s = 0.0
        """Seconds spent compiling and capturing (reported apart from decoding time)."""
        self.costs: dict = {}
        """(strategy key, bucket) -> measured seconds per step (graph replays, or timed CPU steps)."""
        self.timed = not self.graphs and state.device.type == "cpu"
        """CPU steps are timed as they run (the costs are reported even where nothing chooses by them)."""
        self.measures_costs = self.graphs or (self.timed and CPU_COSTS)
        """Whether `cost` measures step costs for the draft-length choice (CUDA graphs, or the CPU)."""
        self._recent: dict = {}  # (strategy key, bucket) -> the last CPU_WINDOW timed CPU steps
        self.compile_error: str | None = None
        """Why compilation was given up (the step then runs eager blocks), or None."""
        if self.compile:
            use_compile_cache()
            state.cache.block_fn = CompiledBlock(self)

    def run_costs(self) -> dict:
        """(strategy key, bucket) -> median seconds of the CPU steps actually run there (the last
        CPU_WINDOW), without the probes `cost` times for kinds not run yet (every row done)."""
        return {key: statistics.median(times) for key, times in self._recent.items() if times}

    def live_for(self, need: int) -> int:
        return bucket(need, self.state.cache.max_seq_len)

    def step(self, strategy, need: int) -> None:
        """Run one step of `strategy`; `need` bounds every row's position plus the fed tokens."""
        live = self.live_for(need)
        self.state.cache.live = live
        if not self.graphs:
            if not self.timed:
                strategy.step()
                return
            t0 = CPU_CLOCK()
            strategy.step()
            dt = CPU_CLOCK() - t0
            key = (strategy.key, live)
            recent = self._recent.get(key)
            if recent is None:
                recent = self._recent[key] = collections.deque(maxlen=CPU_WINDOW)
            recent.append(dt)
            self.costs[key] = statistics.median(recent)
            return
        g = self._graphs.get((strategy.key, live))
        if g is None:
            g = self._capture(strategy, live)
        g.replay()

    def _capture(self, strategy, live: int):
        st = self.state
        t0 = time.perf_counter()
        saved = [t.clone() for t in st.small_tensors()]
        st.emitter.done.fill_(True)
        fn = strategy.step
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pool):
            fn()
        self._pool = g.pool()
        torch.cuda.synchronize()
        self.compile_time_s += time.perf_counter() - t0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        reps = 5
        start.record()
        for _ in range(reps):
            g.replay()
        end.record()
        end.synchronize()
        self.costs[(strategy.key, live)] = start.elapsed_time(end) / 1000 / reps
        for t, s in zip(st.small_tensors(), saved):
            t.copy_(s)
        self._graphs[(strategy.key, live)] = g
        return g

    def _probe(self, strategy, live: int, clock=None) -> float:
        """Seconds per eager step of `strategy` at bucket `live`, run with every row done (see the
        module docstring); the loop state is given back. `clock`: default `CPU_CLOCK`."""
        clock = clock or CPU_CLOCK
        st = self.state
        saved = [t.clone() for t in st.small_tensors()]
        st.emitter.done.fill_(True)
        before = st.cache.live
        st.cache.live = live
        times = []
        for _ in range(CPU_PROBES + 1):
            t0 = clock()
            strategy.step()
            times.append(clock() - t0)
        st.cache.live = before
        for t, s in zip(st.small_tensors(), saved):
            t.copy_(s)
        return statistics.median(times[1:])

    def cost(self, strategy, need: int) -> float | None:
        """Measured seconds per step of `strategy` at the bucket for `need`, capturing (or on the CPU
        timing) it if needed; None where the runner cannot measure (CUDA without graphs)."""
        live = self.live_for(need)
        key = (strategy.key, live)
        if key not in self.costs:
            if self.graphs:
                self.state.cache.live = live
                self._capture(strategy, live)
            elif self.measures_costs:
                # A CPU step's cost hardly depends on the bucket (the weights dominate): the kind's
                # nearest measured bucket serves until a step at this one is timed.
                seen = [b for (k, b) in self.costs if k == strategy.key]
                if seen:
                    return self.costs[(strategy.key, min(seen, key=lambda b: abs(b - live)))]
                self.costs[key] = self._probe(strategy, live)
        return self.costs.get(key)
