"""Finished runs kept apart from the study folder (``--results DIR``), so that later invocations,
on a fresh machine with rebuilt data, reuse them instead of training them again.

DIR holds one ``runs/PRESET/NAME/seedS-stepsN/ablate_result.json`` per finished run: its metrics,
its `identity` (what was trained and measured: the configuration's heads, weights, lambda and
data key, seed, steps, the shared train settings and the measurement settings), the data's
fingerprint (``prepare``'s ``data_sha256``) and the commit of the code that made it. A planned run
whose identity equals a stored one's is not trained: the stored numbers enter the table. Every
stored result for a data key (main, bytes) must carry that DATA_DIR's fingerprint: a folder of
results measured on other data is refused in one line, since mixing them would compare runs on
different data. A stored file is never overwritten by a run of another identity.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from multitoken.errors import UserError
from multitoken.io import outdir

RESULT_FILE = "ablate_result.json"
# TrainConfig fields that change how fast a run goes or what it writes, not its numbers.
RUNTIME_FIELDS = ("device", "compile", "fsdp", "loss_kernel", "recompute", "save_every", "keep_checkpoints", "log_every")


def identity(content: dict[str, Any], seed: int, steps: int, settings: dict[str, Any], measure: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs the same run (see the module docstring); JSON-ready."""
    shared = {k: v for k, v in sorted(settings.items()) if k not in RUNTIME_FIELDS}
    return json.loads(json.dumps({"config": content, "seed": seed, "steps": steps, "train": shared, "measure": measure}))


def _key(ident: dict[str, Any]) -> str:
    return json.dumps(ident, sort_keys=True)


class ResultStore:
    """The finished runs under a ``--results`` folder, by identity."""

    def __init__(self, root: Path, fingerprints: dict[str, str]) -> None:
        """Read every stored result; refuse the folder if one was measured on other data.

        Args:
            root: the folder (new, empty, or one this command wrote).
            fingerprints: data key -> data_sha256 of this study's DATA_DIRs.
        """
        self.root = root
        outdir.check(root, "results", "--results")
        self.by_key: dict[str, dict[str, Any]] = {}
        for path in sorted(root.glob(f"runs/**/{RESULT_FILE}")):
            try:
                result = json.loads(path.read_text())
                ident, data = result["identity"], result["data"]
                key, fp = data["key"], data["sha256"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{path} is not a result of `multitoken ablate` (no identity/data record): "
                                "move it out of --results") from None
            if key in fingerprints and fp != fingerprints[key]:
                raise UserError(f"{path} was measured on data with fingerprint {fp[:12]}, the {key} DATA_DIR has "
                                f"{fingerprints[key][:12]}: rebuild the data identically (same corpus, tokenizer, split) "
                                "or give another --results folder")
            self.by_key[_key(ident)] = result

    def find(self, ident: dict[str, Any]) -> dict[str, Any] | None:
        """The stored result of the run `ident`, or None."""
        return self.by_key.get(_key(ident))

    def results(self) -> list[dict[str, Any]]:
        return list(self.by_key.values())

    def save(self, folder: str, result: dict[str, Any]) -> Path:
        """Store a finished run's result under ``folder``; a file there of another run is refused."""
        path = self.root / folder / RESULT_FILE
        if path.is_file():
            try:
                old = json.loads(path.read_text()).get("identity")
            except ValueError:
                old = None
            if old != result["identity"]:
                raise UserError(f"{path} holds another run (its settings differ from this study's): give another --results "
                                "folder, or move that file out")
        outdir.claim(self.root, "results", "--results")
        outdir.write_json(path, result)
        self.by_key[_key(result["identity"])] = result
        return path
