"""OpenAI's request and response shapes: parse and check a request, build completion objects and chunks.

Every problem with a request is an `APIError` carrying the HTTP status and OpenAI's error body
(``{"error": {"message", "type", "param", "code"}}``), so a bad request gets a 4xx and never
reaches the decoding loop. Fields we do not implement are refused unless they hold their
neutral value (``n=1``, ``logprobs`` off, zero penalties), as OpenAI refuses unknown fields.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from multitoken.decoding.sampling import Sampling
from multitoken.errors import UserError

MAX_STOP = 4
"""OpenAI's limit on stop strings."""
COMMON = {"model", "temperature", "top_p", "top_k", "seed", "max_tokens", "stop", "stream", "stream_options", "user",
          "n", "logprobs", "presence_penalty", "frequency_penalty", "logit_bias"}
NEUTRAL = {"n": (1, None), "logprobs": (None, False, 0), "presence_penalty": (0, 0.0, None),
           "frequency_penalty": (0, 0.0, None), "logit_bias": (None, {}), "echo": (False, None), "best_of": (1, None),
           "suffix": (None, ""), "top_logprobs": (None, 0), "parallel_tool_calls": (None,), "tools": (None, []),
           "tool_choice": (None, "none"), "response_format": (None, {"type": "text"})}
"""Fields accepted only at these values (what a client sends when the feature is off)."""
FIELDS = {"completions": COMMON | {"prompt", "echo", "best_of", "suffix"},
          "chat": COMMON | {"messages", "max_completion_tokens", "top_logprobs", "parallel_tool_calls", "tools",
                            "tool_choice", "response_format"}}


class APIError(Exception):
    """A request error: HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One checked request: the prompt ids and how to decode and report it."""

    kind: str
    """"completions" or "chat"."""
    prompt: list[int]
    sampling: Sampling
    seed: int | None
    max_tokens: int
    stop: list[str]
    stream: bool
    include_usage: bool
    model: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    v = body.get(name)
    if v is None:
        return default
    ok = (isinstance(v, int) if integer else isinstance(v, (int, float))) and not isinstance(v, bool)
    if not ok or not lo <= v <= hi:
        what = "an integer" if integer else "a number"
        raise APIError(400, f"'{name}' must be {what} from {lo} to {hi}, got {json.dumps(v)}", param=name)
    return v


def check_request(kind: str, body: dict, tokenizer, context: int, vocab: int, model_name: str) -> Job:
    """The `Job` for a /v1/completions ("completions") or /v1/chat/completions ("chat") body.

    Raises:
        APIError: 400 for a bad or unsupported field, 404 for an unknown model.
    """
    unknown = sorted(set(body) - FIELDS[kind])
    if unknown:
        raise APIError(400, f"Unrecognized request argument supplied: {', '.join(unknown)}", param=unknown[0])
    for name, ok in NEUTRAL.items():
        if name in body and body[name] not in ok:
            raise APIError(400, f"'{name}'={json.dumps(body[name])} is not supported by this server", param=name,
                           code="unsupported_parameter")
    model = body.get("model", model_name)
    if model != model_name:
        raise APIError(404, f"The model '{model}' does not exist (this server has '{model_name}')", param="model",
                       code="model_not_found")
    prompt = _prompt(kind, body, tokenizer, vocab)
    if len(prompt) >= context:
        raise APIError(400, f"This model's maximum context length is {context} tokens; the prompt has {len(prompt)}: "
                       "shorten it", param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")
    room = context - len(prompt)
    mt_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, mt_name, room, 1, 1 << 20, integer=True)
    if max_tokens > room:
        raise APIError(400, f"'{mt_name}' is {max_tokens} but only {room} tokens fit after the prompt of {len(prompt)} "
                       f"(context {context}): ask for fewer", param=mt_name, code="context_length_exceeded")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    top_k = _number(body, "top_k", 0, -1, vocab, integer=True)
    seed = _number(body, "seed", None, 0, 2**63 - 1, integer=True)
    try:
        sampling = Sampling(float(temperature), max(int(top_k), 0), float(top_p))
    except UserError as e:
        raise APIError(400, str(e)) from None
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and len(stop) <= MAX_STOP and all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", param="stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or set(opts) - {"include_usage"} or not isinstance(opts.get("include_usage", False), bool):
        raise APIError(400, "'stream_options' may only hold include_usage (true or false)", param="stream_options")
    if opts and not stream:
        raise APIError(400, "'stream_options' needs 'stream': true", param="stream_options")
    return Job(kind, prompt, sampling, seed, max_tokens, stop, stream, bool(opts.get("include_usage")), model_name)


def _prompt(kind: str, body: dict, tokenizer, vocab: int) -> list[int]:
    if kind == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
        clean = []
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise APIError(400, "each message needs a 'role' string and a 'content'", param="messages")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                    raise APIError(400, "only text content parts are supported", param="messages")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise APIError(400, "each message's 'content' must be a string or a list of text parts", param="messages")
            clean.append({"role": m["role"], "content": content})
        try:
            ids = tokenizer.chat(clean)
        except UserError as e:
            raise APIError(400, str(e), param="messages") from None
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]  # a batch of one
        if isinstance(p, str):
            ids = tokenizer.encode(p)
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if not all(0 <= t < vocab for t in p):
                raise APIError(400, f"prompt token ids must be from 0 to {vocab - 1}", param="prompt")
            ids = p
        else:
            raise APIError(400, "'prompt' must be a string or a list of token ids (one prompt per request)", param="prompt")
    if not ids:
        raise APIError(400, "the prompt is empty: give at least one token", param="prompt")
    return list(ids)


# ---- responses ------------------------------------------------------------------------------------
def usage(job: Job, completion_tokens: int, tau: float, acceptance: list[float], steps: int) -> dict:
    """OpenAI's usage, plus the speculative decoding statistics of this request (as vLLM reports them)."""
    return {"prompt_tokens": len(job.prompt), "completion_tokens": completion_tokens,
            "total_tokens": len(job.prompt) + completion_tokens, "mean_acceptance_length": tau,
            "acceptance_per_position": acceptance, "decode_steps": steps}


def completion(job: Job, text: str, finish: str, use: dict) -> dict:
    """The whole (non-streamed) response object."""
    head = {"id": ("chatcmpl-" if job.kind == "chat" else "cmpl-") + job.id, "created": job.created, "model": job.model}
    if job.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
        return head | {"object": "chat.completion", "choices": [choice], "usage": use}
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return head | {"object": "text_completion", "choices": [choice], "usage": use}


def chunk(job: Job, text: str | None, finish: str | None = None, use: dict | None = None, first: bool = False) -> dict:
    """One streamed chunk: a text piece, the final finish reason, or (text None, no finish) the usage chunk."""
    head = {"id": ("chatcmpl-" if job.kind == "chat" else "cmpl-") + job.id, "created": job.created, "model": job.model}
    if job.kind == "chat":
        head["object"] = "chat.completion.chunk"
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        choices = [] if (text is None and finish is None) else [{"index": 0, "delta": delta, "logprobs": None,
                                                                 "finish_reason": finish}]
    else:
        head["object"] = "text_completion"
        choices = [] if (text is None and finish is None) else [{"index": 0, "text": text or "", "logprobs": None,
                                                                 "finish_reason": finish}]
    out = head | {"choices": choices}
    if job.include_usage:
        out["usage"] = use
    return out


def sse(obj: dict | str) -> bytes:
    """One server-sent event line pair."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()
