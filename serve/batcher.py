"""Micro-batching: requests that can share one Generator call and arrive close together run as one
batch, each row streamed to its own client.

A batch of 8 greedy prompts in one call costs a fraction of the 8 run one after another (the weights
are read once per step for every row), and each row generates what it would alone: rows are padded
(left for the dynamic cache, right for the static one, as the Generator does) and a call keeps per
row what may differ between requests: max_tokens, stop strings, and the seed (one random generator
per row, runtime/call.py). Everything else (model, temperature/top_k/top_p, repetition penalty, eos,
logprobs) is the batch key, `generation.Call.batch_key()`; a request without one (a constraint, a
chat turn that may continue a kept session) runs alone as before.

The first request of a key opens a group; it collects rows for `window_ms`, or until `max_batch` rows
or a row that would not fit the context beside the others, and then waits for a slot. While every slot
is busy the group stays open, so requests that queue up behind running ones share a batch even with a
window of 0. A group of one row runs as a plain request (a chat first turn then keeps its session).
In a batch, a row that finishes is answered at once and the batch goes on for the others; a row whose
client leaves or whose deadline passes is dropped at the next token (`Call.drop`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from edgellama.runtime.call import Call as BatchCall
from edgellama.serve.engine import DONE, ERROR, PIECE, Admission, Job, timeout_error
from edgellama.serve.errors import APIError
from edgellama.serve.generation import Call


@dataclasses.dataclass
class _Group:
    key: tuple
    jobs: list[Job] = dataclasses.field(default_factory=list)
    calls: list[Call] = dataclasses.field(default_factory=list)
    closed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def fits(self, call: Call) -> bool:
        """One call prefills every row to the longest prompt and runs to the longest max_tokens."""
        calls = [*self.calls, call]
        return max(c.prompt_tokens for c in calls) + max(c.max_new_tokens for c in calls) <= call.model.context

    def drop_late(self, now: float) -> list[Job]:
        late = [j for j in self.jobs if j.deadline <= now]
        keep = [(j, c) for j, c in zip(self.jobs, self.calls) if j.deadline > now]
        self.jobs, self.calls = [j for j, _ in keep], [c for _, c in keep]
        return late


class Batcher:
    """Starts each request: alone (`Admission.acquire` then a Job) or as a row of a group."""

    def __init__(self, admission: Admission, *, window_ms: float, max_batch: int):
        self.admission = admission
        self.window = window_ms / 1e3
        self.max_batch = max_batch
        self._open: dict[tuple, _Group] = {}
        self._tasks: set[asyncio.Task] = set()

    async def start(self, call: Call, *, deadline: float) -> Job:
        """The request's Job, started or waiting in a group; its events come as a lone Job's do."""
        key = call.batch_key() if self.max_batch > 1 else None
        if key is None:
            await self.admission.acquire(deadline)
            job = Job(call.start, admission=self.admission, deadline=deadline)
            job.submit()
            return job
        self.admission.check_room()
        job = Job(call.start, admission=self.admission, deadline=deadline)
        group = self._open.get(key)
        if group is not None and not group.fits(call):
            self._close(group)
            group = None
        if group is None:
            group = self._open[key] = _Group(key)
            task = asyncio.get_running_loop().create_task(self._dispatch(group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        group.jobs.append(job)
        group.calls.append(call)
        self.admission.waiting += 1
        if len(group.jobs) >= self.max_batch:
            self._close(group)
        return job

    def _close(self, group: _Group) -> None:
        """No more rows join `group` (it runs once it has a slot)."""
        if self._open.get(group.key) is group:
            del self._open[group.key]
        group.closed.set()

    async def _dispatch(self, group: _Group) -> None:
        admission = self.admission
        if self.window > 0:
            try:
                await asyncio.wait_for(group.closed.wait(), timeout=self.window)
            except (asyncio.TimeoutError, TimeoutError):
                pass
        while True:
            try:
                await admission.take_slot(min(j.deadline for j in group.jobs))
                break
            except APIError as e:
                # The earliest deadline passed while every slot was busy: those rows get their 504,
                # the others wait on.
                for job in group.drop_late(time.monotonic()):
                    admission.waiting -= 1
                    admission.stats.timed_out += 1
                    job.emit(ERROR, e)
                if not group.jobs:
                    self._close(group)
                    return
        self._close(group)
        admission.waiting -= len(group.jobs)
        admission.stats.batched(len(group.jobs))
        if len(group.jobs) == 1:
            admission.pool.submit(group.jobs[0].run)
        else:
            admission.pool.submit(_run_batch, group.jobs, group.calls, admission, asyncio.get_running_loop())


def _run_batch(jobs: list[Job], calls: list[Call], admission: Admission, loop: asyncio.AbstractEventLoop) -> None:
    """One call for every row, on a worker thread holding one slot; each row reported to its own Job."""
    stats = admission.stats
    rows: dict[int, Job] = {}       # the rows still reported, by their index in the call
    try:
        live = []
        for job, call in zip(jobs, calls):
            if job.cancelled:
                stats.cancelled += 1
            elif time.monotonic() > job.deadline:
                stats.timed_out += 1
                job.emit(ERROR, timeout_error())
            else:
                rows[len(live)] = job
                live.append(call)
        if not live:
            return
        run = BatchCall(live[0].model.generator, [c.ids for c in live], options=[c.options for c in live], text=True)
        sent = [0] * len(live)

        def report(i: int, *, final: bool) -> None:
            job = rows[i]
            text = run.take_text(i, final=final)
            lps = run.logprobs[i][sent[i]:] if run.logprobs is not None else []
            sent[i] += len(lps)
            if text or lps:
                job.emit(PIECE, (text, lps))
            if final:
                result = run.result(i)
                stats.served += 1
                stats.tokens += len(result.token_ids)
                del rows[i]
                job.emit(DONE, result)

        for _ in run.steps():
            now = time.monotonic()
            for i, job in list(rows.items()):
                if job.cancelled:
                    run.drop(i)
                    stats.cancelled += 1
                    del rows[i]
                elif now > job.deadline:
                    run.drop(i)
                    stats.timed_out += 1
                    del rows[i]
                    job.emit(ERROR, timeout_error())
                else:
                    report(i, final=run.done[i])
        for i in list(rows):
            report(i, final=True)
    except BaseException as e:  # noqa: BLE001 - every failure reaches the requests, typed or not
        for job in rows.values():
            job.emit(ERROR, e)
    finally:
        loop.call_soon_threadsafe(admission.release)
