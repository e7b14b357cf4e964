"""`blockdraft serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one Decoder.

    >>> from blockdraft.serve import BackgroundServer, Service, create_app
    >>> with BackgroundServer(create_app(Service(decoder, "my-model"))) as base_url:
    ...     openai.OpenAI(base_url=base_url, api_key="none").chat.completions.create(...)

Needs the `serve` extra (`pip install 'blockdraft[serve]'`); schema.py holds the request
bodies, app.py the routes, this module the command line and the server runner.
"""
from __future__ import annotations

import argparse
import socket
import threading
from collections.abc import Callable

from ..errors import BlockdraftError
from ..sampling import add_arguments as add_sampling_arguments, from_arguments

__all__ = ["BackgroundServer", "Service", "add_parser", "bind", "cmd_serve", "create_app"]


def _require_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise BlockdraftError("`blockdraft serve` needs FastAPI and uvicorn: pip install 'blockdraft[serve]'") from None


def __getattr__(name: str):
    """Service and create_app import FastAPI: only when asked for."""
    if name in ("Service", "create_app"):
        _require_extra()
        from . import app
        return getattr(app, name)
    raise AttributeError(name)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free port the system picks); one line if it cannot."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)  # clients that connect before the server runs wait in the backlog
    except OSError as exc:
        raise BlockdraftError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/v1"


class BackgroundServer:
    """Runs an app with uvicorn in a thread on a loopback port; a context manager giving the base URL.

    For tests and notebooks: the server stops (and the port closes) when the block ends.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = bind(host, port)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.url = _url(self.sock)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise BlockdraftError("the server stopped while starting")
            self.thread.join(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def cmd_serve(args: argparse.Namespace) -> None:
    _require_extra()
    import uvicorn

    import blockdraft

    from ..methods import parse
    from .app import Service, create_app

    parse(args.method)  # a bad name fails before the model loads
    sampling = from_arguments(args)
    if args.max_new_tokens <= 0:
        raise BlockdraftError(f"max_new_tokens must be positive, got {args.max_new_tokens}")
    sock = bind(args.host, args.port)
    dec = blockdraft.load(args.model, heads=args.heads or "default", dtype=args.dtype, device=args.device, eagle=args.eagle,
                          offline=args.offline)
    service = Service(dec, args.model_id or args.model, args.method, args.max_new_tokens, sampling)
    service.check_ready()
    print(f"blockdraft: serving {dec.loaded.label} as {service.model_id!r} (method {args.method}) at {_url(sock)}; "
          "one request at a time", flush=True)
    config = uvicorn.Config(create_app(service), log_level=args.log_level)
    uvicorn.Server(config).run(sockets=[sock])


def add_parser(sub, model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """The `serve` subcommand (model_args adds --model, --dtype, --device and --offline)."""
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models)")
    model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0 picks a free one)")
    p.add_argument("--method", default="fast", help="decoding method of requests that name none (default: %(default)s)")
    p.add_argument("--heads", default=None, help="draft heads folder (default: the shipped heads for the model)")
    p.add_argument("--eagle", default=None, help="eagle drafter folder for the eagle methods (default: the shipped one for the model)")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="answer length for requests without max_tokens (default: %(default)s, as generate)")
    p.add_argument("--model-id", default=None, help="the model name clients send and /v1/models lists (default: --model)")
    add_sampling_arguments(p)  # the defaults of requests that leave temperature, top_k, top_p or seed out
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

