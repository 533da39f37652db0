"""Stop strings on streamed text: cut the output where one first appears, never send part of it early.

The last `longest stop - 1` characters are held back until the next token shows whether they begin a
stop string; the final chunk flushes them. The state depends only on the text, so a decode worker
rebuilds the prefill worker's exactly from the first token.
"""

from __future__ import annotations


class StopStrings:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""  # everything generated so far
        self.sent = 0  # how much of it the client has

    def add(self, piece: str, final: bool) -> tuple[str, bool]:
        """Append generated text; returns (text to send now, whether a stop string ended the output)."""
        start = max(0, len(self.text) - self.hold)  # a new match must end inside the new piece
        self.text += piece
        hits = [i for s in self.stops if (i := self.text.find(s, start)) != -1]
        if hits:
            cut = min(hits)
            out, self.sent = self.text[self.sent : cut], cut
            return out, True
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent : end], end
        return out, False
