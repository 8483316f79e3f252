"""Text from a stream of token ids: detokenised as it comes, cut at stop strings, never half a character.

A speculative step emits several tokens at once, so stop strings are searched in the text they
make together with what came before (a stop string may span steps), and a character whose
UTF-8 bytes are split across tokens or steps is held back until it is complete. `TextStream`
(api.py) and the server (`multitoken serve`) both use `StopText`.
"""

from __future__ import annotations

from collections.abc import Sequence
from multitoken.decoding.state import eos_ids


class StopText:
    """Detokenise a stream of token ids with stop strings: text out as soon as it is certain.

    Several tokens may arrive at once (a speculative step): the text they make is searched for
    every stop string, across piece boundaries, and cut before the first match. Text that could
    still become the start of a stop string is held back; a UTF-8 character split across tokens
    is never emitted half (`StreamDecoder`). EOS ids are not text.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), eos_id: int | Sequence[int] | None = None) -> None:
        from multitoken.data.tokenizer import StreamDecoder

        # Never emit a held-back character early (StreamDecoder's default gives up after 8 ids): a
        # step of several tokens can end inside a character whose last byte the next step brings.
        # The text waits only while it ends in U+FFFD, and the end of the stream flushes it.
        self.dec = StreamDecoder(tokenizer, max_hold=1 << 30)
        self.stop, self.eos = [s for s in stop if s], set(eos_ids(eos_id))
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text, self.sent, self.stopped = "", 0, False

    def push(self, ids: Sequence[int]) -> str:
        """Feed new token ids; return the text now certain (empty once a stop string was seen)."""
        if self.stopped:
            return ""
        self.text += self.dec.push([t for t in ids if t not in self.eos])
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            return self._out(len(self.text))
        return self._out(len(self.text) - self.hold)

    def finish(self) -> str:
        """The rest of the text at the end of the stream."""
        if not self.stopped:
            self.text += self.dec.flush()
            cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text, self.stopped = self.text[:cut], True
        return self._out(len(self.text))

    def _out(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent: upto], upto
        return piece
