"""Imports run one way between the packages (docs/design.md draws the picture).

Each module's imports are read with `ast` (lazy imports inside functions included) and checked
against the allowed directions: the model knows nothing of training, decoding, files or the CLI;
decoding knows nothing of training or the CLI; experiments (the study harness) sit above training
and decoding, and nothing but the CLI imports them; only the CLI imports the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import multitoken

ROOT = Path(multitoken.__file__).parent

# package -> packages it must never import (anything under multitoken.<name>)
FORBIDDEN: dict[str, set[str]] = {
    "model": {"training", "decoding", "io", "cli", "data", "bench", "demo", "experiments", "pipeline", "serve"},
    "decoding": {"training", "cli", "bench", "demo", "experiments", "pipeline", "serve"},
    "serve": {"training", "cli", "bench", "demo", "experiments"},
    "data": {"model", "training", "decoding", "cli", "bench", "demo", "experiments", "pipeline", "serve"},
    "io": {"training", "decoding", "cli", "bench", "demo", "experiments", "pipeline", "serve"},
    "training": {"cli", "bench", "demo", "experiments", "pipeline", "serve"},
    "bench": {"cli", "experiments"},
    "experiments": {"cli", "bench", "demo", "serve"},
}
TOP_LEVEL = {"config", "errors", "checks"}
"""Modules beside the packages that every layer may use; they import no package but the model's head registry."""


def package_of(module: str) -> str:
    """'multitoken.model.heads.base' -> 'model'; top-level modules are their own package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports_of(path: Path, root: Path = ROOT) -> set[str]:
    """Every multitoken module `path` (under package folder `root`) imports, at the top or inside functions."""
    rel = path.relative_to(root.parent).with_suffix("")
    here = list(rel.parts if rel.name != "__init__" else rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("multitoken")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = here[: len(here) - node.level + (1 if rel.name == "__init__" else 0)] if node.level else here
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            if name.startswith("multitoken"):
                out.add(name)
                out |= {f"{name}.{a.name}" for a in node.names}  # `from multitoken import cli`
    return out


def violations(root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        pkg = package_of(module)
        for target in imports_of(path, root):
            tpkg = package_of(target)
            if not tpkg or tpkg == pkg:
                continue
            if tpkg == "cli" and module != "multitoken.__main__":
                bad.append(f"{module} imports {target}: only the CLI imports the CLI")
            elif tpkg in FORBIDDEN.get(pkg, ()):
                bad.append(f"{module} imports {target}: {pkg}/ must not import {tpkg}/")
            elif pkg in TOP_LEVEL and tpkg not in TOP_LEVEL and not target.startswith("multitoken.model.heads.registry"):
                bad.append(f"{module} imports {target}: {pkg}.py sits below every package")
    return bad


def test_imports_run_one_way():
    assert violations() == []


def test_a_planted_violation_is_caught(tmp_path):
    """The check itself works: a model module that imports training is reported."""
    pkg = tmp_path / "multitoken"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "model" / "__init__.py").write_text("")
    (pkg / "model" / "bad.py").write_text("def f():\n    from multitoken.training.loss import MTPLoss\n")
    (pkg / "model" / "rel.py").write_text("from ..cli import main\n")
    found = violations(pkg)
    assert any("multitoken.model.bad imports multitoken.training.loss" in v for v in found), found
    assert any("multitoken.model.rel imports multitoken.cli" in v for v in found), found


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_every_checked_package_exists(module):
    assert (ROOT / module).is_dir()
