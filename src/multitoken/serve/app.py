"""The ASGI app: OpenAI's /v1/completions and /v1/chat/completions, /v1/models, /health, /metrics.

Handlers only check requests and move events: decoding happens on the `DecodeLoop`'s thread.
Streaming answers are server-sent events (``data: {chunk}`` lines, then ``data: [DONE]``); a
client that goes away mid-stream cancels its row at once (the response generator is closed, its
``finally`` cancels). Every error a request can cause is a 4xx with OpenAI's error body.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from multitoken.serve.loop import DecodeLoop, Ticket
from multitoken.serve.protocol import APIError, Job, check_request, chunk, completion, parse_body, sse


class Metrics:
    """Prometheus counters of one server (its own registry), named after vLLM's speculative-decoding ones."""

    def __init__(self, depth: int) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("multitoken_requests", "Finished requests, by finish reason", ["finish_reason"], registry=r)
        self.errors = Counter("multitoken_request_errors", "Refused requests, by HTTP status", ["status"], registry=r)
        self.prompt_tokens = Counter("multitoken_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("multitoken_generation_tokens", "Tokens generated", registry=r)
        self.drafts = Counter("multitoken_spec_decode_num_drafts", "Verification steps with drafts (one per row and step)",
                              registry=r)
        self.draft_tokens = Counter("multitoken_spec_decode_num_draft_tokens", "Drafted tokens verified", registry=r)
        self.accepted = Counter("multitoken_spec_decode_num_accepted_tokens", "Drafted tokens accepted", registry=r)
        self.per_pos = Counter("multitoken_spec_decode_num_accepted_tokens_per_pos", "Accepted drafts by position",
                               ["position"], registry=r)
        self.ttft = Histogram("multitoken_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30))
        self.latency = Histogram("multitoken_e2e_request_latency_seconds", "Request latency", registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.running = Gauge("multitoken_num_requests_running", "Rows decoding", registry=r)
        self.waiting = Gauge("multitoken_num_requests_waiting", "Requests waiting for a row", registry=r)
        for j in range(depth):
            self.per_pos.labels(position=str(j))

    def request_done(self, ticket: Ticket, row, reason: str) -> None:
        """Count a finished request (called on the decoding thread)."""
        self.requests.labels(finish_reason=reason).inc()
        self.prompt_tokens.inc(len(ticket.job.prompt))
        self.generation_tokens.inc(len(row.tokens))
        self.latency.observe(time.perf_counter() - ticket.submitted)
        if row.draft_steps:  # the row's steps with drafts, each with its own draft length
            self.drafts.inc(row.draft_steps)
            self.draft_tokens.inc(row.drafted)
            self.accepted.inc(sum(row.accepted))
            for j, a in enumerate(row.accepted):
                self.per_pos.labels(position=str(j)).inc(a)


class Endpoints:
    """The handlers, over one `DecodeLoop` (decoding happens on its thread, never here)."""

    def __init__(self, model, tokenizer, model_name: str, loop: DecodeLoop, metrics: Metrics) -> None:
        self.tokenizer, self.model_name, self.loop, self.metrics = tokenizer, model_name, loop, metrics
        self.context, self.vocab = model.config.max_seq_len, model.config.vocab_size

    def error(self, e: APIError) -> JSONResponse:
        self.metrics.errors.labels(status=str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status)

    async def completions(self, request: Request):
        return await self.handle("completions", request)

    async def chat(self, request: Request):
        return await self.handle("chat", request)

    async def handle(self, kind: str, request: Request):
        try:
            body = parse_body(await request.body())
            job = check_request(kind, body, self.tokenizer, self.context, self.vocab, self.model_name)
        except APIError as e:
            return self.error(e)
        except Exception as e:  # a bug of ours, not the client's: a 500 with OpenAI's body, and the server goes on
            return self.error(APIError(500, f"{type(e).__name__}: {e}"[:500], kind="server_error"))
        ticket = self.loop.submit(job)
        if job.stream:
            return StreamingResponse(self.stream(ticket), media_type="text/event-stream")
        return await self.whole(ticket, request)

    async def whole(self, ticket: Ticket, request: Request):
        """The whole answer as one object; a client that goes away meanwhile cancels its row."""
        parts = []
        while True:
            try:
                event = await asyncio.wait_for(ticket.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.loop.cancel(ticket)
                    return Response(status_code=499)
                continue
            if event[0] == "text":
                parts.append(event[1])
            elif event[0] == "error":
                kind = "server_error" if event[1] >= 500 else "invalid_request_error"
                return self.error(APIError(event[1], event[2], kind=kind))
            else:
                return JSONResponse(completion(ticket.job, "".join(parts), event[1], event[2]))

    async def stream(self, ticket: Ticket):
        """Server-sent events: a first chunk, text chunks, the finish chunk, usage if asked, [DONE]."""
        job, ended = ticket.job, False
        try:
            yield sse(chunk(job, "", first=True))
            while True:
                event = await ticket.events.get()
                if event[0] == "text":
                    yield sse(chunk(job, event[1]))
                elif event[0] == "error":
                    yield sse(APIError(event[1], event[2], kind="server_error").body())
                    break
                else:
                    yield sse(chunk(job, None if job.kind == "chat" else "", finish=event[1]))
                    if job.include_usage:
                        yield sse(chunk(job, None, use=event[2]))
                    break
            ended = True
            yield sse("[DONE]")
        finally:
            if not ended:  # the client went away (the generator was closed mid-stream)
                self.loop.cancel(ticket)

    async def models(self):
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "multitoken", "max_model_len": self.context}]}

    async def health(self):
        ok = self.loop.thread.is_alive()
        body = {"status": "ok" if ok else "down", "running": self.loop.running, "last_error": self.loop.error}
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics_page(self):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self.metrics.running.set(self.loop.running)
        self.metrics.waiting.set(self.loop.waiting)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def not_found(self, request, exc):
        return self.error(APIError(404, f"no endpoint {request.url.path}: see /v1/completions, /v1/chat/completions, "
                                        "/v1/models, /health, /metrics", code="not_found"))

    async def bad_method(self, request, exc):
        return self.error(APIError(405, f"{request.method} is not allowed on {request.url.path}",
                                   code="method_not_allowed"))


def build_app(model, tokenizer, model_name: str, slots: int = 8, mode: str = "spec", draft: int | None = None,
              sync_every: int | None = None, compile: bool | None = None, graphs: bool | None = None) -> FastAPI:
    """The FastAPI app serving `model` (the decoding thread starts and stops with the app's lifespan).

    Args:
        model, tokenizer: what to serve; model_name: the id /v1/models lists and requests name.
        slots: rows decoded together; mode: "spec" (speculative, exact; the default) or "ntp".
        draft: drafts per step, fixed; None: all heads, and where the engine measures step costs
            (CUDA graphs, timed CPU steps) the generation chooses fewer, 0 included, as `generate` does.
        sync_every, compile, graphs: the engine's.
    Returns:
        the app; ``app.state.loop`` is its `DecodeLoop`, ``app.state.metrics`` its `Metrics`.
    """
    metrics = Metrics(model.depth if mode == "spec" else 0)
    loop = DecodeLoop(model, tokenizer, slots, mode, draft, metrics, sync_every, compile, graphs)
    ep = Endpoints(model, tokenizer, model_name, loop, metrics)

    @asynccontextmanager
    async def lifespan(app):
        loop.start()
        yield
        await asyncio.to_thread(loop.stop)  # uvicorn has let the requests in flight finish

    app = FastAPI(title="multitoken", lifespan=lifespan)
    app.state.loop, app.state.metrics = loop, metrics
    app.add_api_route("/v1/completions", ep.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", ep.chat, methods=["POST"])
    app.add_api_route("/v1/models", ep.models, methods=["GET"])
    app.add_api_route("/health", ep.health, methods=["GET"])
    app.add_api_route("/metrics", ep.metrics_page, methods=["GET"])
    app.add_exception_handler(404, ep.not_found)
    app.add_exception_handler(405, ep.bad_method)
    return app


__all__ = ["Endpoints", "Job", "Metrics", "build_app"]
