"""A progress bar for long runs (benchmarks, training): one line on a terminal, one line per step elsewhere."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


class Progress:
    """A one-line progress bar on a terminal, one line per step elsewhere."""

    def __init__(self, total: int, out: Callable[[str], None] | None = None):
        self.total, self.done, self.start, self.out = max(total, 1), 0, time.perf_counter(), out
        self.tty = out is None and sys.stderr.isatty()

    def step(self, what: str, n: int = 1) -> None:
        self.done += n
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.done * (self.total - self.done)
        bar = "#" * (24 * self.done // self.total)
        line = f"[{bar:<24}] {self.done}/{self.total} {elapsed:.0f}s, ~{left:.0f}s left: {what}"
        if self.out is not None:
            self.out(line)
        elif self.tty:
            print("\r" + line[:120].ljust(120), end="" if self.done < self.total else "\n", file=sys.stderr,
                  flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def note(self, message: str) -> None:
        if self.out is not None:
            self.out(message)
        else:
            print(("\n" if self.tty and self.done else "") + message, file=sys.stderr, flush=True)
