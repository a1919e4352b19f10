"""Progress of work that takes seconds (export, quantize, quality, bench), on stderr.

Two looks, one API. On a terminal each step is a live line (tqdm's meter, redrawn by a ticker so
the elapsed time moves even while a step cannot count its work): elapsed time, and for a step
that declares a `total` and `advance`s through it, a bar and an estimate of the time left.
Anywhere else (a pipe, a CI log) plain lines, one when a step starts and one when it ends:

    [edgellama] export to ONNX (portable) ...
    [edgellama] export to ONNX (portable): done (4.2 s)

Both looks end a step with that same `done` line, so a log reads the same either way. `steps`
keeps each finished step's wall time, for the commands' `--json` output.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Any, Iterator, Sequence, TextIO, TypeVar

T = TypeVar("T")

PREFIX = "[edgellama] "


class Step:
    """A running step: `advance(n)` counts `n` more units of its `total` done."""

    def __init__(self, meter: Any = None):
        self.done = 0
        self._meter = meter

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._meter is not None:
            self._meter.update(n)


def is_terminal(stream: TextIO) -> bool:
    """Whether `stream` is a terminal that can redraw a line (not TERM=dumb, as in some IDE consoles)."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"


class Progress:
    """Step lines or live bars on `stream` (default stderr); silent when `enabled` is False.

    `bar`: True for live bars, False for plain lines, None (default) for bars when `stream` is a
    terminal. Timings are kept in `steps` whether or not anything is printed.
    """

    def __init__(self, enabled: bool = True, stream: TextIO | None = None, *, bar: bool | None = None,
                 tick_s: float = 0.5, record: bool = True):
        self.enabled = enabled
        self.record = record
        self.stream = stream or sys.stderr
        self.bar = is_terminal(self.stream) if bar is None else bar
        self.tick_s = tick_s
        self.steps: list[dict[str, Any]] = []
        self._meter: Any = None

    @contextlib.contextmanager
    def step(self, what: str, *, total: int | None = None) -> Iterator[Step]:
        start = time.perf_counter()
        live = self.enabled and self.bar
        if self.enabled and not live:
            self._line(f"{what} ...")
        meter, ticker = self._start_meter(what, total) if live else (None, None)
        try:
            yield Step(meter)
        finally:
            if meter is not None:
                ticker.stop()
                meter.close()
                self._meter = None
        seconds = time.perf_counter() - start
        if self.record:
            self.steps.append({"step": what, "seconds": round(seconds, 3)})
        if self.enabled:
            self._line(f"{what}: done ({seconds:.1f} s)")

    def track(self, items: Sequence[T], what: str) -> Iterator[T]:
        """`items` one by one inside `step(what, total=len(items))`, advancing after each."""
        with self.step(what, total=len(items)) as step:
            for item in items:
                yield item
                step.advance()

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self._meter is not None:   # above the live line, which is redrawn under it
            self._meter.write(PREFIX + text, file=self.stream)
        else:
            self._line(text)

    __call__ = note   # a Progress serves where a `progress(message)` callable is expected

    def _line(self, text: str) -> None:
        print(PREFIX + text, file=self.stream, flush=True)

    def _start_meter(self, what: str, total: int | None):
        from tqdm import tqdm

        # With a total: bar, count, elapsed and tqdm's estimate from the rate so far; without one
        # there is nothing to estimate from, so elapsed time only.
        fmt = ("{desc} {bar:24} {n_fmt}/{total_fmt} {elapsed} elapsed, ~{remaining} left" if total
               else "{desc} ... {elapsed} elapsed")
        meter = tqdm(total=total or None, desc=PREFIX + what, file=self.stream, leave=False,
                     bar_format=fmt, mininterval=0.1, ascii=" #", **_screen(self.stream))
        self._meter = meter
        return meter, _Ticker(meter.refresh, self.tick_s)


def _screen(stream: TextIO) -> dict[str, int]:
    """The terminal's size for tqdm, 100 x 24 where it reports 0 (a pseudo-terminal nobody sized):
    tqdm would cut the line to nothing and hide a bar below row 0."""
    try:
        size = os.get_terminal_size(stream.fileno())
        return {"ncols": size.columns or 100, "nrows": size.lines or 24}
    except (AttributeError, OSError, ValueError):
        return {"ncols": 100, "nrows": 24}


class _Ticker:
    """Calls `fn` every `interval` seconds on a daemon thread until `stop` (which waits for it, so
    nothing is drawn after the line is cleared)."""

    def __init__(self, fn, interval: float):
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fn, interval), name="edgellama-progress", daemon=True)
        self._thread.start()

    def _run(self, fn, interval: float) -> None:
        while not self._done.wait(interval):
            fn()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


SILENT = Progress(enabled=False, record=False)   # the library default: prints and keeps nothing
