"""The Errors card: recent problems of every part, newest first (status ``health.errors``).

The wiring creates one :class:`ErrorLog` before the parts and hands its
:meth:`~ErrorLog.record` to each part that reports problems (grids, advisor)
and the log itself to the bot, which shows it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator


class ErrorLog:
    """The last ``maxlen`` problems; the same problem again only updates its time and count."""

    def __init__(self, maxlen: int = 20) -> None:
        self._entries: deque[dict] = deque(maxlen=maxlen)

    def record(self, source: str, message: str, now: float) -> None:
        if self._entries and (last := self._entries[0])["source"] == source and last["message"] == message:
            self._entries[0] = {**last, "ts": now, "count": last.get("count", 1) + 1}
            return
        self._entries.appendleft({"ts": now, "source": source, "message": message})

    def __iter__(self) -> Iterator[dict]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> dict:
        return self._entries[index]
