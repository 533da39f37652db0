"""Incremental detokenization: text deltas that never split a multi-byte character."""

from __future__ import annotations

from typing import Any


class Detokenizer:
    def __init__(self, tokenizer: Any, ids: list[int] | None = None) -> None:
        self._tok = tokenizer
        self.ids: list[int] = []
        self._emitted = ""
        if ids:
            self.push(ids)

    def push(self, ids: list[int], final: bool = False) -> str:
        """Add tokens; returns the text they complete (empty while a character is partial, unless final)."""
        self.ids.extend(ids)
        text = self._tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            return ""
        delta = text[len(self._emitted) :] if text.startswith(self._emitted) else text
        self._emitted = text
        return delta

    def skip(self, ids: list[int]) -> str:
        """Take `ids` as already pushed one at a time and their text as sent (a continuation's earlier tokens);
        returns that text. As one push each would have, it leaves a trailing partial character unsent."""
        self.ids.extend(ids)
        for end in range(len(self.ids), -1, -1):  # (a partial character is a few tokens at most)
            text = self._tok.decode(self.ids[:end], skip_special_tokens=True) if end else ""
            if not text.endswith("\ufffd"):
                self._emitted = text
                return text
        return ""
