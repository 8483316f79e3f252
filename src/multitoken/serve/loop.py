"""The decoding loop: one background thread owns the engine; requests queue into its free rows.

HTTP handlers (on the asyncio event loop) `submit` a `Job` and read its events from an
`asyncio.Queue`; the thread adds the job's row to the running `Generation`, steps it, turns new
tokens into text (stop strings and UTF-8 held back right even when one step emits several
tokens: `StopText`), and posts ("text", piece) and then ("end", finish_reason, usage) back
with `call_soon_threadsafe`. `cancel` (a client went away) frees the row before the next step.
An exception inside a step fails the requests in flight (500) and starts a fresh generation;
the server stays up.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import time
from dataclasses import dataclass, field

from multitoken.decoding.api import Engine, Settings
from multitoken.decoding.text import StopText
from multitoken.serve.protocol import Job, usage


@dataclass
class Ticket:
    """A job inside the loop: where its events go and what it has produced."""

    job: Job
    events: asyncio.Queue
    aloop: asyncio.AbstractEventLoop
    text: StopText
    rid: int | None = None
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None

    def post(self, *event) -> None:
        try:
            self.aloop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening any more
            pass


class DecodeLoop:
    """The thread that decodes every request (see the module docstring).

    Args:
        model, tokenizer: what to serve.
        slots: rows decoded together (the engine's batch size).
        mode: "spec" (speculative, exact) or "ntp" (plain); draft: drafts per step, fixed (None: all
            heads, shortened where the engine measures step costs: see docs/serving.md).
        metrics: a `serve.app.Metrics` (counters updated as requests finish), or None.
        sync_every: steps between reads of the device (None: the engine's default).
    """

    def __init__(self, model, tokenizer, slots: int = 8, mode: str = "spec", draft: int | None = None,
                 metrics=None, sync_every: int | None = None, compile: bool | None = None,
                 graphs: bool | None = None) -> None:
        self.model, self.tokenizer, self.metrics = model, tokenizer, metrics
        # draft=None lets the generation choose the draft length (0 included) where the engine
        # measures step costs; a plain choice is undone whenever no row is decoding (Generation._join).
        self.settings = Settings(max_new_tokens=1 << 20, mode=mode, draft=draft, eos_id=tokenizer.eos_id,
                                 sync_every=sync_every, stream=True)
        self.engine = Engine(model, slots, compile=compile, graphs=graphs)
        self.gen = self.engine.start([], self.settings)
        self.inbox: queue.Queue = queue.Queue()
        self.tickets: dict[int, Ticket] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="multitoken-decode", daemon=True)
        self.error: str | None = None

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Finish the requests in flight, then end the thread."""
        self.stopping.set()
        self.inbox.put(None)
        self.thread.join()

    def submit(self, job: Job) -> Ticket:
        """Queue a job; its events arrive on `ticket.events` (call from the event loop)."""
        t = Ticket(job, asyncio.Queue(), asyncio.get_running_loop(), StopText(self.tokenizer, job.stop, self.tokenizer.eos_id))
        self.inbox.put(("add", t))
        return t

    def cancel(self, ticket: Ticket) -> None:
        """Free the ticket's row at the next step (its client went away)."""
        self.inbox.put(("cancel", ticket))

    @property
    def running(self) -> int:
        return len(self.gen.active)

    @property
    def waiting(self) -> int:
        return self.gen.waiting

    # ---- the thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            idle = self.gen.done
            if idle and self.stopping.is_set() and self.inbox.empty():
                return
            try:
                item = self.inbox.get(timeout=0.5) if idle else self.inbox.get_nowait()
            except queue.Empty:
                item = None
            while item is not None:
                self._take(item)
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    item = None
            if self.gen.done:
                continue
            try:
                self.gen.step()
                self._deliver()
            except Exception as e:  # a failing step must not take the server down
                self._fail(f"{type(e).__name__}: {e}")

    def _take(self, item) -> None:
        what, t = item
        if what == "add":
            j = t.job
            try:
                t.rid = self.gen.add(j.prompt, sampling=j.sampling, seed=j.seed, max_new_tokens=j.max_tokens)
            except Exception as e:  # checked before, so this is unexpected: this request fails alone
                t.post("error", 400, str(e))
                return
            self.tickets[t.rid] = t
        elif t.rid is not None and t.rid in self.tickets:
            t.cancelled = True
            self.gen.cancel(t.rid)
            self._close(t, "cancelled")

    def _deliver(self) -> None:
        now = time.perf_counter()
        for rid, toks in self.gen.new_tokens().items():
            t = self.tickets.get(rid)
            if t is None:
                continue
            if t.first_token is None:
                t.first_token = now
                if self.metrics is not None:
                    self.metrics.ttft.observe(now - t.submitted)
            piece = t.text.push(toks)
            if piece:
                t.post("text", piece)
            if t.text.stopped and not self.gen.requests[rid].done:
                self.gen.cancel(rid)
                self.gen.requests[rid].finish_reason = "stop"
        for rid, t in list(self.tickets.items()):
            r = self.gen.requests[rid]
            if r.done:
                rest = t.text.finish()
                if rest:
                    t.post("text", rest)
                self._close(t, "stop" if t.text.stopped else r.finish_reason)

    def _close(self, t: Ticket, reason: str) -> None:
        r = self.gen.requests[t.rid]
        use = usage(t.job, len(r.tokens), r.tau, r.acceptance_per_position, r.row_steps)
        if self.metrics is not None:
            self.metrics.request_done(t, r, reason)
        del self.tickets[t.rid]
        self.gen.forget(t.rid)
        if not t.cancelled:
            t.post("end", reason, use)

    def _fail(self, why: str) -> None:
        self.error = why
        print(f"error: decoding step failed ({why}); the requests in flight fail, the server goes on", file=sys.stderr)
        for t in self.tickets.values():
            t.post("error", 500, f"decoding failed: {why}")
        self.tickets.clear()
        self.gen = self.engine.start([], self.settings)
