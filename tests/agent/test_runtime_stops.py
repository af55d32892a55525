"""Stop sequences in streamed text (`runtime.stops`)."""

from __future__ import annotations

import pytest

from slmops_agent.runtime.stops import StopScanner


@pytest.mark.parametrize(
    ("stops", "pieces", "emitted", "text", "stopped"),
    [
        ((), ["ab", "cd"], ["ab", "cd"], "abcd", False),
        (("END",), ["hello E", "N", "D more"], ["hello ", "", ""], "hello ", True),
        (("END",), ["hello E", "x"], ["hello ", "Ex"], "hello Ex", False),
        (("ab", "xyz"), ["1a", "2xy", "z9"], ["1", "a2", ""], "1a2", True),
        (("stop",), ["nostop"], ["no"], "no", True),
    ],
)
def test_stop_scanner(stops: tuple[str, ...], pieces: list[str], emitted: list[str], text: str, stopped: bool) -> None:
    s = StopScanner(stops)
    out = []
    for p in pieces:
        out.append(s.feed(p))
        if s.stopped:
            break
    assert out == emitted
    if not s.stopped:
        out.append(s.flush())
    assert "".join(out) == text == s.text
    assert s.stopped is stopped
