"""Sweep cells as independent Ray tasks (`edgellama sweep --ray ADDRESS`, extra `edgellama[ray]`).

Each cell is one task running `sweep_cell.run_cell` in a Ray worker: one CPU (the plan's
`threads`), and one GPU for a cuda cell, so Ray schedules cuda cells on GPU nodes. Records come
back as the tasks' return values (no shared disk needed) and are handed on as they finish
(`ray.wait`). `max_retries=0`: a worker that dies takes only its own cell, which is recorded as
failed at stage "worker" (a rerun of the sweep runs it again); Ray does not silently redo it.

ADDRESS: "local" starts a Ray instance in this process (or uses the one already started here),
"auto" joins the cluster this machine belongs to (`ray start`), `ray://HOST:10001` goes through
Ray Client. The workers import edgellama from their own environment: every node needs it
installed (docs/scaling.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from edgellama.check.sweep_cell import error_line, new_record, run_cell
from edgellama.check.sweep_plan import Cell
from edgellama.errors import EdgellamaError


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise EdgellamaError("--ray needs Ray: pip install 'edgellama[ray]'") from None
    return ray


@contextlib.contextmanager
def connected(address: str) -> Iterator[Any]:
    """Ray joined or started for `address` (EdgellamaError when it cannot be); a Ray this call
    started is shut down on the way out, one already running in this process is left running."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    try:
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        raise EdgellamaError(f"cannot connect to Ray at {address}: {error_line(e)}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _lost(cell: Cell, e: BaseException) -> dict[str, Any]:
    return new_record(cell, stage="worker", error=f"the Ray task was lost: {error_line(e)}")


def run_on_ray(cells: list[Cell], *, on_result: Callable[[dict[str, Any]], None],
               progress: Callable[[str], None] = lambda _msg: None) -> None:
    """Every cell as a Ray task on the Ray this process is connected to (`connected`);
    `on_result(record)` in the order they finish."""
    ray = import_ray()
    refs: dict[Any, Cell] = {}
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        task = ray.remote(max_retries=0)(run_cell)
        for cell in cells:
            if cell.provider == "cuda" and not gpus:   # Ray would keep it pending forever
                on_result(new_record(cell, stage="schedule", error="the Ray cluster has no GPU for a cuda cell"))
                continue
            opts = {"num_cpus": cell.settings.threads, "num_gpus": 1 if cell.provider == "cuda" else 0}
            refs[task.options(**opts).remote(cell)] = cell
        progress(f"{len(refs)} cells submitted to Ray ({ray.cluster_resources().get('CPU', 0):g} CPUs, {gpus:g} GPUs)")
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                cell = refs.pop(ref)
                try:
                    record = ray.get(ref)
                except ray.exceptions.RayError as e:
                    record = _lost(cell, e)
                on_result(record)
    finally:
        for ref in refs:   # interrupted: the cells still queued or running are not wanted any more
            ray.cancel(ref, force=True)
