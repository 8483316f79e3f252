"""`multitoken serve` with real parts: uvicorn on 127.0.0.1, the official `openai` client, httpx streams.

The model is tiny and built here (byte tokenizer, parallel heads with random weights, so drafts
are often rejected). References are each request decoded alone through `generate` (greedy, and
seeded sampling: a row's own seed draws the same uniforms in any batch); text references are
`Tokenizer.decode` of those tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import httpx  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402 (module level: FastAPI resolves the annotations here)
from fastapi.responses import StreamingResponse  # noqa: E402

from conftest import tiny_model  # noqa: E402
from multitoken.data.tokenizer import Tokenizer  # noqa: E402
from multitoken.decoding.api import generate  # noqa: E402
from multitoken.decoding.text import StopText  # noqa: E402
from multitoken.io.checkpoint import save_run  # noqa: E402
from multitoken.serve.app import build_app  # noqa: E402

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
CONTEXT = 96
NAME = "tiny"


def make_model():
    tok = Tokenizer.bytes()
    tok.chat_template = TEMPLATE
    model = tiny_model("medusa", 3, seed=0, vocab_size=tok.vocab_size, eos_id=tok.eos_id, max_seq_len=CONTEXT).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model, tok


class Server:
    """uvicorn serving the app in a thread, on a socket bound here to 127.0.0.1 (a free port)."""

    def __init__(self, app) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def served():
    model, tok = make_model()
    app = build_app(model, tok, NAME, slots=8, mode="spec")
    s = Server(app)
    yield s, model, tok, app
    s.close()


def alone(model, tok, prompt_ids, n, temperature=0.0, top_k=0, top_p=1.0, seed=None):
    out = generate(model, [prompt_ids], n, mode="spec", temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                   eos_id=tok.eos_id)[0][0]
    return out


def text_of(tok, ids):
    t = StopText(tok, (), tok.eos_id)
    return t.push(ids) + t.finish()


# ---- the official client --------------------------------------------------------------------------
def test_openai_client_completions_and_chat_streamed_and_not(served):
    openai = pytest.importorskip("openai")
    s, model, tok, _ = served
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == [NAME]
    ref = alone(model, tok, tok.encode("def f"), 20)
    r = client.completions.create(model=NAME, prompt="def f", max_tokens=20, temperature=0)
    assert r.choices[0].text == text_of(tok, ref)
    assert r.usage.completion_tokens == len(ref) and r.usage.prompt_tokens == 5
    extra = r.usage.model_extra
    assert extra["mean_acceptance_length"] >= 1 and len(extra["acceptance_per_position"]) == 3
    pieces = [c.choices[0].text for c in client.completions.create(model=NAME, prompt="def f", max_tokens=20,
                                                                   temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == r.choices[0].text
    msgs = [{"role": "user", "content": "hi"}]
    cref = alone(model, tok, tok.chat(msgs), 16)
    c = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=16, temperature=0)
    assert c.choices[0].message.content == text_of(tok, cref) and c.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=NAME, messages=msgs, max_tokens=16, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == c.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == len(cref) and not chunks[-1].choices
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")


def test_a_reply_ends_at_the_models_eos(served):
    """Prompts whose greedy continuation writes EOS within 40 tokens (found by decoding without
    EOS): the server's reply ends there, finish_reason "stop", with the tokens of plain decoding
    that stops at EOS, and not at max_tokens."""
    import random

    s, model, tok, _ = served
    rng = random.Random(0)
    texts = ["".join(rng.choice("abcdefghij xyz(){}") for _ in range(6)) for _ in range(64)]
    free, _ = generate(model, [tok.encode(t) for t in texts], 40)  # no eos_id: runs on past EOS
    ending = [t for t, o in zip(texts, free) if tok.eos_id in o[:-1]]
    assert ending, "some prompt should reach EOS before 40 tokens"
    for text in ending:
        ref = alone(model, tok, tok.encode(text), 40)
        assert ref[-1] == tok.eos_id and len(ref) < 40
        r = httpx.post(s.url + "/v1/completions", json={"prompt": text, "max_tokens": 40, "temperature": 0},
                       timeout=60).json()
        assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == len(ref)
        assert r["choices"][0]["text"] == text_of(tok, ref)


def test_stop_strings_cut_the_text(served):
    s, model, tok, _ = served
    full = text_of(tok, alone(model, tok, tok.encode("ab"), 30))
    stop = full[7:10]
    want = full[: full.index(stop)]
    r = httpx.post(s.url + "/v1/completions", json={"prompt": "ab", "max_tokens": 30, "temperature": 0, "stop": [stop]},
                   timeout=60).json()
    assert r["choices"][0]["text"] == want and r["choices"][0]["finish_reason"] == "stop"


def test_a_stop_string_ends_decoding_of_its_row(served):
    """The row stops decoding once its stop string shows: usage counts the tokens up to the step that
    showed it (at most depth more than the n tokens after which the stream shows it), not max_tokens."""
    s, model, tok, _ = served
    ref = alone(model, tok, tok.encode("ab"), 60)
    assert tok.eos_id not in ref
    stop = text_of(tok, ref)[7:10]
    shown = StopText(tok, [stop], tok.eos_id)
    n = next(i for i, t in enumerate(ref, 1) if shown.push([t]) is not None and shown.stopped)
    assert n + model.depth < 60
    r = httpx.post(s.url + "/v1/completions", json={"prompt": "ab", "max_tokens": 60, "temperature": 0, "stop": [stop]},
                   timeout=60).json()
    assert r["choices"][0]["finish_reason"] == "stop"
    assert n <= r["usage"]["completion_tokens"] <= n + model.depth, (n, r["usage"])


def test_top_k_minus_one_means_no_top_k(served):
    """vLLM's clients send top_k=-1 for "off": the same text as top_k 0 (seeded sampling, decoded alone)."""
    s, model, tok, _ = served
    ids = tok.encode("def f")
    ref = alone(model, tok, ids, 12, temperature=0.9, top_k=0, seed=5)
    r = httpx.post(s.url + "/v1/completions", json={"prompt": "def f", "max_tokens": 12, "temperature": 0.9, "top_k": -1,
                                                     "seed": 5}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == text_of(tok, ref)


def test_metrics_count_accepted_drafts_under_their_0_based_position():
    """A finished row's accepted drafts per position (by hand: 5, 3, 1) land on labels 0, 1, 2 as vLLM's
    do, and no other label appears."""
    from types import SimpleNamespace

    from multitoken.serve.app import Metrics

    m = Metrics(3)
    ticket = SimpleNamespace(job=SimpleNamespace(prompt=[1, 2, 3]), submitted=time.perf_counter())
    row = SimpleNamespace(tokens=[4] * 12, draft_steps=6, drafted=18, accepted=[5, 3, 1])
    m.request_done(ticket, row, "length")
    name = "multitoken_spec_decode_num_accepted_tokens_per_pos_total"
    got = {s.labels["position"]: s.value for fam in m.registry.collect() for s in fam.samples if s.name == name}
    assert got == {"0": 5.0, "1": 3.0, "2": 1.0}
    assert m.registry.get_sample_value("multitoken_spec_decode_num_accepted_tokens_total") == 9.0
    assert m.registry.get_sample_value("multitoken_spec_decode_num_drafts_total") == 6.0


def test_stop_text_over_multi_token_steps_and_split_utf8():
    """Steps that bring several tokens at once; a stop string across two steps; a 2-byte character split."""
    tok = Tokenizer.bytes()
    b = lambda s: list(s.encode())  # noqa: E731
    t = StopText(tok, ["END"], None)
    assert t.push(b("caf") + [0xC3]) == ""  # the step ends inside a character: all of it waits
    assert t.push([0xA9] + b(" xE")) == "caf\u00e9 "  # "xE" could begin "END": held back
    assert t.push(b("ND more")) == "x" and t.stopped and t.text == "caf\u00e9 x"
    t = StopText(tok, [], None)
    assert t.push([0xC3]) == "" and t.push([0xA9, 0x41]) == "\u00e9A"


def test_stop_text_holds_back_the_start_of_the_longest_stop_string():
    """Streamed byte by byte with stop strings of different lengths, the text sent never runs past
    the cut: the naive answer is the whole text cut before its first stop string."""
    tok = Tokenizer.bytes()
    for text in ("ab ENDING z", "xy! more", "no stop here", "ENDING at the very start", "!"):
        stops = ["!", "ENDING"]
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
        t = StopText(tok, stops, None)
        sent = "".join(t.push([c]) for c in text.encode())
        assert text[:cut].startswith(sent) and sent + t.finish() == text[:cut]


# ---- load ----------------------------------------------------------------------------------------------
def test_32_concurrent_streams_with_mixed_settings(served):
    """32 streams at once on 8 rows (requests queue, rows are reused): zero failures; every greedy stream and
    every seeded sampled stream equals the same request decoded alone."""
    s, model, tok, _ = served
    prompts = ["def f", "import os", "x = [", "class A:", "for i in", "# note", "print(", "while True"]
    reqs = []
    for i in range(32):
        body = {"prompt": prompts[i % 8], "max_tokens": 12 + i % 9, "stream": True}
        if i % 2 == 0:
            body["temperature"] = 0
        else:
            body |= {"temperature": 0.6 + 0.1 * (i % 5), "top_p": [1.0, 0.9, 0.8][i % 3], "top_k": [0, 20][i % 2 == 1 and i % 4 == 1],
                     "seed": 1000 + i}
        reqs.append(body)

    async def one(client, body):
        t0 = time.perf_counter()
        text, finish = "", None
        async with client.stream("POST", s.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    return text, finish, time.perf_counter() - t0
                ch = json.loads(data)
                if ch["choices"]:
                    text += ch["choices"][0]["text"]
                    finish = ch["choices"][0]["finish_reason"] or finish
        raise AssertionError("stream ended without [DONE]")

    async def run_all():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, b) for b in reqs), return_exceptions=True)

    t0 = time.perf_counter()
    results = asyncio.run(run_all())
    wall = time.perf_counter() - t0
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    lat = sorted(r[2] for r in results)
    print(f"\n32 streams in {wall:.2f} s: latency p50 {lat[15]:.3f} s, p99 {lat[-1]:.3f} s")
    for body, (text, finish, _) in zip(reqs, results):
        ids = tok.encode(body["prompt"])
        ref = alone(model, tok, ids, body["max_tokens"], body["temperature"], body.get("top_k", 0), body.get("top_p", 1.0),
                    body.get("seed"))
        assert text == text_of(tok, ref), body
        assert finish == ("stop" if ref[-1] == tok.eos_id else "length")


# ---- bad input -------------------------------------------------------------------------------------------
BAD = [
    ("malformed-json", "/v1/completions", b"{not json", 400, None),
    ("not-an-object", "/v1/completions", b"[1, 2]", 400, None),
    ("unknown-field", "/v1/completions", {"prompt": "a", "frobnicate": 1}, 400, "frobnicate"),
    ("unknown-model", "/v1/completions", {"prompt": "a", "model": "gpt-9"}, 404, "model"),
    ("prompt-too-long", "/v1/completions", {"prompt": "a" * CONTEXT}, 400, "prompt"),
    ("max-tokens-zero", "/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-past-context", "/v1/completions", {"prompt": "a", "max_tokens": CONTEXT}, 400, "max_tokens"),
    ("max-tokens-text", "/v1/completions", {"prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    ("n-2", "/v1/completions", {"prompt": "a", "n": 2}, 400, "n"),
    ("logprobs", "/v1/completions", {"prompt": "a", "logprobs": 2}, 400, "logprobs"),
    ("chat-logprobs", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "logprobs": True}, 400, "logprobs"),
    ("temperature-nan", "/v1/completions", b'{"prompt": "a", "temperature": NaN}', 400, None),
    ("temperature-high", "/v1/completions", {"prompt": "a", "temperature": 9}, 400, "temperature"),
    ("top-p-zero", "/v1/completions", {"prompt": "a", "top_p": 0}, 400, None),
    ("stop-five", "/v1/completions", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("token-out-of-vocab", "/v1/completions", {"prompt": [1, 99999]}, 400, "prompt"),
    ("token-equal-to-vocab", "/v1/completions", {"prompt": [1, Tokenizer.bytes().vocab_size]}, 400, "prompt"),
    ("empty-prompt", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("no-messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("message-not-text", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    ("stream-options-without-stream", "/v1/completions", {"prompt": "a", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("unknown-path", "/v1/engines", {}, 404, None),
]


@pytest.mark.parametrize("name,path,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors_and_the_server_stays_up(served, name, path, body, status, param):
    s = served[0]
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(s.url + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param:
        assert err["param"] == param
    assert httpx.get(s.url + "/health", timeout=30).json()["status"] == "ok"


def test_a_client_leaving_mid_stream_frees_its_row_at_once():
    model, tok = make_model()
    app = build_app(model, tok, NAME, slots=1, mode="spec")
    s = Server(app)
    try:
        with httpx.Client(timeout=60) as c:
            with c.stream("POST", s.url + "/v1/completions", json={"prompt": "a", "max_tokens": 90, "temperature": 0,
                                                                  "stream": True}) as r:
                next(r.iter_lines())
            # The one row is free again: the next request needs it, and the left one counts as cancelled.
            deadline = time.time() + 20
            while app.state.loop.running and time.time() < deadline:
                time.sleep(0.02)
            assert app.state.loop.running == 0
            ok = c.post(s.url + "/v1/completions", json={"prompt": "b", "max_tokens": 4, "temperature": 0}).json()
            assert ok["usage"]["completion_tokens"] >= 1
            metrics = c.get(s.url + "/metrics").text
        assert 'multitoken_requests_total{finish_reason="cancelled"} 1.0' in metrics
        assert "multitoken_spec_decode_num_accepted_tokens_per_pos_total{position=\"0\"}" in metrics
        drafts = float(next(x for x in metrics.splitlines() if x.startswith("multitoken_spec_decode_num_drafts_total")).split()[1])
        assert drafts > 0
    finally:
        s.close()


def test_sigterm_drains_the_requests_in_flight_then_exits(tmp_path):
    model, tok = make_model()
    save_run(tmp_path / "run", model, tok)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "multitoken", "serve", "--run", str(tmp_path / "run"), "--port",
                             str(port), "--device", "cpu", "--slots", "2"], env=env, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, "server did not start"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        lines = []
        with httpx.stream("POST", url + "/v1/completions", timeout=60,
                          json={"prompt": "a", "max_tokens": 90, "temperature": 0, "stream": True}) as r:
            it = r.iter_lines()
            lines.append(next(it))
            proc.send_signal(signal.SIGTERM)
            lines += list(it)
        data = [x for x in lines if x.startswith("data: ")]
        assert data[-1] == "data: [DONE]"
        text = "".join(json.loads(x[6:])["choices"][0]["text"] for x in data[:-1])
        assert text == text_of(tok, alone(model, tok, tok.encode("a"), 90))
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_bench", Path(__file__).parents[1] / "bench" / "serve_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_bench_level_cut_at_its_time_cap_counts_cut_requests_apart():
    """serve_bench.level against a stand-in server that streams the benchmark's first prompt fast and
    the others at 1 s a token: the level returns at its 2 s cap; the one fast request is completed, the
    two slow ones still running are `cut` (not failures, not counted as started-and-lost in the rate);
    tokens/s is the completed tokens over the time to the last completion."""
    bench = bench_module()
    app = FastAPI()

    @app.post("/v1/completions")
    async def complete(request: Request):
        body = await request.json()
        delay = 0.01 if body["prompt"] == bench.PROMPTS[0] else 1.0

        async def events():
            for _ in range(body["max_tokens"]):
                await asyncio.sleep(delay)
                yield "data: " + json.dumps({"choices": [{"text": "x"}]}) + "\n\n"
            yield "data: " + json.dumps({"choices": [], "usage": {"completion_tokens": body["max_tokens"]}}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    s = Server(app)
    try:
        t0 = time.perf_counter()
        r = asyncio.run(bench.level(s.url, None, 2, 3, 4, False, 2.0))  # worker 0: prompts 0, 1, 2; worker 1: 3, 4, 5
        took = time.perf_counter() - t0
    finally:
        s.close()
    assert 2.0 <= took < 4.0, (took, r)
    assert (r["requests"], r["failures"], r["cut"], r["output_tokens"]) == (1, 0, 2, 4), r
    assert r["wall_s"] < 1.0 and r["tokens_per_s"] == 4 / r["wall_s"]


def test_each_bench_level_uses_the_smallest_server_that_holds_its_streams():
    """--slots 1,8,64: a level of C streams goes to the server with the fewest slots >= C (a step runs
    every slot, busy or not), or the largest when none holds C; one per mode; other servers as they are."""
    from types import SimpleNamespace as S

    bench = bench_module()
    servers = [S(label=f"multitoken {m}", slots=n) for m in ("spec", "ntp") for n in (64, 1, 8)]
    servers.append(S(label="transformers serve", slots=None))
    for streams, want in ((1, 1), (2, 8), (8, 8), (9, 64), (64, 64), (100, 64)):
        got = bench.for_level(servers, streams)
        assert [(x.label, x.slots) for x in got] == [("multitoken spec", want), ("multitoken ntp", want),
                                                     ("transformers serve", None)], streams


@pytest.mark.slow
def test_serve_bench_runs_end_to_end_on_the_cpu_and_a_sigterm_leaves_partial_results(tmp_path):
    """bench/serve_bench.py --quick --transformers: a tiny model, three servers (spec, ntp, transformers
    serve); SIGTERM once the second level has begun (as a device call's time limit does): the levels
    measured are in the JSON with zero failed requests, marked incomplete, and the exit status is 3."""
    bench = Path(__file__).parents[1] / "bench" / "serve_bench.py"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    proc = subprocess.Popen([sys.executable, str(bench), "--quick", "--transformers", "--out-dir", str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "streams=  4" in line:
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, "".join(lines) + out + err[-2000:]
    data = json.loads((tmp_path / "serve_quick.json").read_text())
    assert data["complete"] is False and data["stopped"] == "SIGTERM"
    got = {(x["server"], x["streams"]) for x in data["results"]}
    assert {("multitoken spec", 1), ("multitoken ntp", 1), ("transformers serve", 1), ("multitoken spec", 4)} <= got
    assert all(x["failures"] == 0 and x["output_tokens"] > 0 for x in data["results"])
    assert all(v["error"] is None for v in data["servers"].values())
    assert data["results"][0]["vs_ntp"] > 0 and data["results"][0]["vs_transformers_serve"] > 0


def test_a_failing_decoding_step_fails_its_requests_and_the_server_goes_on():
    model, tok = make_model()
    app = build_app(model, tok, NAME, slots=2, mode="spec")
    s = Server(app)
    loop = app.state.loop
    real = type(loop.gen).step
    calls = {"n": 0}

    def broken(gen):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("planted failure")
        return real(gen)

    try:
        type(loop.gen).step = broken
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "a", "max_tokens": 5, "temperature": 0}, timeout=60)
        assert r.status_code == 500 and "planted failure" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "server_error"  # OpenAI's type for a 500: ours, not the client's
        ok = httpx.post(s.url + "/v1/completions", json={"prompt": "a", "max_tokens": 5, "temperature": 0}, timeout=60)
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == text_of(tok, alone(model, tok, [97], 5))
        assert "planted failure" in httpx.get(s.url + "/health", timeout=30).json()["last_error"]
    finally:
        type(loop.gen).step = real
        s.close()


def test_the_server_chooses_the_draft_length_and_drafts_again_after_plain_steps(monkeypatch):
    """Without --draft the server lets the generation choose the draft length where step costs are
    measured (timed CPU steps here, with costs that make drafting never pay): the first request goes
    plain midway, the next one, arriving when no row decodes, drafts again; the metrics count the
    steps that had drafts (not every step) and both texts equal plain greedy decoding."""
    from multitoken.decoding import runner

    monkeypatch.setattr(runner, "CPU_COSTS", True)
    model, tok = make_model()
    app = build_app(model, tok, NAME, slots=2, mode="spec")
    loop = app.state.loop
    assert loop.gen.auto
    monkeypatch.setattr(loop.engine.runner, "cost", lambda strategy, need: 1.0 if strategy.k == 0 else 50.0)
    s = Server(app)

    def drafts(c):
        line = next(x for x in c.get(s.url + "/metrics").text.splitlines() if x.startswith("multitoken_spec_decode_num_drafts_total"))
        return float(line.split()[1])

    try:
        with httpx.Client(timeout=60) as c:
            seen = [0.0]
            for prompt in ("def f", "import os"):
                r = c.post(s.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 60, "temperature": 0}).json()
                assert r["choices"][0]["text"] == text_of(tok, generate(model, [tok.encode(prompt)], 60, eos_id=tok.eos_id)[0][0])
                seen.append(drafts(c))
                assert 8 <= seen[-1] - seen[-2] < r["usage"]["decode_steps"], (seen, r["usage"])
        assert loop.gen.chosen == [3, 0, 3, 0], loop.gen.chosen
    finally:
        s.close()
