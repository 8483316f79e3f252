"""Serving benchmark: `multitoken serve` under 1/8/32/64 concurrent streams, speculation on and off.

Every server runs as a subprocess on 127.0.0.1: `multitoken serve` once per mode (spec, ntp) and,
with --transformers, `transformers serve` on the run's backbone (exported with `multitoken
export`'s code; --transformers-cb turns on its continuous batching, and if that does not come up
the plain one is tried). They start together and are measured in turn, level by level (1 stream
on each server, then 8, ...), so that a run cut short still holds complete comparisons for the
levels it reached. At a level each of C workers sends greedy streamed requests one after another
(``/v1/chat/completions``, or ``/v1/completions`` with --completions, usage included) until
--requests-per-stream each have finished.

Reported per (server, C): output tokens/s (completed requests' tokens over the time to the last
completion), TTFT (request sent -> first text chunk) and TPOT ((latency - TTFT) / (tokens - 1)) as
p50/p90/p99, the mean acceptance length from the usage, failures, and spec/ntp and
vs-transformers-serve ratios measured in the same run. An already running OpenAI-compatible
server (vLLM, ...) is measured with --peer URL --peer-model NAME.

Bounded in time: --level-timeout-s caps a level (no new request after 70% of it; requests still
running at the cap are cut, counted as `cut`, not as failures), --deadline-s the whole run (what
does not fit is listed under `skipped`). The JSON is rewritten after every level, and SIGTERM or
SIGINT (a device call's time limit) stops the servers and writes what was measured, with
``"complete": false`` and ``"stopped"`` saying why; a run cut short exits with status 3.

    python bench/serve_bench.py --run RUN_DIR [--heads-file F] [--streams 1,8,32,64] [--new-tokens 128]
    python bench/serve_bench.py --quick [--transformers]   # a tiny model built here, on the CPU: a smoke test

writes bench/results/serve_<name>.json and .png (with the command and the machine).

On the GPU machine (Python 3.12; torch, transformers 5.x and prometheus-client installed; no
FastAPI, uvicorn, starlette or openai), these wheels, the versions this repository's tests ran with,
make both servers and the client work; all are py3-none-any but pydantic-core and jiter (cp312,
manylinux2014_x86_64). 6.7 MB in all:

    fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 h11==0.16.0 click==8.5.1
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    annotated-doc==0.0.7 opentelemetry-api==1.45.3 typing-extensions==4.16.0
    anyio==4.16.0 sniffio==1.3.1 idna==3.21 certifi==2026.10.19.post1
    httpx==0.29.0 httpcore==1.0.9                      (the benchmark's client)
    openai==3.63.0 jiter==0.19.0 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5   (transformers serve)

Fetch them where the registry is reachable, carry the folder, install offline:

    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl/serve <the list above>
    pip install --no-index --no-deps --target /tmp/site .whl/serve/*.whl    # then PYTHONPATH=/tmp/site
    (bench/gpu_serve.sh does the rest: SmolLM2 converted from its GGUF, the shipped heads, one call)

matplotlib draws the plot when installed; without it the JSON is written alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SRC = Path(__file__).resolve().parents[1] / "src"
PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain what a Python generator is, with a short example.",
    "How do I read a CSV file and print the sum of its second column in Python?",
    "Give three tips for writing clear commit messages.",
    "Write a function that merges two sorted lists into one sorted list.",
    "What is the difference between a list and a tuple?",
    "Write a class for a stack with push, pop and peek.",
    "How do I reverse a dictionary in Python?",
]
NEEDED = {"httpx": "httpx", "fastapi": "fastapi", "uvicorn": "uvicorn", "prometheus_client": "prometheus-client"}
RESERVE_S = 20.0  # kept back from --deadline-s for stopping the servers and writing the results
NEW_AFTER = 0.7  # share of a level's time cap after which no new request starts


class Stop(BaseException):
    """SIGTERM or SIGINT: stop measuring, write what there is."""


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def tiny_run(folder: Path) -> Path:
    """A tiny byte-level model with Medusa heads and a chat template, saved as a run (the --quick smoke test)."""
    import torch

    from multitoken.config import HeadsConfig, ModelConfig
    from multitoken.data.tokenizer import Tokenizer
    from multitoken.io.checkpoint import save_run
    from multitoken.model.transformer import Transformer

    tok = Tokenizer.bytes()
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128,
                      max_seq_len=256, eos_id=tok.eos_id, heads=HeadsConfig("medusa", 3))
    save_run(folder, Transformer(cfg).eval(), tok)
    return folder


class Served:
    """A server subprocess on a free local port; its output goes to a log file (shown when it fails)."""

    def __init__(self, name: str, cmd: list[str], model: str | None, logs: Path, env: dict | None = None,
                 label: str | None = None, slots: int | None = None) -> None:
        self.name, self.model, self.port = name, model, free_port()
        self.label, self.slots = label or name, slots
        self.cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = logs / f"{name.replace(' ', '_')}.log"
        self.t0 = time.perf_counter()
        self.ready_s: float | None = None
        self.error: str | None = None
        self.note: str | None = None
        with open(self.log, "wb") as f:  # same process group: a signal to the group reaches the servers too
            self.proc = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT, env=env)

    def wait(self, until: float) -> str:
        """Poll /health until it answers 200 ("ready"), the process exits ("exited", `error` set) or
        `until` passes ("waiting": still starting, maybe)."""
        import httpx

        while True:
            if self.proc.poll() is not None:
                self.error = f"exited with status {self.proc.returncode}: {self.tail()}"
                return "exited"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    self.ready_s = time.perf_counter() - self.t0
                    return "ready"
            except httpx.TransportError:
                pass
            if time.perf_counter() >= until:
                return "waiting"
            time.sleep(0.5)

    def give_up(self, why: str) -> None:
        self.error = f"{why} ({time.perf_counter() - self.t0:.0f} s after start): {self.tail()}"

    def tail(self, n: int = 6) -> str:
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-n:])[-1500:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def record(self) -> dict:
        return {"cmd": shlex.join(self.cmd), "slots": self.slots, "ready_s": self.ready_s, "error": self.error,
                "note": self.note}


class Peer:
    """An OpenAI-compatible server someone else runs (--peer): measured, never started or stopped."""

    def __init__(self, url: str, model: str | None) -> None:
        self.name, self.url, self.model, self.proc = f"peer {url}", url.rstrip("/"), model, None
        self.label, self.slots, self.ready_s, self.error = self.name, None, 0.0, None


async def one(client, url: str, model: str | None, prompt: str, n: int, chat: bool) -> dict:
    """One streamed greedy request: TTFT, latency, tokens and acceptance from its usage."""
    if chat:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}
    else:
        path, body = "/v1/completions", {"prompt": prompt}
    if model is not None:  # None: the server's only model (transformers serve with a preloaded model)
        body["model"] = model
    body |= {"max_tokens": n, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, usage = None, None
    async with client.stream("POST", url + path, json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ch = json.loads(line[6:])
            if ch.get("usage"):
                usage = ch["usage"]
            for c in ch.get("choices", []):
                piece = c.get("delta", {}).get("content") if chat else c.get("text")
                if piece and ttft is None:
                    ttft = time.perf_counter() - t0
    end = time.perf_counter()
    tokens = (usage or {}).get("completion_tokens", 0)
    return {"ttft_s": ttft if ttft is not None else end - t0, "latency_s": end - t0, "tokens": tokens,
            "tau": (usage or {}).get("mean_acceptance_length"), "end": end}


def pct(xs: list[float]) -> dict:
    xs = sorted(xs)
    if not xs:
        return {}
    return {f"p{p}": xs[min(len(xs) - 1, int(p / 100 * len(xs)))] for p in (50, 90, 99)} | {"mean": statistics.mean(xs)}


async def level(url: str, model: str | None, streams: int, per_stream: int, n: int, chat: bool, cap_s: float) -> dict:
    """`streams` concurrent workers, each sending up to `per_stream` requests one after another, for
    at most `cap_s` seconds (no new request after NEW_AFTER of it; those running at the cap are cut)."""
    import httpx

    rows: list[dict] = []
    cut = [0]
    t0 = time.perf_counter()
    last_start = t0 + NEW_AFTER * cap_s

    async def worker(w: int, client) -> None:
        for i in range(per_stream):
            if time.perf_counter() > last_start:
                return
            try:
                rows.append(await one(client, url, model, PROMPTS[(w * per_stream + i) % len(PROMPTS)], n, chat))
            except asyncio.CancelledError:  # still running at the cap
                cut[0] += 1
                raise
            except Exception as e:  # counted, not fatal: the benchmark reports failures
                rows.append({"error": f"{type(e).__name__}: {e}"[:200]})

    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    async with httpx.AsyncClient(timeout=max(cap_s, 10), limits=limits) as client:
        try:
            await asyncio.wait_for(asyncio.gather(*(worker(w, client) for w in range(streams))), timeout=cap_s)
        except asyncio.TimeoutError:
            pass
    ok = [r for r in rows if "error" not in r]
    wall = (max(r["end"] for r in ok) - t0) if ok else time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in ok)
    taus = [r["tau"] for r in ok if r.get("tau")]
    return {"streams": streams, "requests": len(rows), "failures": len(rows) - len(ok), "cut": cut[0],
            "errors": sorted({r["error"] for r in rows if "error" in r})[:3], "wall_s": wall, "output_tokens": tokens,
            "tokens_per_s": tokens / wall if ok and wall > 0 else 0.0, "ttft_s": pct([r["ttft_s"] for r in ok]),
            "tpot_s": pct([(r["latency_s"] - r["ttft_s"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]),
            "mean_acceptance_length": statistics.mean(taus) if taus else None}


def plot(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot, the JSON has every number", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name in sorted({r["server"] for r in results}):
        rs = sorted((r for r in results if r["server"] == name and r["output_tokens"]), key=lambda r: r["streams"])
        x = [r["streams"] for r in rs]
        axes[0].plot(x, [r["tokens_per_s"] for r in rs], marker="o", label=name)
        axes[1].plot(x, [r["ttft_s"].get("p50", 0) * 1000 for r in rs], marker="o", label=name)
        axes[2].plot(x, [r["tpot_s"].get("p50", 0) * 1000 for r in rs], marker="o", label=name)
    for ax, title in zip(axes, ["output tokens/s", "TTFT p50 (ms)", "TPOT p50 (ms)"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def ratios(results: list[dict]) -> None:
    """spec/ntp and ours/transformers-serve at each level, from rows of the same run."""
    by = {(r["server"], r["streams"]): r for r in results}
    for r in results:
        peer = by.get(("transformers serve", r["streams"]))
        if r["server"].startswith("multitoken") and peer and peer["tokens_per_s"]:
            r["vs_transformers_serve"] = r["tokens_per_s"] / peer["tokens_per_s"]
        base = by.get(("multitoken ntp", r["streams"]))
        if r["server"] == "multitoken spec" and base and base["tokens_per_s"]:
            r["vs_ntp"] = r["tokens_per_s"] / base["tokens_per_s"]


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)  # a run killed mid-write keeps the previous complete file


def machine() -> dict:
    m = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        import torch

        m |= {"torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    except ImportError:
        pass
    return m


def missing_packages() -> list[str]:
    import importlib.util

    return [pip for mod, pip in NEEDED.items() if importlib.util.find_spec(mod) is None]


def server_commands(args, hf_dir: Path | None) -> list[tuple[str, str, int | None, list[str], str | None]]:
    """(name, label in the results, slots, command, model name to send) for each server to start:
    `multitoken serve` per mode and --slots value, then transformers serve."""
    out = []
    for mode in args.modes.split(","):
        for slots in args.slot_list:
            cmd = [sys.executable, "-m", "multitoken", "serve", "--run", str(args.run), "--port", "{port}", "--mode", mode,
                   "--slots", str(slots), "--device", args.device, "--model-name", "bench"]
            if args.heads_file:
                cmd += ["--heads-file", str(args.heads_file)]
            if args.dtype:
                cmd += ["--dtype", args.dtype]
            if args.draft and mode == "spec":
                cmd += ["--draft", str(args.draft)]
            if args.max_seq_len:
                cmd += ["--max-seq-len", str(args.max_seq_len)]
            label = f"multitoken {mode}"
            out.append((label if len(args.slot_list) == 1 else f"{label} ({slots} slots)", label, slots, cmd, "bench"))
    if hf_dir is not None:
        cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(hf_dir), "--host", "127.0.0.1",
               "--port", "{port}", "--device", args.device] + (["--dtype", args.dtype] if args.dtype else [])
        out.append(("transformers serve", "transformers serve", None, cmd + (["--continuous-batching"] if args.transformers_cb else []),
                    None))
    return out


def for_level(servers: list, streams: int) -> list:
    """The servers measured at a level: per label, the one with the fewest slots that hold every stream
    (else the most slots), in the order started."""
    def rank(s) -> tuple:  # holds the level first, then the fewest slots; else the most
        return (s.slots < streams, s.slots if s.slots >= streams else -s.slots)

    chosen = {}
    for s in servers:
        cur = chosen.get(s.label)
        chosen[s.label] = s if cur is None or s.slots is None else min(cur, s, key=rank)
    return [s for s in servers if chosen.get(s.label) is s]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="run directory to serve")
    p.add_argument("--heads-file", type=Path, default=None)
    p.add_argument("--streams", default="1,8,32,64", help="concurrency levels, comma-separated")
    p.add_argument("--requests-per-stream", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--slots", default="64", help="rows each server decodes together; a list (1,64) starts one server per "
                   "value and mode, and each level uses the smallest that holds its streams (a step runs every slot)")
    p.add_argument("--modes", default="spec,ntp", help="server modes to compare (spec: speculation on)")
    p.add_argument("--draft", type=int, default=None, help="spec: a fixed draft length (default: the server's choice)")
    p.add_argument("--max-seq-len", type=int, default=None, help="the servers' context (sizes their KV caches)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None)
    p.add_argument("--completions", action="store_true", help="use /v1/completions instead of chat")
    p.add_argument("--transformers", action="store_true",
                   help="also measure `transformers serve` on the run's backbone (exported to a temporary HF folder)")
    p.add_argument("--transformers-cb", action="store_true", help="with --transformers: its --continuous-batching")
    p.add_argument("--peer", default=None, metavar="URL", help="also measure this running OpenAI-compatible server")
    p.add_argument("--peer-model", default=None, help="the model name to send to --peer")
    p.add_argument("--level-timeout-s", type=float, default=120.0, help="time cap of one (server, level)")
    p.add_argument("--deadline-s", type=float, default=None, help="time cap of the whole run (partial results after it)")
    p.add_argument("--start-timeout-s", type=float, default=600.0, help="how long a server may take to come up")
    p.add_argument("--name", default=None, help="results file name part (default: the run folder's name)")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="where the JSON and the plot go")
    p.add_argument("--quick", action="store_true", help="tiny model built here, CPU, streams 1,4, 16 tokens")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    deadline = t_start + args.deadline_s if args.deadline_s else float("inf")
    lacking = missing_packages()
    if lacking:
        print(f"error: the benchmark needs {', '.join(lacking)}: pip install {' '.join(lacking)} (offline: the wheels "
              "this file's docstring lists)", file=sys.stderr)
        return 2
    tmp = tempfile.TemporaryDirectory(prefix="mt-serve-bench-")
    work = Path(tmp.name)
    if args.quick:
        args.run = tiny_run(work / "run")
        args.streams, args.new_tokens, args.requests_per_stream, args.slots = "1,4", 16, 2, args.slots if args.slots != "64" else "4"
        args.device, args.name = "cpu", args.name or "quick"
    if args.run is None:
        p.error("give --run RUN_DIR (or --quick)")
    streams = [int(s) for s in args.streams.split(",")]
    args.slot_list = sorted({int(x) for x in str(args.slots).split(",")})
    name = args.name or Path(args.run).resolve().name
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"serve_{name}.json"
    results: list[dict] = []
    skipped: list[dict] = []
    servers: list[Served] = []
    data = {"command": shlex.join([sys.executable, *sys.argv]), "machine": machine(), "new_tokens": args.new_tokens,
            "requests_per_stream": args.requests_per_stream, "slots": args.slot_list, "streams": streams,
            "level_timeout_s": args.level_timeout_s, "deadline_s": args.deadline_s, "complete": False, "stopped": None,
            "servers": {}, "results": results, "skipped": skipped}

    def save() -> None:
        ratios(results)
        data["servers"] = {s.name: s.record() for s in servers}
        data["elapsed_s"] = time.perf_counter() - t_start
        write_json(out, data)

    def on_signal(sig, frame):
        raise Stop(signal.Signals(sig).name)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        hf_dir = None
        if args.transformers:
            from multitoken.io.hf import export_hf

            hf_dir = export_hf(args.run, work / "hf")  # the backbone (heads in the run, if any, are ignored there)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(x for x in (str(SRC), os.environ.get("PYTHONPATH")) if x))
        for sname, label, slots, cmd, model in server_commands(args, hf_dir):  # all start at once: start-ups overlap
            servers.append(Served(sname, cmd, model, work, env, label, slots))

        def warm_up(group: list) -> None:
            """Compilation, CUDA graphs at the lengths measured, the draft-length choice: all at once."""
            async def run():
                cap = min(args.level_timeout_s, max(1.0, deadline - RESERVE_S - time.perf_counter()))
                await asyncio.gather(*(level(x.url, x.model, 2, 1, args.new_tokens, not args.completions, cap) for x in group))
            if group:
                asyncio.run(run())

        def bring_up(i: int, until: float) -> bool:
            """Wait for servers[i] until `until`: True when it is up; a server that exits, or is not up
            within --start-timeout-s, gets its error (transformers serve with --continuous-batching is
            started again without it, once)."""
            s = servers[i]
            if s.ready_s is not None:
                return True
            if s.error:
                return False
            state = s.wait(min(until, s.t0 + args.start_timeout_s))
            if state == "waiting" and time.perf_counter() >= s.t0 + args.start_timeout_s:
                s.give_up("not up within --start-timeout-s")
                state = "exited"
            if state == "exited" and s.name == "transformers serve" and "--continuous-batching" in s.cmd:
                first = s.error
                s.close()
                cmd = next(c for n, _, _, c, _ in server_commands(args, hf_dir) if n == s.name)
                s = servers[i] = Served(s.name, [c for c in cmd if c != "--continuous-batching"], None, work, env)
                s.note = f"--continuous-batching did not come up ({first}); measured without it"
                print(f"transformers serve: {s.note}", file=sys.stderr)
                return bring_up(i, until)
            if state == "exited":
                print(f"error: {s.name} {s.error}", file=sys.stderr)
            return state == "ready"

        # Our servers first, waited for in full (they are what is measured) and warmed up together;
        # transformers serve is waited for level by level after them, so that its start-up never takes
        # their time.
        ours = [i for i, s in enumerate(servers) if s.label.startswith("multitoken")]
        warm_up([servers[i] for i in ours if bring_up(i, deadline - RESERVE_S)])
        peers = [Peer(args.peer, args.peer_model or "default")] if args.peer else []
        save()
        for c in streams:
            for s in for_level(servers, c) + peers:
                left = deadline - RESERVE_S - time.perf_counter()
                if s in servers and s.ready_s is None:
                    i = servers.index(s)
                    if s.error:
                        continue
                    if not bring_up(i, time.perf_counter() + min(args.level_timeout_s, max(0.0, left))):
                        if not servers[i].error:
                            skipped.append({"server": s.label, "streams": c, "why": "not up yet"})
                        continue
                    s = servers[i]
                    warm_up([s])
                    left = deadline - RESERVE_S - time.perf_counter()
                if left < min(args.level_timeout_s, 10.0):
                    skipped.append({"server": s.label, "streams": c, "why": "deadline"})
                    continue
                r = asyncio.run(level(s.url, s.model, c, args.requests_per_stream, args.new_tokens, not args.completions,
                                      min(args.level_timeout_s, left)))
                results.append({"server": s.label, "slots": s.slots} | r)
                print(f"{s.name:28s} streams={c:3d}: {r['tokens_per_s']:8.1f} tok/s, TTFT p50 "
                      f"{r['ttft_s'].get('p50', 0) * 1e3:7.1f} ms, TPOT p50 {r['tpot_s'].get('p50', 0) * 1e3:6.2f} ms, "
                      f"tau {r['mean_acceptance_length'] or 1:.2f}, failures {r['failures']}, cut {r['cut']}", flush=True)
                save()
        data["complete"] = not skipped and all(s.error is None for s in servers)
        if any(x["why"] == "deadline" for x in skipped):
            data["stopped"] = "deadline"
    except Stop as e:
        data["stopped"] = str(e)
        status = 3
        print(f"stopped by {e}: writing what was measured", file=sys.stderr)
    finally:
        save()  # first: stopping the servers may outlast a grace period before SIGKILL
        for s in servers:
            s.close()
        for sig, handler in old.items():
            signal.signal(sig, handler)
        save()
        drawn = plot(results, out.with_suffix(".png")) if results else False
        tmp.cleanup()
    failures = sum(r["failures"] for r in results)
    print(f"wrote {out}{' and ' + str(out.with_suffix('.png')) if drawn else ''}; {len(results)} levels measured, "
          f"{len(skipped)} skipped, {failures} failed requests")
    if status == 0 and not data["complete"] and data["stopped"]:
        status = 3
    return status or (1 if failures or any(s.error for s in servers) else 0)


if __name__ == "__main__":
    sys.exit(main())
