"""Where a measurement came from: the commit, the machine, its load and the command.

Every JSON under bench/results/ carries this record, so a number quoted in the README names a
file that says which code made it (tests/test_readme_results.py holds the README to it). The
load average matters on a shared machine: speeds are only compared as ratios measured in the
same process, and the load says how much to trust even those.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch


def git_commit(path: str | Path | None = None) -> str | None:
    """The checked-out commit of the repository holding `path` (default: this package), with
    ``+dirty`` when tracked code (src/, bench/ scripts, pyproject.toml) differs from it; outside a
    git checkout (a copy of the tree, as the GPU machine gets) $MULTITOKEN_COMMIT, else None."""
    where = Path(path) if path is not None else Path(__file__).parent
    copied = os.environ.get("MULTITOKEN_COMMIT") or None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return copied
        # Only the code counts: results being written (bench/results/) do not make a run dirty.
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)src", ":(top)bench",
                                 ":(top)pyproject.toml", ":(top,exclude)bench/results"], cwd=where,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return copied
    dirty = status.returncode != 0 or bool(status.stdout.strip())  # unknown counts as dirty
    return head.stdout.strip() + ("+dirty" if dirty else "")


def cpu_info() -> dict:
    """The CPU's model name, the flags that decide its kernels (AVX2, AVX-512, bf16) and the
    instruction set torch's own CPU kernels were picked for."""
    name, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)()
    return {"cpu": name, "avx2": "avx2" in flags, "avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "torch_cpu_capability": capability}


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS does not say)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine() -> dict:
    """The machine a measurement ran on: CPU, cores, torch threads, versions, GPU if any."""
    return {**cpu_info(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def provenance(command: list[str] | str | None = None) -> dict:
    """The record every result JSON opens with.

    Args:
        command: the command that made the result (default: this process's command line).
    Returns:
        {"command", "commit", "date", "machine", "load_before"}; add ``load_after`` at the end.
    """
    if command is None:
        prog = sys.argv[0]
        if prog.endswith(("multitoken", "__main__.py")):  # the console script, or python -m multitoken
            prog = "multitoken"
        command = [prog, *sys.argv[1:]]
    cmd = command if isinstance(command, str) else shlex.join(command)
    return {"command": cmd, "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": machine(), "load_before": load_average()}
