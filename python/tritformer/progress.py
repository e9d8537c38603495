"""Progress with a total and an ETA for the command line (`train`, `validate`).

On a terminal: tqdm's bar when tqdm is installed (it comes with transformers; no hard
dependency), else a one-line bar redrawn in place. Not a terminal (a log, a pipe, CI): plain
lines, every `every` updates and at the end, so a log stays readable. The ETA is the mean time
per item so far times the items left.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional


def format_seconds(s: Optional[float]) -> str:
    """42s, 3m05s, 1h02m; '?' when unknown."""
    if s is None or s != s or s == float("inf"):
        return "?"
    s = int(round(max(s, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _tqdm():
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


class ProgressBar:
    """`update(postfix=...)` after each item; `write(line)` prints above the bar; `close()` at
    the end. `initial`: items already done before this run (a resumed training), not counted
    in the ETA's rate."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", unit: str = "it",
                 stream=None, every: int = 1, use_tqdm: Optional[bool] = None):
        self.stream = sys.stderr if stream is None else stream
        self.total, self.n, self.n0, self.desc, self.every = total, initial, initial, desc, max(every, 1)
        self.tty = _isatty(self.stream)
        self.t0 = time.perf_counter()
        tqdm = _tqdm() if (self.tty if use_tqdm is None else use_tqdm) else None
        self._bar, self._width = None, 0
        if tqdm is not None:
            self._bar = tqdm(total=total, initial=initial, desc=desc or None, unit=unit,
                             file=self.stream, dynamic_ncols=True, smoothing=0.1, leave=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def eta(self) -> Optional[float]:
        done = self.n - self.n0
        if done <= 0:
            return None
        return self.elapsed / done * (self.total - self.n)

    def status(self) -> str:
        """'[n/total] elapsed 12s, ETA 1m05s' (the plain form's prefix)."""
        left = "done" if self.n >= self.total else f"ETA {format_seconds(self.eta())}"
        return f"[{self.n}/{self.total}] {format_seconds(self.elapsed)}, {left}"

    @property
    def uses_tqdm(self) -> bool:
        return self._bar is not None

    def update(self, n: int = 1, postfix: str = "", line: Optional[Callable[[], str]] = None,
               force: bool = False) -> None:
        """Advance by n. postfix: shown after the bar (tqdm) or after the status; line: makes
        the whole plain-text line instead of status + postfix (called after advancing).
        force: print the plain line even between `every`s."""
        self.n += n
        if self._bar is not None:
            self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(n)
            return
        text = (line() if line is not None
                else f"{self.desc + ' ' if self.desc else ''}{self.status()}  {postfix}".rstrip())
        if self.tty:
            self.stream.write("\r" + text.ljust(self._width))  # over the previous line
            self._width = max(self._width, len(text))
            if self.n >= self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif force or self.n % self.every == 0 or self.n >= self.total:
            print(text, file=self.stream, flush=True)

    def write(self, text: str) -> None:
        """A line above the bar (tqdm) or on its own line."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            if self.tty and 0 < self.n < self.total:
                self.stream.write("\n")
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.tty and self.n < self.total:
            self.stream.write("\n")
            self.stream.flush()
