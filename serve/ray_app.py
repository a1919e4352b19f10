"""The same app as a Ray Serve deployment: N replicas, each loading the model folders once and serving
them with its own worker threads and queue; Ray's proxy spreads requests over the replicas.

Every node that runs a replica must see the model folders at the same path (a shared or copied
folder) and have edgellama installed with its `serve` extra: Ray ships this code, not the models.
"""

from __future__ import annotations

import socket
import sys
import time
from typing import Any, Sequence

from edgellama.serve.models import parse_specs
from edgellama.serve.settings import ServeSettings

APP_NAME = "edgellama"


def build(specs: Sequence[str], *, replicas: int, provider: str, threads: int | None, settings: ServeSettings,
          chat_sessions: int = 4) -> Any:
    """The bound deployment (`serve.run` it). GPU replicas ask Ray for one GPU each, so Ray places them
    on GPU nodes and never two on one GPU."""
    from ray import serve

    # Absolute paths: a replica's working directory is not the caller's.
    specs = [f"{name}={path.resolve()}" for name, path in parse_specs(specs)]
    options = {"num_cpus": 1, "num_gpus": 1 if provider == "cuda" else 0}

    @serve.deployment(name="edgellama", num_replicas=replicas, ray_actor_options=options,
                      max_ongoing_requests=settings.parallel + settings.queue)
    @serve.ingress()
    class EdgellamaServer:
        def __init__(self) -> None:
            from edgellama.serve.app import create_app
            from edgellama.serve.models import load_models

            self._app = create_app(load_models(specs, provider=provider, threads=threads,
                                               chat_sessions=chat_sessions), settings)

        def __serve_build_asgi_app__(self) -> Any:
            return self._app

    return EdgellamaServer.bind()


def start(specs: Sequence[str], *, replicas: int, provider: str, threads: int | None, settings: ServeSettings,
          host: str, port: int, chat_sessions: int = 4) -> str:
    """Deploy on the Ray instance this process is connected to; returns the base URL once replicas are up."""
    from ray import serve

    port = port or _free_port(host)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build(specs, replicas=replicas, provider=provider, threads=threads, settings=settings,
                    chat_sessions=chat_sessions),
              name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{host}:{port}/v1"


def stop() -> None:
    """Delete the deployment: Ray Serve lets each replica finish its requests in flight first."""
    from ray import serve

    serve.delete(APP_NAME)


def serve_on_ray(specs: Sequence[str], *, address: str, replicas: int, provider: str, threads: int | None,
                 settings: ServeSettings, host: str, port: int, chat_sessions: int = 4) -> int:
    """`edgellama serve --ray ADDRESS`: deploy, then wait for SIGINT/SIGTERM and remove the deployment."""
    import ray

    local = address == "local"
    ray.init(address=None if local else address, include_dashboard=False if local else None,
             ignore_reinit_error=True, log_to_driver=False)
    try:
        url = start(specs, replicas=replicas, provider=provider, threads=threads, settings=settings,
                    host=host, port=port, chat_sessions=chat_sessions)
        print(f"edgellama: serving {', '.join(n for n, _ in parse_specs(specs))} on Ray Serve "
              f"({replicas} replica{'s' * (replicas != 1)}) at {url}", file=sys.stderr, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:   # the CLI turns SIGTERM into this too
            stop()
            raise
    finally:
        if local:
            ray.shutdown()


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


