"""Serving benchmark: `multitoken serve` under 1/8/32/64 concurrent streams, speculation on and off.

For each mode (spec, ntp) the script starts `multitoken serve` on a run (plus a heads file) as a
subprocess on 127.0.0.1, waits for /health, then for each concurrency C keeps C streams busy
until `--requests-per-stream` x C greedy requests have finished. Each request streams
``/v1/chat/completions`` (or ``/v1/completions`` with --completions) with usage included.

Reported per (mode, C): output tokens/s over the wall time of the level, TTFT (request sent ->
first text chunk) and TPOT ((latency - TTFT) / (tokens - 1)) as p50/p90/p99, the mean acceptance
length from the usage, failures, and spec/ntp ratios measured in the same run. --transformers
also starts `transformers serve` on the run's backbone (exported with `multitoken export`'s
code; --transformers-cb adds its continuous batching) and reports our ratios against it; an
already running OpenAI-compatible server (vLLM, ...) is measured with --peer URL --peer-model NAME.

    python bench/serve_bench.py --run RUN_DIR [--heads-file F] [--streams 1,8,32,64] [--new-tokens 128]
    python bench/serve_bench.py --quick      # a tiny model built here, on the CPU: an end-to-end smoke test

writes bench/results/serve_<name>.json and .png (with the command and the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
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
    """`multitoken serve` (or, with `cmd`, another server) as a subprocess on a free local port."""

    def __init__(self, args, mode: str, cmd: list[str] | None = None) -> None:
        self.port = free_port()
        if cmd is not None:
            self.cmd = [c.replace("{port}", str(self.port)) for c in cmd]
            self.proc = subprocess.Popen(self.cmd)
            self.url = f"http://127.0.0.1:{self.port}"
            self._wait()
            return
        cmd = [sys.executable, "-m", "multitoken", "serve", "--run", str(args.run), "--port", str(self.port), "--mode", mode,
               "--slots", str(args.slots), "--device", args.device, "--model-name", "bench"]
        if args.heads_file:
            cmd += ["--heads-file", str(args.heads_file)]
        if args.dtype:
            cmd += ["--dtype", args.dtype]
        self.cmd = cmd
        src = Path(__file__).resolve().parents[1] / "src"
        env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        self.proc = subprocess.Popen(cmd, env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait()

    def _wait(self, timeout: float = 600) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"error: the server exited with status {self.proc.returncode}: {shlex.join(self.cmd)}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise SystemExit("error: the server did not come up within 10 minutes")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)


async def one(client, url: str, model: str, prompt: str, n: int, chat: bool) -> dict:
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
    lat = time.perf_counter() - t0
    tokens = (usage or {}).get("completion_tokens", 0)
    return {"ttft_s": ttft if ttft is not None else lat, "latency_s": lat, "tokens": tokens,
            "tau": (usage or {}).get("mean_acceptance_length")}


async def level(url: str, model: str, streams: int, per_stream: int, n: int, chat: bool) -> dict:
    """`streams` concurrent workers, each sending `per_stream` requests one after another."""
    import httpx

    async def worker(w: int, client) -> list[dict]:
        out = []
        for i in range(per_stream):
            try:
                out.append(await one(client, url, model, PROMPTS[(w * per_stream + i) % len(PROMPTS)], n, chat))
            except Exception as e:  # counted, not fatal: the benchmark reports failures
                out.append({"error": f"{type(e).__name__}: {e}"[:200]})
        return out

    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        rows = [r for rs in await asyncio.gather(*(worker(w, client) for w in range(streams))) for r in rs]
        wall = time.perf_counter() - t0
    ok = [r for r in rows if "error" not in r]

    def pct(xs: list[float]) -> dict:
        xs = sorted(xs)
        if not xs:
            return {}
        return {f"p{p}": xs[min(len(xs) - 1, int(p / 100 * len(xs)))] for p in (50, 90, 99)} | {"mean": statistics.mean(xs)}

    tokens = sum(r["tokens"] for r in ok)
    taus = [r["tau"] for r in ok if r.get("tau")]
    return {"streams": streams, "requests": len(rows), "failures": len(rows) - len(ok),
            "errors": sorted({r["error"] for r in rows if "error" in r})[:3], "wall_s": wall, "output_tokens": tokens,
            "tokens_per_s": tokens / wall if wall > 0 else 0.0, "ttft_s": pct([r["ttft_s"] for r in ok]),
            "tpot_s": pct([(r["latency_s"] - r["ttft_s"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]),
            "mean_acceptance_length": statistics.mean(taus) if taus else None}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name in sorted({r["server"] for r in results}):
        rs = sorted((r for r in results if r["server"] == name), key=lambda r: r["streams"])
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="run directory to serve")
    p.add_argument("--heads-file", type=Path, default=None)
    p.add_argument("--streams", default="1,8,32,64", help="concurrency levels, comma-separated")
    p.add_argument("--requests-per-stream", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--slots", type=int, default=64, help="rows the server decodes together")
    p.add_argument("--modes", default="spec,ntp", help="server modes to compare (spec: speculation on)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None)
    p.add_argument("--completions", action="store_true", help="use /v1/completions instead of chat")
    p.add_argument("--transformers", action="store_true",
                   help="also measure `transformers serve` on the run's backbone (exported to a temporary HF folder)")
    p.add_argument("--transformers-cb", action="store_true", help="with --transformers: its --continuous-batching")
    p.add_argument("--peer", default=None, metavar="URL", help="also measure this running OpenAI-compatible server")
    p.add_argument("--peer-model", default=None, help="the model name to send to --peer")
    p.add_argument("--name", default=None, help="results file name part (default: the run folder's name)")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="where the JSON and the plot go")
    p.add_argument("--quick", action="store_true", help="tiny model built here, CPU, streams 1,4, 16 tokens")
    args = p.parse_args(argv)
    tmp = None
    if args.quick:
        tmp = tempfile.TemporaryDirectory(prefix="mt-serve-bench-")
        args.run = tiny_run(Path(tmp.name) / "run")
        args.streams, args.new_tokens, args.requests_per_stream, args.slots = "1,4", 16, 2, 4
        args.device, args.name = "cpu", args.name or "quick"
    if args.run is None:
        p.error("give --run RUN_DIR (or --quick)")
    streams = [int(s) for s in args.streams.split(",")]
    name = args.name or Path(args.run).resolve().name
    results = []
    for mode in args.modes.split(","):
        server = Served(args, mode)
        try:
            asyncio.run(level(server.url, "bench", 1, 1, 8, not args.completions))  # warm-up (compilation, graphs)
            for c in streams:
                r = asyncio.run(level(server.url, "bench", c, args.requests_per_stream, args.new_tokens, not args.completions))
                results.append({"server": f"multitoken {mode}"} | r)
                print(f"{mode:5s} streams={c:3d}: {r['tokens_per_s']:8.1f} tok/s, TTFT p50 {r['ttft_s'].get('p50', 0) * 1e3:7.1f} ms, "
                      f"TPOT p50 {r['tpot_s'].get('p50', 0) * 1e3:6.2f} ms, tau {r['mean_acceptance_length'] or 1:.2f}, "
                      f"failures {r['failures']}", flush=True)
        finally:
            server.close()
    if args.transformers:
        from multitoken.io.hf import export_hf

        hf_dir = Path(tempfile.mkdtemp(prefix="mt-serve-bench-hf-")) / "hf"
        export_hf(args.run, hf_dir)  # the backbone (and any heads in the run, which transformers ignores)
        cmd = ["transformers", "serve", str(hf_dir), "--host", "127.0.0.1", "--port", "{port}", "--device", args.device]
        if args.transformers_cb:
            cmd.append("--continuous-batching")
        server = Served(args, "transformers", cmd)
        try:
            asyncio.run(level(server.url, None, 1, 1, 8, not args.completions))
            for c in streams:
                r = asyncio.run(level(server.url, None, c, args.requests_per_stream, args.new_tokens, not args.completions))
                results.append({"server": "transformers serve"} | r)
                print(f"transformers streams={c:3d}: {r['tokens_per_s']:8.1f} tok/s, failures {r['failures']}", flush=True)
        finally:
            server.close()
    if args.peer:
        for c in streams:
            r = asyncio.run(level(args.peer, args.peer_model or "default", c, args.requests_per_stream, args.new_tokens,
                                  not args.completions))
            results.append({"server": f"peer {args.peer}"} | r)
    for r in results:
        peer = next((b for b in results if b["server"] == "transformers serve" and b["streams"] == r["streams"]), None)
        if r["server"].startswith("multitoken") and peer and peer["tokens_per_s"]:
            r["vs_transformers_serve"] = r["tokens_per_s"] / peer["tokens_per_s"]
        if r["server"] == "multitoken spec":
            base = next((b for b in results if b["server"] == "multitoken ntp" and b["streams"] == r["streams"]), None)
            if base and base["tokens_per_s"]:
                r["vs_ntp"] = r["tokens_per_s"] / base["tokens_per_s"]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"serve_{name}.json"
    import torch

    machine = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
               "cpu_count": os.cpu_count(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    out.write_text(json.dumps({"command": shlex.join([sys.executable, *sys.argv]), "machine": machine,
                               "new_tokens": args.new_tokens, "results": results}, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    failures = sum(r["failures"] for r in results)
    print(f"wrote {out} and {out.with_suffix('.png')}; {failures} failed requests")
    if tmp is not None:
        tmp.cleanup()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
