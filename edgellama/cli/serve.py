"""Serve model folders over an OpenAI-compatible HTTP API (FastAPI + uvicorn, or Ray Serve replicas).

MODEL is a folder written by `edgellama export` or `edgellama quantize`, served under the folder's
name, or NAME=PATH. Routes: /v1/chat/completions and /v1/completions (stream=true streams
server-sent events), /v1/models, /health. Binds 127.0.0.1 unless --host says otherwise; with
--api-key (or $EDGELLAMA_API_KEY) every /v1 route wants `Authorization: Bearer KEY`. --parallel
generations run at once and --queue more wait (beyond that: 429); --timeout bounds a request.
Requests arriving within --batch-window-ms that can share one call (same sampling settings; no
constraint, no kept chat session to continue) run as one batch of up to --max-batch rows.
A client that resends a conversation this server answered reuses its KV cache (--chat-sessions
kept per model; usage.prompt_tokens_details.cached_tokens says how many prompt tokens it saved).
SIGINT/SIGTERM stop accepting connections and finish the replies in flight. --port 0 picks a free
port (printed). --ray ADDRESS ("local" starts a Ray instance here; "auto" or ray://...) runs the
same app as a Ray Serve deployment of --replicas replicas (one GPU each with --provider cuda).
Needs the `serve` extra (and `ray` for --ray).
"""

from __future__ import annotations

import argparse
import sys

from edgellama.errors import EdgellamaError
from edgellama.runtime.session import PROVIDERS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", metavar="MODEL", nargs="+", help="model folder, or NAME=PATH")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0 = a free one, printed)")
    p.add_argument("--provider", default="auto", choices=PROVIDERS)
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--api-key", default=None, help="require this key (default: $EDGELLAMA_API_KEY if set)")
    p.add_argument("--parallel", type=int, default=4, metavar="N", help="generations running at once (default 4)")
    p.add_argument("--queue", type=int, default=32, metavar="N", help="requests waiting for a slot (default 32)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S", help="seconds per request (default 600)")
    p.add_argument("--batch-window-ms", type=float, default=5.0, metavar="MS",
                   help="requests that can share one call and arrive within MS run as one batch (default 5)")
    p.add_argument("--max-batch", type=int, default=8, metavar="N", help="rows per batch at most (1: no batching; "
                   "default 8)")
    p.add_argument("--chat-sessions", type=int, default=4, metavar="N",
                   help="idle conversations kept per model with their KV cache, for clients that resend "
                        "them (default 4)")
    p.add_argument("--ray", default=None, metavar="ADDRESS", help="deploy on Ray Serve: local, auto or ray://host:port")
    p.add_argument("--replicas", type=int, default=1, metavar="N", help="Ray Serve replicas (with --ray)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def run(args: argparse.Namespace) -> int:
    from edgellama.serve.models import parse_specs
    from edgellama.serve.settings import ServeSettings

    if not 0 <= args.port <= 65535:
        raise EdgellamaError(f"--port must be in 0..65535, got {args.port}")
    if args.chat_sessions < 0:
        raise EdgellamaError(f"--chat-sessions must be at least 0, got {args.chat_sessions}")
    if args.replicas < 1:
        raise EdgellamaError(f"--replicas must be at least 1, got {args.replicas}")
    if args.replicas != 1 and args.ray is None:
        raise EdgellamaError("--replicas needs --ray (one process serves one replica)")
    parse_specs(args.models)   # names checked before anything loads
    settings = ServeSettings.with_env_key(api_key=args.api_key, parallel=args.parallel, queue=args.queue,
                                          timeout=args.timeout, batch_window_ms=args.batch_window_ms,
                                          max_batch=args.max_batch)
    _need("fastapi", "uvicorn")
    if args.ray is not None:
        _need("ray")
        from edgellama.serve.ray_app import serve_on_ray

        return serve_on_ray(args.models, address=args.ray, replicas=args.replicas, provider=args.provider,
                            threads=args.threads, chat_sessions=args.chat_sessions, settings=settings,
                            host=args.host, port=args.port)
    return _serve_here(args, settings)


def _serve_here(args: argparse.Namespace, settings) -> int:
    import socket

    import uvicorn

    from edgellama.serve.app import create_app
    from edgellama.serve.models import load_models

    app = create_app(load_models(args.models, provider=args.provider, threads=args.threads,
                                 chat_sessions=args.chat_sessions), settings)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        raise EdgellamaError(f"cannot listen on {args.host}:{args.port} ({e.strerror})") from None
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if family == socket.AF_INET6 else args.host
    print(f"edgellama: serving {', '.join(app.state.models)} at http://{host}:{port}/v1", file=sys.stderr, flush=True)
    # timeout_graceful_shutdown None: on SIGTERM/SIGINT uvicorn stops accepting and waits for every
    # reply in flight, however long it streams.
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=None, access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _need(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        extra = "ray" if "ray" in missing else "serve"
        raise EdgellamaError(f"edgellama serve needs {', '.join(missing)}: pip install 'edgellama[{extra}]'")
