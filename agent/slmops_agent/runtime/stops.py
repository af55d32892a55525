"""Stop sequences in streamed text: what may be emitted now, what must wait for the next piece."""

from __future__ import annotations


class StopScanner:
    """Holds back text that may be the start of a stop sequence; finds the first stop."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add decoded text; return what can be emitted now."""
        self.text += piece
        if not self.stops:
            out = self.text[self.emitted :]
            self.emitted = len(self.text)
            return out
        first = -1
        for s in self.stops:
            i = self.text.find(s, self.emitted)
            if i >= 0 and (first < 0 or i < first):
                first = i
        if first >= 0:
            out = self.text[self.emitted : first]
            self.text = self.text[:first]
            self.emitted = first
            self.stopped = True
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text) - self.emitted), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        end = len(self.text) - hold
        out = self.text[self.emitted : end]
        self.emitted = end
        return out

    def flush(self) -> str:
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out
