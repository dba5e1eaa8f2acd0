"""Output text as tokens arrive: only whole characters, and nothing past a stop string.

A token may end inside a multi-byte character, and the last few characters
may be the start of a stop string; both are held back until the next tokens
settle them. Decoding the whole output each time keeps the text exactly what
decoding it at once gives (outputs are short next to a step's time).
"""

from __future__ import annotations

from collections.abc import Sequence

from tropical.engine.tokenizer import Tokenizer

UNFINISHED = "\ufffd"  # what a decoder shows for a character whose bytes have not all arrived


class TextStream:
    def __init__(self, tokenizer: Tokenizer | None, stop: Sequence[str] = ()) -> None:
        """Without a tokenizer (an emulated engine) there is no text, only token ids."""
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.token_ids: list[int] = []
        self.text = ""  # all the text handed out so far
        self.stopped = False  # a stop string was met: nothing more is handed out
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def add(self, token_ids: Sequence[int]) -> str:
        """The new text that `token_ids` settle."""
        return self._next(token_ids, final=False)

    def finish(self) -> str:
        """The text held back, once the output is complete."""
        return self._next((), final=True)

    def _next(self, token_ids: Sequence[int], final: bool) -> str:
        if self.stopped:
            return ""
        self.token_ids.extend(token_ids)
        if self.tokenizer is None:
            return ""
        full = self.tokenizer.decode(self.token_ids)
        end = len(full)
        for stop in self.stop:
            found = full.find(stop, max(0, len(self.text) - len(stop) + 1))
            if found != -1 and found < end:
                end = found
                self.stopped = True
        if not self.stopped and not final:
            end -= self._hold
            while end > len(self.text) and full[end - 1] == UNFINISHED:
                end -= 1
        fresh = full[len(self.text) : max(end, len(self.text))]
        self.text += fresh
        return fresh
