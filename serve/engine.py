"""Admission and the worker threads: each generation runs on its own thread, its text pieces handed to
the event loop as they come; a bounded queue in front; cancellation between tokens.

A loaded Generator serves concurrent calls (each call keeps its cache and random generator to
itself), so requests need no lock around the model: `parallel` worker threads run at once, at most
`queue` more wait for one, and a request beyond that is refused with 429 rather than queued without
bound. A slot is freed when its thread ends, which a client's disconnect or the request's deadline
brings about at the next token (the generator is closed there, so its KV cache goes with it).
Requests that can share one call are grouped in front of this by serve/batcher.py: a batch takes one
slot and one thread, its rows count as waiting until it starts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import threading
import time
from typing import Any, Callable

from edgellama.errors import EdgellamaError
from edgellama.serve.errors import APIError


@dataclasses.dataclass
class Stats:
    served: int = 0
    cancelled: int = 0
    timed_out: int = 0
    tokens: int = 0
    batch_sizes: dict[int, int] = dataclasses.field(default_factory=dict)   # rows -> batches the batcher ran

    def batched(self, rows: int) -> None:
        self.batch_sizes[rows] = self.batch_sizes.get(rows, 0) + 1


class Admission:
    """At most `parallel` generations at once and `queue` waiting; `deadline` bounds the wait too."""

    def __init__(self, *, parallel: int, queue: int):
        if parallel < 1 or queue < 0:
            raise EdgellamaError("--parallel must be at least 1 and --queue at least 0")
        self.parallel, self.queue = parallel, queue
        self.active = 0
        self.waiting = 0
        self.stats = Stats()
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="edgellama-gen")
        self._free: asyncio.Semaphore | None = None

    async def acquire(self, deadline: float) -> None:
        self.check_room()
        self.waiting += 1
        try:
            await self.take_slot(deadline)
        except APIError:
            self.stats.timed_out += 1
            raise
        finally:
            self.waiting -= 1

    def check_room(self) -> None:
        """429 when every slot is taken and the queue is full (a request then never waits)."""
        if self._free is None:
            self._free = asyncio.Semaphore(self.parallel)
        if self._free.locked() and self.waiting >= self.queue:
            raise APIError(429, f"the server is busy ({self.active} running, {self.waiting} waiting); retry later",
                           type="requests", code="rate_limit_exceeded")

    async def take_slot(self, deadline: float) -> None:
        """Wait for a free slot until `deadline` (a 504 past it); the caller counts what waited."""
        if self._free is None:
            self._free = asyncio.Semaphore(self.parallel)
        try:
            await asyncio.wait_for(self._free.acquire(), timeout=max(deadline - time.monotonic(), 0.001))
        except (asyncio.TimeoutError, TimeoutError):
            raise timeout_error() from None
        self.active += 1

    def release(self) -> None:
        self.active -= 1
        assert self._free is not None
        self._free.release()

    def snapshot(self) -> dict[str, Any]:
        stats = dataclasses.asdict(self.stats)
        stats["batch_sizes"] = {str(k): v for k, v in sorted(self.stats.batch_sizes.items())}
        return {"running": self.active, "waiting": self.waiting, "parallel": self.parallel, "queue": self.queue,
                **stats}


def timeout_error() -> APIError:
    return APIError(504, "the request timed out (raise the server's --timeout for longer replies)",
                    type="timeout_error", code="timeout")


# What the worker thread sends to the event loop.
PIECE, DONE, ERROR = "piece", "done", "error"


class Job:
    """One generation on a worker thread. `start()` (run there) returns an iterable of (text, logprobs)
    per token with `close()` and `result()`; `events` gets (PIECE, item) for each non-empty item, then
    (DONE, result) or (ERROR, exception). `cancel()` stops it at its next token; the slot is released
    when the thread ends. A batched request is a Job too: the batch's thread emits its events."""

    def __init__(self, start: Callable[[], Any], *, admission: Admission, deadline: float):
        self._start = start
        self._admission = admission
        self.deadline = deadline
        self._cancel = threading.Event()
        self._loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()

    def submit(self) -> None:
        self._admission.pool.submit(self.run)

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def emit(self, kind: str, value: Any) -> None:
        self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def run(self) -> None:
        """The generation, on a worker thread holding a slot (released when it ends)."""
        stats = self._admission.stats
        try:
            running = self._start()
            try:
                for item in running:
                    if self._cancel.is_set():
                        stats.cancelled += 1
                        return
                    if time.monotonic() > self.deadline:
                        stats.timed_out += 1
                        self.emit(ERROR, timeout_error())
                        return
                    if item[0] or item[1]:
                        self.emit(PIECE, item)
            finally:
                running.close()     # ends the call at once on an early return (its cache goes with it)
            res = running.result()
            stats.served += 1
            stats.tokens += len(res.token_ids)
            self.emit(DONE, res)
        except BaseException as e:  # noqa: BLE001 - every failure reaches the request, typed or not
            self.emit(ERROR, e)
        finally:
            self._loop.call_soon_threadsafe(self._admission.release)
