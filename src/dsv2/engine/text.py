"""Token ids to text, incrementally: UTF-8-safe deltas and stop strings.

Byte-level BPE splits one Chinese character or emoji over several tokens; decoding a
prefix then ends in U+FFFD. `TextStream` only releases text once the decode is whole, by
decoding a short window (prefix_offset..) and comparing it with the same window without
the newest tokens, so each step costs a few tokens' decode, not the whole sequence's.

Stop strings are held back while the text's tail could still grow into one, so a client
never receives text that a later stop string would have cut.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tok = tokenizer
        self.stop = list(stop or [])
        self.ids: list[int] = []
        self.prefix_offset = 0   # window start: decoding from here is stable
        self.read_offset = 0     # tokens before this are already turned into text
        self.text = ""           # all text decoded so far (complete characters only)
        self.sent = 0            # characters of `text` handed out
        self.stopped = False     # a stop string was found; text is cut before it

    def push(self, token_id: int) -> str:
        """Add one token; return the text now safe to hand out (possibly "")."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        after = self.tok.decode(self.ids[self.prefix_offset:])
        # A trailing U+FFFD may be a character still arriving: wait, but no longer than a UTF-8
        # character can take (4 bytes, so 4 tokens); past that the bytes are simply invalid.
        waiting = after.endswith(REPLACEMENT) and len(self.ids) - self.read_offset < 4
        if len(after) > len(before) and not waiting:
            self.text += after[len(before):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The sequence ended: release everything held (stop-string tails, incomplete bytes)."""
        if not self.stopped and self.read_offset < len(self.ids):
            tail = self.tok.decode(self.ids[self.prefix_offset:])[len(self.tok.decode(
                self.ids[self.prefix_offset:self.read_offset])):]
            self.text += tail
            self.read_offset = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if self.stop and not self.stopped:
            start = max(0, self.sent - max(map(len, self.stop)))
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                self.text = self.text[:min(hits)]
                end = len(self.text)
            elif not final:
                end -= self._held(self.text)
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def _held(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
