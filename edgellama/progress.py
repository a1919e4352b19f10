"""Step-by-step progress on stderr for work that takes seconds (export, quantize, bench)."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator


class Progress:
    """Prints `[edgellama] step ... done (1.2 s)` lines; silent when `enabled` is False."""

    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        start = time.perf_counter()
        if self.enabled:
            print(f"[edgellama] {what} ...", file=self.stream, flush=True)
        yield
        if self.enabled:
            print(f"[edgellama] {what}: done ({time.perf_counter() - start:.1f} s)", file=self.stream, flush=True)

    def note(self, text: str) -> None:
        if self.enabled:
            print(f"[edgellama] {text}", file=self.stream, flush=True)


SILENT = Progress(enabled=False)
