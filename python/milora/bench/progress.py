"""A minimal progress bar on stderr (no dependencies).

Drawn in place with carriage returns when stderr is a terminal; otherwise (logs, CI, pipes)
it prints nothing, so captured output stays clean. `enabled=True` forces it on.

When stdout is a terminal too, the table rows printed while the bar is up would land on
the bar's line (the bar has no newline), gluing the row to it and breaking the markdown
table. So while the bar is shown, sys.stdout is wrapped: a write to it first clears the bar,
and the bar is redrawn only at the start of a line. The wrapper is installed for the life of
the bar only (the context manager / close()).
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class _ClearBeforeWrite:
    """sys.stdout while a bar is drawn on the same terminal: clears the bar before text."""

    def __init__(self, real: TextIO, bar: "Progress") -> None:
        self._real = real
        self._bar = bar
        self.at_line_start = True

    def write(self, text: str) -> int:
        if text:
            self._bar._clear()
            self.at_line_start = text.endswith("\n")
        n = self._real.write(text)
        if self.at_line_start:
            self._real.flush()
        return n

    def __getattr__(self, name):  # flush, isatty, fileno, encoding, ...
        return getattr(self._real, name)


class Progress:
    """Progress(total, enabled=None); .step(n=1), .set_label(text), .close().

    Shows `[#####.....]  12/40  label  elapsed / eta` on one line of stderr."""

    def __init__(self, total: int, *, enabled: Optional[bool] = None, width: int = 24,
                 stream: Optional[TextIO] = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = enabled and total > 0
        self.total = max(int(total), 0)
        self.done = 0
        self.width = width
        self.label = ""
        self.t0 = time.perf_counter()
        self._last_len = 0
        self._stdout: Optional[_ClearBeforeWrite] = None
        out = sys.stdout
        if self.enabled and out is not self.stream and bool(getattr(out, "isatty", lambda: False)()):
            self._stdout = _ClearBeforeWrite(out, self)
            sys.stdout = self._stdout

    def set_label(self, label: str) -> None:
        self.label = label
        self._draw()

    def step(self, n: int = 1) -> None:
        self.done = min(self.done + n, self.total)
        self._draw()

    def _draw(self) -> None:
        if not self.enabled or (self._stdout is not None and not self._stdout.at_line_start):
            return
        frac = self.done / self.total if self.total else 1.0
        fill = int(round(frac * self.width))
        elapsed = time.perf_counter() - self.t0
        eta = f" eta {elapsed / frac - elapsed:4.0f}s" if 0 < frac < 1 else ""
        line = (f"[{'#' * fill}{'.' * (self.width - fill)}] {self.done:>{len(str(self.total))}}/{self.total} "
                f"{elapsed:4.0f}s{eta}  {self.label}")[:160]
        pad = " " * max(self._last_len - len(line), 0)
        self.stream.write("\r" + line + pad)
        self.stream.flush()
        self._last_len = len(line)

    def _clear(self) -> None:
        if self.enabled and self._last_len:
            self.stream.write("\r" + " " * self._last_len + "\r")
            self.stream.flush()
            self._last_len = 0

    def close(self) -> None:
        self._clear()
        self.enabled = False
        if self._stdout is not None:
            if sys.stdout is self._stdout:
                sys.stdout = self._stdout._real
            self._stdout = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
