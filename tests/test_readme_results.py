"""The README's "Results so far" cannot go stale: every figure names the JSON it comes from.

The section is written as tables whose last column names the source of the row's figure,
`` `FILE` `PATH` `` (FILE under bench/results/, PATH a key path into it, e.g.
``prompts[kind=code].speedup`` picks the dicts of a list whose ``kind`` is ``code``; several
matches give a list) or `` `FILE` `PATH` / `PATH` `` for a ratio. Every number in the figure
cell must equal the JSON's value rounded to the decimals shown (a list of values for several
numbers), and every JSON named must record the commit that made it. Outside those tables the
section holds no figures at all: prose points to the tables and docs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Results so far"
SOURCE = re.compile(r"^`(?P<file>[^`]+\.json)`\s+`(?P<path>[^`]+)`(?:\s*/\s*`(?P<den>[^`]+)`)?$")
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?(?=x?(?!\w|\.\d))")
"""A figure: digits with thousands commas and decimals, not part of a word (H200, bf16, SmolLM2-135M)."""


def results_section(readme: str) -> str:
    """The text of the README's results section (up to the next level-2 heading)."""
    start = readme.index(SECTION) + len(SECTION)
    end = readme.find("\n## ", start)
    return readme[start : end if end >= 0 else len(readme)]


def lookup(data, path: str):
    """The value at a key path: ``a.b[2].c``, ``rows[kind=code].x`` (all matches), ``a.0``."""
    value = [data]
    many = False
    for part in re.findall(r"[^.\[\]]+|\[[^\]]*\]", path):
        nxt = []
        for v in value:
            if part.startswith("["):
                sel = part[1:-1]
                if "=" in sel:
                    conds = [c.split("=", 1) for c in sel.split(",")]
                    hits = [x for x in v if all(str(x.get(k.strip())) == c.strip() for k, c in conds)]
                    if not hits:
                        raise KeyError(f"no entry of {path!r} matches [{sel}]")
                    many = many or len(hits) > 1
                    nxt += hits
                else:
                    nxt.append(v[int(sel)])
            else:
                nxt.append(v[int(part)] if isinstance(v, list) and part.isdigit() else v[part])
        value = nxt
    return value if many else value[0]


def numbers(cell: str) -> list[float]:
    return [float(n.replace(",", "")) for n in NUMBER.findall(cell.replace("`", ""))]


def decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def check(readme: str, results: Path) -> list[str]:
    """Every mismatch between the results section and its JSONs, as lines (empty: all good)."""
    bad, rows = [], 0
    prose = []
    for line in results_section(readme).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else None
        if cells is None:
            prose.append(line)
            continue
        if set("".join(cells)) <= set("-: ") or len(cells) < 3:
            continue
        m = SOURCE.match(cells[-1])
        if m is None:
            if cells[-1].lower() != "source":
                bad.append(f"no source for row {line.strip()!r}: end it with `FILE.json` `key.path`")
            continue
        rows += 1
        path = results / m["file"]
        if not path.is_file():
            bad.append(f"{m['file']}: no such file under {results}")
            continue
        data = json.loads(path.read_text())
        if not (isinstance(data, dict) and data.get("commit")):
            bad.append(f"{m['file']}: records no commit")
        try:
            value = lookup(data, m["path"])
            if m["den"]:
                value = value / lookup(data, m["den"])
        except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as e:
            bad.append(f"{m['file']} {m['path']}: {e}")
            continue
        values = value if isinstance(value, list) else [value]
        shown = NUMBER.findall(cells[-2].replace("`", ""))
        if len(shown) != len(values):
            bad.append(f"{line.strip()!r}: {len(shown)} figure(s) shown, {len(values)} in {m['file']} {m['path']}")
            continue
        for text, v in zip(shown, values):
            want = round(float(v), decimals(text))
            if abs(float(text.replace(",", "")) - want) > 1e-9:
                bad.append(f"{line.strip()!r}: shows {text}, {m['file']} {m['path']} gives {float(v):.4g}")
    text = re.sub(r"`[^`]*`", "", "\n".join(prose))  # commands and paths may hold digits
    for n in NUMBER.findall(text):
        bad.append(f"a figure outside the tables: {n!r} (put it in a table row that names its JSON)")
    if rows == 0:
        bad.append("the results section has no sourced rows")
    return bad


def test_readme_results_match_their_json():
    readme = (ROOT / "README.md").read_text()
    assert check(readme, ROOT / "bench" / "results") == []


README = """# x
## Results so far
Prose without figures; see `docs/benchmarks.md` and `bench/cpu_steps.py --threads 2`.

| measure | figure | source |
|---|---|---|
| speed-up | 1.53x | `r.json` `mean_speedup` |
| accuracy per depth | 0.63 / 0.50 | `r.json` `eval.acc` |
| code rows | 2.1x, 1.9x | `r.json` `rows[kind=code].s` |
| tokens/s ratio | 1.50x | `r.json` `rows[kind=chat].t` / `rows[kind=code,i=0].t` |
## Docs
1.0 here is not checked.
"""


def write_json(tmp_path: Path, **over) -> Path:
    data = {"commit": "abc", "mean_speedup": 1.5321, "eval": {"acc": [0.6264, 0.4952]},
            "rows": [{"kind": "code", "s": 2.08, "t": 10.0, "i": 0}, {"kind": "code", "s": 1.94, "t": 3, "i": 1},
                     {"kind": "chat", "t": 15.0}]}
    data.update(over)
    (tmp_path / "r.json").write_text(json.dumps(data))
    return tmp_path


def test_checker_accepts_matching_figures(tmp_path):
    assert check(README, write_json(tmp_path)) == []


@pytest.mark.parametrize("readme, over, complaint", [
    (README.replace("1.53x", "1.54x"), {}, "shows 1.54"),                      # a figure edited by hand
    (README, {"mean_speedup": 1.02}, "shows 1.53"),                          # the JSON re-measured
    (README, {"commit": None}, "records no commit"),
    (README.replace("0.63 / 0.50", "0.63"), {}, "1 figure(s) shown, 2"),
    (README.replace("Prose without figures", "Prose with 287 s"), {}, "outside the tables: '287'"),
    (README.replace("`r.json` `mean_speedup`", "r.json"), {}, "no source"),
    (README.replace("rows[kind=code].s", "rows[kind=text].s"), {}, "matches [kind=text]"),
    (README.replace("1.50x", "1.49x"), {}, "shows 1.49"),
])
def test_checker_catches_a_stale_figure(tmp_path, readme, over, complaint):
    bad = check(readme, write_json(tmp_path, **over))
    assert any(complaint in b for b in bad), bad


def test_results_record_their_commit_and_only_code_makes_it_dirty(tmp_path):
    """`provenance.git_commit`: the commit, ``+dirty`` for changed code, not for results being written."""
    import subprocess

    from multitoken.provenance import git_commit

    def git(*args):
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    for f in ("src/a.py", "bench/results/r.json", "README.md"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "x")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert git_commit(tmp_path) == head
    (tmp_path / "bench/results/r.json").write_text("2\n")
    (tmp_path / "README.md").write_text("2\n")
    assert git_commit(tmp_path) == head
    (tmp_path / "src/a.py").write_text("2\n")
    assert git_commit(tmp_path) == head + "+dirty"
    assert git_commit(tmp_path.parent) is None or not git_commit(tmp_path.parent).startswith(head)


def test_a_copy_without_git_records_the_commit_it_is_given(tmp_path, monkeypatch):
    """The GPU machine gets the tree without .git: its results name the commit from $MULTITOKEN_COMMIT,
    and a checkout's own commit wins over the variable."""
    import subprocess

    from multitoken.provenance import git_commit

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no repository above the copy either
    monkeypatch.delenv("MULTITOKEN_COMMIT", raising=False)
    assert git_commit(tmp_path) is None
    monkeypatch.setenv("MULTITOKEN_COMMIT", "d9f0786")
    assert git_commit(tmp_path) == "d9f0786"
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "x"],
                   cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert git_commit(tmp_path) == head
