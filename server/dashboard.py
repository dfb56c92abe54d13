"""``idc-server dashboard``: a read-only web page of the federation, served on loopback only.

Three GET routes: ``/`` (one HTML page, no external resources, whose small script polls),
``/api/state`` (:func:`server.dashboard_view.snapshot` as JSON) and ``/curves.svg`` (the
rounds so far, drawn by matplotlib on the server). Any other method gets 405, any other
path 404. The server binds 127.0.0.1 and nothing else: no new port faces the network, so a
coordinator opens it from elsewhere through an SSH tunnel. Only ``Host: 127.0.0.1`` or
``localhost`` is served, so a web page elsewhere cannot read it through DNS rebinding.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from common.cli_util import one_line
from common.errors import EXIT_OK
from common.paths import CoordPaths
from server.dashboard_page import PAGE
from server.dashboard_view import curves_svg, snapshot

log = logging.getLogger(__name__)
HOST = "127.0.0.1"  # never anything else: see the module docstring
DEFAULT_PORT = 8765
MAX_PORT = 65535
POLL_MS = 2000


class GetOnly:
    """ASGI middleware: every method but GET (and HEAD, its header-only form) gets 405."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # noqa: D102
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD"):
            response = PlainTextResponse(
                "read-only dashboard: GET only", 405, headers={"Allow": "GET"}
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def unreadable(exc: Exception) -> Response:
    """A damaged or missing file of the folder: one line on the page and the console."""
    line = one_line(exc)
    log.warning("dashboard: %s", line)  # never the server's traceback
    return JSONResponse({"error": line}, 503, headers={"Cache-Control": "no-store"})


def make_app(root: Path) -> Starlette:
    """The dashboard of the coordinator folder ``root``."""

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE.replace("__POLL_MS__", str(POLL_MS)))

    async def state(request: Request) -> Response:
        # Reads files and asks the SuperLink: off the event loop.
        try:
            data = await asyncio.to_thread(snapshot, root)
        except (OSError, ValueError) as exc:
            return unreadable(exc)
        return JSONResponse(data, headers={"Cache-Control": "no-store"})

    async def curves(request: Request) -> Response:
        def draw() -> str:
            from common.rundir import RunDir
            from server.runrecord import latest

            found = latest(CoordPaths(root))
            rows = RunDir(found[0]).read_rounds() if found else []
            title = f"run {found[1]}: rounds so far" if found else "no run yet"
            return curves_svg(rows, title)

        try:
            svg = await asyncio.to_thread(draw)
        except (OSError, ValueError) as exc:
            return unreadable(exc)
        return Response(svg, media_type="image/svg+xml", headers={"Cache-Control": "no-store"})

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/api/state", state, methods=["GET"]),
        Route("/curves.svg", curves, methods=["GET"]),
    ]
    middleware = [
        Middleware(GetOnly),
        Middleware(TrustedHostMiddleware, allowed_hosts=[HOST, "localhost"]),
    ]
    return Starlette(routes=routes, middleware=middleware)


def bind(port: int) -> socket.socket:
    """A listening socket on loopback (``port`` 0: a free one); OSError names a taken port."""
    if not 0 <= port <= MAX_PORT:  # socket's own error is an OverflowError: not a bad input
        raise ValueError(
            f"--port {port} is not a port number; give 1-{MAX_PORT}, or --port 0 for a free one"
        )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, port))
    except OSError as exc:
        sock.close()
        raise OSError(
            f"--port {port}: cannot listen on {HOST}:{port} ({exc.strerror}); choose another "
            "--port, or --port 0 for a free one"
        ) from None
    sock.listen(64)
    return sock


def dashboard(args: argparse.Namespace) -> int:
    """``idc-server dashboard``: serve the page until Ctrl-C."""
    import uvicorn

    paths = CoordPaths(args.dir).require()
    sock = bind(args.port)
    port = sock.getsockname()[1]
    print(f"dashboard of {paths.root}: http://{HOST}:{port}/ (read-only, loopback only)")
    print(
        f"from another machine: ssh -N -L {port}:{HOST}:{port} USER@COORDINATOR, then open "
        f"http://localhost:{port}/ there; Ctrl-C stops it",
        flush=True,
    )
    config = uvicorn.Config(make_app(paths.root), log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
    return EXIT_OK


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``idc-server dashboard``."""
    from common.cli_util import add_command

    p = add_command(
        sub,
        "dashboard",
        dashboard,
        "a read-only web page of sites, rounds, curves, privacy and the audit chain, on "
        f"{HOST} only: open it through an SSH tunnel (no new port faces the network)",
    )
    p.add_argument(
        "--dir",
        "--coord-dir",
        dest="dir",
        type=Path,
        required=True,
        help="the coordinator's folder",
    )
    p.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port on {HOST} (default: %(default)s; 0: any free port, printed)",
    )
