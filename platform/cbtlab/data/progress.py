"""A one-line progress display for long data jobs: items done / total, items/s, ETA."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def _duration(seconds: float) -> str:
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """Counts finished items and shows them on `stream` (stderr by default).

    On a terminal one line is rewritten in place at most every `refresh_s`; otherwise (a log
    file, a Ray job's output) a full line is printed every `interval_s`, so logs stay short.
    Items that were already done before this run (`done`) count towards the total but not
    towards the rate."""

    def __init__(
        self,
        total: int,
        *,
        done: int = 0,
        label: str = "images",
        stream: TextIO | None = None,
        interval_s: float = 30.0,
        refresh_s: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.done, self.start_done = total, done, done
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = refresh_s if self.tty else interval_s
        self.clock = clock
        self.start = self.last = clock()

    def restart_clock(self) -> None:
        """Measure the rate from now (e.g. after a slow start-up such as joining a cluster)."""
        self.start = self.last = self.clock()
        self.start_done = self.done

    def rate(self) -> float:
        elapsed = self.clock() - self.start
        return (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate()
        left = self.total - self.done
        eta = _duration(left / rate) if rate > 0 else ("0:00:00" if left <= 0 else "?")
        return f"{self.label} {self.done:,}/{self.total:,}  {rate:,.1f}/s  ETA {eta}"

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= self.interval_s:
            self.last = now
            self._show()

    def close(self) -> None:
        """Show the final count (and end the terminal line)."""
        self._show()
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()

    def _show(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self.line())
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()
