"""``multitoken bench decode`` and ``multitoken bench train``: options and runners; the benchmarks
themselves (what they measure, side by side in one process) are the `multitoken.bench` package."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from multitoken.bench import decode, train
from multitoken.checks import MAX_NEW_TOKENS, SAMPLING_RANGES
from multitoken.cli.options import device_arg, floats, ints, option, path_arg
from multitoken.config import MAX_SEQ_LEN, PRESETS, HeadsConfig
from multitoken.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmarks: decoding and training speed, side by side")
    sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    register_decode(sub)
    register_train(sub)


def draft_vocab_size(text: str) -> int | str:
    """``--draft-vocab`` entries: a positive integer or ``full``."""
    return "full" if text == "full" else ints(1, 1 << 24)(text)


def register_decode(sub: argparse._SubParsersAction) -> None:

    def listed(parse):
        def parse_list(text: str) -> list:
            return [parse(x) for x in text.split(",")]
        return parse_list

    p = sub.add_parser("decode", help="decoding speed and exactness, ours and transformers', side by side")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=path_arg, help="run directory")
    src.add_argument("--hf", metavar="DIR", type=path_arg, help="Hugging Face model folder (converted in-process)")
    src.add_argument("--preset", help="a model preset with random weights (engine speed only)")
    p.add_argument("--heads", default="none", help="with --preset: heads KIND:N")
    p.add_argument("--heads-file", type=path_arg, default=None, metavar="FILE",
                   help="with --run: attach these heads (a file written by retrofit.save_heads) to the run's model")
    p.add_argument("--prompts", type=ints(1, 4096), default=None, metavar="N",
                   help="code prompts per batch size, decoded in batches of B (default B)")
    p.add_argument("--chat", type=ints(0, 6), default=0, metavar="N",
                   help="also N chat prompts through the model's chat template, as a set of their own")
    p.add_argument("--max-seq-len", type=ints(2, MAX_SEQ_LEN), default=None, help="context (sizes the static KV cache)")
    p.add_argument("--batch", type=listed(ints(1, 4096)), default=[1, 4, 16, 64], help="batch sizes, comma-separated")
    p.add_argument("--temperature", type=listed(option(SAMPLING_RANGES["temperature"])), default=[0.0, 1.0],
                   help="temperatures, comma-separated (0 = greedy)")
    p.add_argument("--data", default=None, type=path_arg, help="DATA_DIR: cut prompts from its validation split (held-out documents)")
    p.add_argument("--no-eager", dest="eager", action="store_false", help="skip the eager baselines (batch 1)")
    p.add_argument("--new-tokens", type=ints(1, MAX_NEW_TOKENS), default=256)
    p.add_argument("--prompt-tokens", type=ints(1, MAX_SEQ_LEN), default=64)
    p.add_argument("--repeats", type=ints(1, 1000), default=3)
    p.add_argument("--tree-nodes", type=ints(2, 1024), default=16)
    p.add_argument("--no-transformers", dest="transformers", action="store_false", help="skip transformers' generate")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the reference line (a minimal decoder compiled as one model, 2,048-slot static cache)")
    p.add_argument("--draft-vocab", type=listed(draft_vocab_size), default=None, metavar="N,...",
                   help="also the chain drafting over the N most frequent tokens (of --data's training split), e.g. 4096,8192,16384,full")
    p.add_argument("--hf-max-batch", type=ints(0, 4096), default=16, help="largest batch to run transformers' generate at")
    p.add_argument("--device", default="auto", type=device_arg, help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=ints(1, 4096), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--out", default="bench-decode", type=path_arg, help="folder for decode.json and decode.png")
    p.set_defaults(func=run_decode)


def run_decode(args: argparse.Namespace) -> int:
    if args.dtype is None:
        args.dtype = "bfloat16" if str(args.device).startswith("cuda") else "float32"
    if args.preset is not None:
        if args.preset not in PRESETS:
            raise UserError(f"--preset {args.preset!r}: choose one of {', '.join(PRESETS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: name a folder for decode.json and decode.png")
    model, tok, run_dir, desc = decode.load_model(args)
    t0 = time.perf_counter()
    data = dict(command="multitoken " + " ".join(getattr(args, "argv", sys.argv[1:])), model=desc, dtype=args.dtype,
                machine=dict(device=torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
                             torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads(),
                             cpus=os.cpu_count()),
                date=time.strftime("%Y-%m-%d"), new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens,
                repeats=args.repeats)
    data.update(decode.bench(model, tok, run_dir, args))
    data["relative_step_costs"] = decode.relative_step_costs(data["step_costs_s"])
    data["seconds"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    decode.plot(data, out / "decode.png")
    print(decode.table(data))
    print(f"wrote {out / 'decode.json'} and {out / 'decode.png'}")
    return 0


def register_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="training throughput per head family: tokens/s, MFU, FLOP-ideal ratio, memory")
    p.add_argument("--preset", default="base", help="model preset (tiny, small, medium, base, large, ...)")
    p.add_argument("--heads", default="none,parallel:3,sequential:1,medusa:3",
                   help="comma-separated head specs; 'none' is the baseline (added first when missing)")
    p.add_argument("--batch-size", type=ints(1, 4096), default=16)
    p.add_argument("--seq-len", type=ints(2, 1 << 17), default=2048)
    p.add_argument("--vocab", type=ints(16, 1 << 20), default=32768, help="vocabulary size of the random tokens")
    p.add_argument("--steps", type=ints(1, 10_000), default=10, help="timed steps (median)")
    p.add_argument("--warmup", type=ints(0, 10_000), default=3, help="untimed steps first (compilation, autotuning)")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks (parallel.apply_compile)")
    p.add_argument("--compare-naive", action="store_true", help="also measure the naive loss (full logits per depth)")
    p.add_argument("--loss-kernel", default="auto", help="auto, chunked, naive or liger (see `train --loss-kernel`)")
    p.add_argument("--recompute", default="auto", help="the heads' recomputation: auto, on or off")
    p.add_argument("--peak-tflops", type=floats(0, 1e6, lo_open=True), default=989.0,
                   help="dense bf16 peak of the device, for MFU (989 for an H100/H200)")
    p.add_argument("--device", default="auto", type=device_arg)
    p.add_argument("--out", default="bench-train", type=path_arg, help="folder for train.json and train.png")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    if args.preset not in PRESETS:
        raise UserError(f"--preset {args.preset!r}: choose one of {', '.join(PRESETS)}")
    specs = [s.strip() for s in args.heads.split(",") if s.strip()]
    for s in specs:
        HeadsConfig.parse(s)  # one-line error for a bad spec before anything runs
    if "none" not in specs:
        specs.insert(0, "none")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: name a folder for train.json and train.png")
    device = torch.device(args.device)
    results = []
    for spec in specs:
        for kernel in [args.loss_kernel] + (["naive"] if args.compare_naive else []):
            r = train.measure(args.preset, spec, args.batch_size, args.seq_len, args.vocab, args.steps, args.warmup, device,
                        args.compile, loss=kernel, recompute=args.recompute)
            print(f"{spec} ({r['loss']}): {r['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
            results.append(r)
    base = next(r for r in results if r["heads"] == "none" and r["loss"] != "naive")
    train.add_ratios(results, base, args.peak_tflops, device.type == "cuda")
    data = dict(command="multitoken " + " ".join(getattr(args, "argv", sys.argv[1:])), preset=args.preset,
                batch_size=args.batch_size, seq_len=args.seq_len, vocab=args.vocab, compile=args.compile,
                dtype="bf16 autocast" if device.type == "cuda" else "float32", peak_tflops=args.peak_tflops,
                machine=dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                             torch=torch.__version__, python=platform.python_version()),
                date=time.strftime("%Y-%m-%d"), results=results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(data, indent=1) + "\n")
    train.plot(data, out / "train.png")
    print(train.table(data))
    print(f"wrote {out / 'train.json'} and {out / 'train.png'}")
    return 0
