"""What a server is told at start: access key, concurrency, queue, timeout."""

from __future__ import annotations

import dataclasses
import os

from edgellama.errors import EdgellamaError

API_KEY_ENV = "EDGELLAMA_API_KEY"


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """`parallel` generations run at once (worker threads), `queue` more may wait, `timeout` seconds
    bound a request from arrival to its last token; `api_key` None leaves the API open. Requests that
    can share one call and arrive within `batch_window_ms` run as one batch of up to `max_batch` rows
    (serve/batcher.py; `max_batch` 1: never batched)."""

    api_key: str | None = None
    parallel: int = 4
    queue: int = 32
    timeout: float = 600.0
    batch_window_ms: float = 5.0
    max_batch: int = 8

    def __post_init__(self) -> None:
        if self.parallel < 1:
            raise EdgellamaError(f"--parallel must be at least 1, got {self.parallel}")
        if self.queue < 0:
            raise EdgellamaError(f"--queue must be at least 0, got {self.queue}")
        if not self.timeout > 0:
            raise EdgellamaError(f"--timeout must be positive, got {self.timeout}")
        if not 0 <= self.batch_window_ms <= 1000:
            raise EdgellamaError(f"--batch-window-ms must be in 0..1000, got {self.batch_window_ms}")
        if self.max_batch < 1:
            raise EdgellamaError(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.api_key is not None and not self.api_key.strip():
            raise EdgellamaError("the API key is empty")

    @classmethod
    def with_env_key(cls, *, api_key: str | None = None, **fields) -> "ServeSettings":
        """`api_key` if given, else $EDGELLAMA_API_KEY if set (a key on the command line shows in `ps`)."""
        return cls(api_key=api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None, **fields)
