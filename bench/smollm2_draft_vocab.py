"""SmolLM2-135M-Instruct's draft vocabulary: the 8,192 most frequent tokens of the Python standard
library under its tokenizer, shipped beside its heads for heads files that carry none.

Drafting over V' multiplies |V'| rows of the 49,152-row LM head per draft (FR-Spec; EAGLE-3's
d2t/t2d), while verification keeps the whole vocabulary: the output is unchanged, only drafts of
tokens outside V' become impossible. The three chat-template specials (<|endoftext|>,
<|im_start|>, <|im_end|>, the last SmolLM2's EOS) are always kept, so a draft can end a reply.
The counts come from the same corpus any machine has (`prepare python-stdlib`, test folders left
out), never from an evaluation prompt. Besides the file it writes a JSON with the coverage.

    PYTHONPATH=src python bench/smollm2_draft_vocab.py --out src/multitoken/assets/smollm2-135m-instruct.draft-vocab-8192.safetensors
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from multitoken.provenance import load_average, provenance


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the draft-vocabulary file to write")
    ap.add_argument("--size", type=int, default=8192, help="tokens in the draft vocabulary (default 8192)")
    ap.add_argument("--json", default="bench/results/smollm2_draft_vocab.json", help="where the coverage goes")
    args = ap.parse_args()
    record = provenance()

    from multitoken.data.draft_vocab import count_tokens, frequent_tokens
    from multitoken.data.prepare import prepare
    from multitoken.io.heads_file import save_draft_vocab
    from multitoken.io.smollm2 import smollm2_run_dir

    run = smollm2_run_dir()
    with tempfile.TemporaryDirectory(prefix="mt-dv-") as tmp:
        meta = prepare("python-stdlib", str(run), Path(tmp) / "data", progress=False)
        counts = count_tokens(Path(tmp) / "data")
    always = [0, 1, 2]  # <|endoftext|>, <|im_start|>, <|im_end|> (EOS)
    ids = frequent_tokens(counts, args.size, always)
    covered = float(counts[ids.numpy()].sum()) / float(counts.sum())
    info = {"corpus": "python-stdlib (train split)", "tokens_counted": int(counts.sum()), "size": args.size,
            "always": always, "coverage_of_corpus": covered, "command": record["command"], "commit": record["commit"]}
    save_draft_vocab(args.out, ids, len(counts), info)
    out = {**record, "load_after": load_average(), "file": args.out, "corpus_tokens": meta["splits"]["train"]["tokens"],
           **info}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}: {args.size} of {len(counts)} tokens, covering {covered:.1%} of {int(counts.sum()):,} "
          f"stdlib tokens; {args.json}")


if __name__ == "__main__":
    main()
