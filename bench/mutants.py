"""Plant a round of bugs one at a time, run the tests against each, and record which test caught it.

A round is a JSON list (``tests/mutants/round3.json``) of small source edits::

    {"id": "loss-ahead-off-by-one", "file": "src/multitoken/training/loss.py",
     "old": "<exact text, found once>", "new": "<its replacement>", "why": "...", "area": "loss",
     "area_tests": ["tests/test_loss.py"],            # the test files of its area (run first; their slow tests run for a survivor)
     "new_tests": ["tests/test_x.py::test_y"]}        # optional: tests written later to catch it

For each mutant the file is edited in place, then:

1. the fast suite runs, stopping at the first failure (``pytest -x -q -m "not slow"``), the test
   files of the mutant's area (its ``area_tests``) first, so that a caught mutant costs little;
2. when it passes (the mutant survived) and ``--slow`` is given, the slow tests of the mutant's
   ``area_tests`` files run too;
3. with ``--after``, the mutant's ``new_tests`` run against it (they must fail) and against the
   clean tree (they must pass): the record's ``caught_after``.

The file is restored after every mutant, also on Ctrl-C or an error (the runner refuses to start
when a mutated file differs from git's copy, so it never restores over someone's edits).
Results go to ``--out`` as JSON after every mutant, so an interrupted round resumes with
``--resume``. A run that passes its time limit counts as caught (a hang is noticed), and says so.

Usage::

    PYTHONPATH=src python bench/mutants.py tests/mutants/round3.json --out bench/results/mutants_round3.json --slow
    PYTHONPATH=src python bench/mutants.py tests/mutants/round3.json --out ... --only ID --after
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAST = ["-x", "-q", "-m", "not slow", "-p", "no:cacheprovider"]
SLOW = ["-x", "-q", "-m", "slow", "-p", "no:cacheprovider"]
_FAILED = re.compile(r"^(FAILED|ERROR) (.+?)(?: - .*)?$", re.M)  # node ids may hold spaces: "test[step -3]"


def run_pytest(args: list[str], timeout: float) -> dict:
    """Run pytest in the repository with the worktree's sources first on the path."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"rc": None, "timeout": True, "seconds": round(time.perf_counter() - t0, 1), "failed": [], "tail": ""}
    out = p.stdout + p.stderr
    first_error = next((line[2:].strip() for line in out.splitlines() if line.startswith("E ")), "")
    return {"rc": p.returncode, "timeout": False, "seconds": round(time.perf_counter() - t0, 1),
            "failed": [m[2] for m in _FAILED.finditer(out)], "error": first_error[:200],
            "tail": "\n".join(out.strip().splitlines()[-3:])}


def ordered_tests(first: list[str]) -> list[str]:
    """Every test file, the mutant's own area first: the same suite, but a mutant that its area's
    tests catch stops there (``-x``) instead of after the whole suite."""
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("*.py")
                   if p.name.startswith("test_") or p.name.endswith("_test.py"))
    return [f for f in first if f in files] + [f for f in files if f not in first]


def verdict(r: dict) -> str:
    """caught / survived / no-tests / error (pytest exit 2-4: interrupted, internal or usage error)."""
    if r["timeout"]:
        return "caught"
    return {0: "survived", 1: "caught", 5: "no-tests"}.get(r["rc"], "error")


def git_clean(path: Path) -> bool:
    return subprocess.run(["git", "diff", "--quiet", "--", str(path)], cwd=ROOT).returncode == 0


class Planted:
    """Context manager: the mutant's file edited while inside, restored on the way out."""

    def __init__(self, m: dict) -> None:
        self.path = ROOT / m["file"]
        self.m = m

    def __enter__(self) -> "Planted":
        self.original = self.path.read_text()
        n = self.original.count(self.m["old"])
        if n != 1:
            raise SystemExit(f"{self.m['id']}: the text to replace occurs {n} times in {self.m['file']} (needs 1)")
        mutated = self.original.replace(self.m["old"], self.m["new"])
        try:
            compile(mutated, str(self.path), "exec")
        except SyntaxError as e:
            raise SystemExit(f"{self.m['id']}: the mutated file does not compile ({e})") from None
        self.path.write_text(mutated)
        return self

    def __exit__(self, *exc) -> None:
        self.path.write_text(self.original)


def one(m: dict, slow: bool, timeout: float) -> dict:
    """The fast suite (and, for a survivor, its area's slow tests) against one mutant."""
    rec = {k: m[k] for k in ("id", "file", "why", "area")}
    rec["line"] = 1 + (ROOT / m["file"]).read_text().split(m["old"])[0].count("\n")
    with Planted(m):
        fast = run_pytest([*FAST, *ordered_tests(m.get("area_tests", []))], timeout)
        rec["fast"] = verdict(fast)
        rec["fast_caught_by"] = fast["failed"][:1]
        if rec["fast"] == "caught" and fast["failed"]:
            rec["fast_error"] = fast["error"]
            # A catch must not depend on the tests before it: the catching test alone fails too.
            alone = run_pytest(["-q", "-p", "no:cacheprovider", fast["failed"][0]], timeout)
            rec["confirmed_alone"] = verdict(alone) == "caught"
        rec["fast_seconds"] = fast["seconds"]
        if fast["timeout"]:
            rec["fast_timeout"] = True
        if rec["fast"] == "error":
            rec["fast_tail"] = fast["tail"]
        if slow and rec["fast"] == "survived" and m.get("area_tests"):
            s = run_pytest([*SLOW, *m["area_tests"]], timeout)
            rec["slow"] = verdict(s)
            rec["slow_caught_by"] = s["failed"][:1]
            rec["slow_seconds"] = s["seconds"]
    rec["caught_fast_or_slow"] = rec["fast"] == "caught" or rec.get("slow") == "caught"
    return rec


def after(m: dict, timeout: float) -> dict:
    """The mutant's new tests: they must pass on the clean tree and fail on the mutant."""
    tests = m.get("new_tests") or []
    if not tests:
        return {}
    clean = run_pytest(["-q", "-p", "no:cacheprovider", *tests], timeout)
    with Planted(m):
        planted = run_pytest(["-q", "-p", "no:cacheprovider", *tests], timeout)
    return {"new_tests": tests, "new_tests_clean": verdict(clean), "new_tests_on_mutant": planted["failed"] or verdict(planted),
            "caught_after": verdict(planted) == "caught" and verdict(clean) == "survived"}


def confirm(m: dict, rec: dict, timeout: float) -> dict:
    """Run the test that caught the mutant alone against it: a catch that needs the tests before it
    (state one test leaves for the next) is not one."""
    with Planted(m):
        node = rec["fast_caught_by"][0]
        if "[" in node and not node.endswith("]"):  # cut at a space by an older runner: run every parameter
            node = node.split("[")[0]
        alone = run_pytest(["-q", "-p", "no:cacheprovider", node], timeout)
    return {"confirmed_alone": verdict(alone) == "caught", "fast_error": rec.get("fast_error") or alone["error"]}


def summary(records: list[dict]) -> dict:
    n = len(records)
    fast = sum(r["fast"] == "caught" for r in records)
    both = sum(r["caught_fast_or_slow"] for r in records)
    s = {"mutants": n, "caught_fast": fast, "caught_fast_or_slow": both,
         "rate_fast": round(fast / n, 3) if n else None, "rate_fast_or_slow": round(both / n, 3) if n else None,
         "survivors": [r["id"] for r in records if not r["caught_fast_or_slow"]],
         "caught_only_after_other_tests": [r["id"] for r in records if r.get("confirmed_alone") is False]}
    with_after = [r for r in records if "caught_after" in r]
    if with_after:
        s["caught_after_new_tests"] = sum(r["caught_after"] for r in with_after)
        # A catch that needs earlier tests' state counts only once a new test catches it alone.
        s["rate_after"] = round(sum((r["caught_fast_or_slow"] and r.get("confirmed_alone") is not False)
                                    or r.get("caught_after", False) for r in records) / n, 3)
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("round", help="JSON list of mutants")
    ap.add_argument("--out", required=True, help="results JSON (rewritten after every mutant)")
    ap.add_argument("--only", nargs="*", help="mutant ids to run (default: all)")
    ap.add_argument("--slow", action="store_true", help="run the slow tests of a fast-suite survivor's area")
    ap.add_argument("--after", action="store_true", help="only run each mutant's new_tests, on it and on the clean tree "
                    "(caught_after), updating the records of an earlier run")
    ap.add_argument("--confirm", action="store_true", help="only re-run each caught mutant's catching test alone "
                    "(records of an earlier run that lack confirmed_alone)")
    ap.add_argument("--resume", action="store_true", help="skip mutants that already have a record in --out")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per pytest run (default 3600)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` unwinds too: the planted file is restored

    mutants = json.loads(Path(args.round).read_text())
    if args.only:
        unknown = set(args.only) - {m["id"] for m in mutants}
        if unknown:
            raise SystemExit(f"unknown mutant ids: {', '.join(sorted(unknown))}")
        mutants = [m for m in mutants if m["id"] in args.only]
    dirty = sorted({m["file"] for m in mutants if not git_clean(ROOT / m["file"])})
    if dirty:
        raise SystemExit(f"these files have uncommitted edits; commit or stash them first: {', '.join(dirty)}")
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.is_file() else {}
    done = {r["id"]: r for r in old.get("mutants", [])}  # kept: --only and --after update records in place
    order = [m["id"] for m in json.loads(Path(args.round).read_text())]
    for i, m in enumerate(mutants, 1):
        if args.confirm:
            rec = done.get(m["id"])
            if rec is None or rec["fast"] != "caught" or not rec["fast_caught_by"] or "confirmed_alone" in rec:
                continue
            print(f"[{i}/{len(mutants)}] {m['id']} (alone: {rec['fast_caught_by'][0]}) ...", end=" ", flush=True)
            done[m["id"]] = {**rec, **confirm(m, rec, args.timeout)}
            print("confirmed" if done[m["id"]]["confirmed_alone"] else "NOT caught alone", flush=True)
        elif args.after:
            if m["id"] not in done:
                raise SystemExit(f"{m['id']}: no record in {out} yet; run the round before --after")
            if not m.get("new_tests"):
                continue
            print(f"[{i}/{len(mutants)}] {m['id']} (new tests) ...", end=" ", flush=True)
            done[m["id"]] = {**done[m["id"]], **after(m, args.timeout)}
            print("caught_after" if done[m["id"]]["caught_after"] else "NOT caught by its new tests", flush=True)
        else:
            if m["id"] in done and args.resume:
                continue
            print(f"[{i}/{len(mutants)}] {m['id']} ...", end=" ", flush=True)
            done[m["id"]] = rec = one(m, args.slow, args.timeout)
            print(rec["fast"], *rec["fast_caught_by"], f"slow={rec.get('slow', '-')}", flush=True)
        records = [done[k] for k in order if k in done]
        result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "round": args.round,
                  "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
                  "python": platform.python_version(), "fast_suite": "pytest " + " ".join(FAST),
                  "summary": summary(records), "mutants": records}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    if done:
        print(json.dumps(summary([done[k] for k in order if k in done]), indent=1))


if __name__ == "__main__":
    main()
