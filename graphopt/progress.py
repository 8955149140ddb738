"""A progress bar on stderr for long work (recovery fine-tuning, TVM tuning)."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    """Redrawn in place on a terminal, a line per 10% otherwise; silent when not enabled.

    `update(done, text)` with `done` out of `total` `unit`s (steps, or seconds of a budget).
    """

    def __init__(
        self, label: str, total: int, enabled: bool, unit: str = "", width: int = 30
    ) -> None:
        self.label, self.total, self.unit = label, max(int(total), 1), unit
        self.enabled, self.width = enabled, width
        self.tty = enabled and sys.stderr.isatty()
        self.start, self.shown = time.perf_counter(), -1

    def update(self, done: int, text: str) -> None:
        if not self.enabled:
            return
        done = min(int(done), self.total)
        tenth = done * 10 // self.total
        if not self.tty and tenth == self.shown:
            return
        self.shown = tenth
        filled = self.width * done // self.total
        line = (
            f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] "
            f"{done}/{self.total}{self.unit} {text} ({time.perf_counter() - self.start:.1f}s)"
        )
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr)
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)
