"""The coordinator's public front: TLS, the Fleet API and ``/health`` passed on, all else refused.

Flower 1.42's SuperLink serves every API on one port (Fleet, Control, Runtime, ``/docs``,
``/openapi.json``), and its open-source Control and Runtime APIs have no login. So the
SuperLink binds loopback and this gateway is the only listener the network sees. Contract:

- **Passed on**, unchanged: ``POST`` to exactly the Fleet routes of the installed Flower (read
  from Flower's own router, so an upgrade that adds one is followed) and ``GET``/``HEAD
  /health``. The path goes upstream as sent, with every end-to-end header (Flower signs each
  Fleet request with the node key: the public-key, signature and timestamp headers must
  arrive intact) and the body streamed both ways (model weights are ~10 MB a message).
- **Refused** (403): every other method, path or query string, matched on the raw request
  path, so ``..``, percent-encoding or doubled slashes never reach a route they were not
  meant for. Each refusal is one line in the refusal log: time, running count, method, path
  (quoted), client address. Its body says nothing about what is behind.
- The caller's address goes upstream as ``X-Forwarded-For`` (a caller's own is dropped): the
  SuperLink's uvicorn trusts it from 127.0.0.1, so its access log names the hospital.
- Upstream is the loopback SuperLink over TLS, verified with the federation's CA (Flower
  refuses SuperNode authentication without TLS); 502 if it cannot be reached.

Why uvicorn + starlette + httpx and not a hand-written proxy or nginx: they are the very
libraries the SuperLink serves with (uvicorn, with httptools/uvloop parsing HTTP in C) and the
SuperNode dials with (httpx), so keep-alive, body sizes and timeouts behave as they do without
the front; they come with Flower, so ``make setup`` and the images need no root-only system
package; and the allow-list is derived in code from Flower's router instead of copied into
another product's configuration. Limit: the SuperLink's loopback listener itself has no login,
so every user of the coordinator host can reach its Control API (as before, only on loopback).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from flwr.superlink.routers.fleet.router import router as fleet_router
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse

from flowerctl.processes import _popen
from flowerctl.tls import TlsPaths

log = logging.getLogger(__name__)
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

FLEET_PATHS = frozenset(str(getattr(route, "path", "")) for route in fleet_router.routes)
HEALTH = "/health"
# Per-connection headers (RFC 9110 7.6.1), and the forwarding headers we set ourselves.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-real-ip",
    }
)
UPSTREAM_TIMEOUT = httpx.Timeout(120.0, connect=10.0)  # a SuperNode's own call gives up at 30 s


def allowed(method: str, raw_path: bytes, query: bytes) -> bool:
    """Whether a request may pass: a Fleet route by POST, or the health check."""
    if query:
        return False
    path = raw_path.decode("latin-1")
    return (method == "POST" and path in FLEET_PATHS) or (
        method in ("GET", "HEAD") and path == HEALTH
    )


class Gateway:
    """The ASGI application: forward what :func:`allowed` lets through, refuse and log the rest."""

    def __init__(self, upstream: str, ca_cert: Path | None, refusals: logging.Logger) -> None:
        self.base_url = f"{'https' if ca_cert else 'http'}://{upstream}"
        self.ca_cert = ca_cert
        self.refusals = refusals
        self.count = itertools.count(1)
        self.client: httpx.AsyncClient | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # noqa: D102
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        raw = scope.get("raw_path") or scope["path"].encode()
        method = scope.get("method", "WEBSOCKET")
        if scope["type"] != "http" or not allowed(method, raw, scope.get("query_string", b"")):
            response: Response = self._refuse(scope, method, raw)
        else:
            response = await self._forward(scope, receive, raw.decode("latin-1"))
        await response(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                verify: ssl.SSLContext | bool = (
                    ssl.create_default_context(cafile=str(self.ca_cert)) if self.ca_cert else False
                )
                self.client = httpx.AsyncClient(
                    base_url=self.base_url, verify=verify, timeout=UPSTREAM_TIMEOUT
                )
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _refuse(self, scope: Scope, method: str, raw: bytes) -> Response:
        host, port = scope.get("client") or ("?", 0)
        query = scope.get("query_string", b"")
        target = raw + (b"?" + query if query else b"")
        # repr(): a path is attacker-chosen text and must stay on its line
        self.refusals.warning(
            "refused #%d: %s %r from %s:%s",
            next(self.count),
            method,
            target.decode("latin-1"),
            host,
            port,
        )
        return PlainTextResponse("forbidden\n", status_code=403)

    async def _forward(self, scope: Scope, receive: Receive, path: str) -> Response:
        if self.client is None:
            return PlainTextResponse("gateway not started\n", status_code=503)
        headers = [
            (k, v) for k, v in scope["headers"] if k.decode("latin-1").lower() not in HOP_BY_HOP
        ]
        host = (scope.get("client") or ("unknown",))[0]
        scheme = str(scope.get("scheme", "http")).encode()
        headers += [(b"x-forwarded-for", str(host).encode()), (b"x-forwarded-proto", scheme)]
        body = Request(scope, receive).stream() if scope["method"] == "POST" else None
        request = self.client.build_request(scope["method"], path, headers=headers, content=body)
        try:
            upstream = await self.client.send(request, stream=True)
        except httpx.HTTPError as err:
            log.warning("SuperLink at %s unreachable for %s: %r", self.base_url, path, err)
            return PlainTextResponse("SuperLink unreachable\n", status_code=502)
        if upstream.status_code >= 400:  # e.g. a node signature the SuperLink did not accept
            log.warning(
                "%s %s from %s: the SuperLink answered HTTP %d",
                scope["method"],
                path,
                host,
                upstream.status_code,
            )
        response = StreamingResponse(
            upstream.aiter_raw(),
            status_code=upstream.status_code,
            background=BackgroundTask(upstream.aclose),
        )
        response.raw_headers = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in upstream.headers.multi_items()
            if k.lower() not in HOP_BY_HOP
        ]
        return response


def _refusal_logger(path: Path) -> logging.Logger:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    refusals = logging.getLogger("idc.gateway.refused")
    refusals.addHandler(handler)
    refusals.setLevel(logging.INFO)
    return refusals


def serve(
    listen: str, upstream: str, tls: TlsPaths | None, refusal_log: Path
) -> None:  # pragma: no cover - runs in its own process
    """Serve the gateway on ``listen`` (HOST:PORT) in front of the SuperLink at ``upstream``."""
    host, _, port = listen.rpartition(":")
    app = Gateway(upstream, tls.ca_cert if tls else None, _refusal_logger(refusal_log))
    uvicorn.run(
        app,
        host=host,
        port=int(port),
        ssl_certfile=str(tls.server_cert) if tls else None,
        ssl_keyfile=str(tls.server_key) if tls else None,
        proxy_headers=False,  # the caller's own X-Forwarded-For must never name its address
        server_header=False,
        ws="none",  # no WebSocket upgrades: such a request is plain HTTP here, and refused
        lifespan="on",
        access_log=False,  # the SuperLink logs what passes; refusals have their own log
        timeout_keep_alive=30,
    )


def start_gateway(
    listen: str, upstream: str, tls: TlsPaths | None, log_path: Path, refusal_log: Path
) -> subprocess.Popen[bytes]:
    """Start the gateway in a process of its own (stop it with ``stop_process``)."""
    cmd = [sys.executable, "-m", "flowerctl.gateway", "--listen", listen, "--upstream", upstream]
    cmd += ["--refusal-log", str(Path(refusal_log).resolve())]
    if tls is not None:
        cmd += ["--ca", str(tls.ca_cert), "--cert", str(tls.server_cert)]
        cmd += ["--key", str(tls.server_key)]
    cwd = Path(log_path).resolve().parent
    cwd.mkdir(parents=True, exist_ok=True)
    return _popen(cmd, dict(os.environ), cwd, log_path)


def configure_logging() -> None:
    """The gateway process's log: its own events, not one line per request that passed.

    httpx logs every upstream call at INFO: with each site polling twice a second that grew
    ``gateway.log`` by about 60 MB a day for three idle sites. What passes is the SuperLink's
    to log; requests it answered with an error are logged here (see ``Gateway._forward``).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - the process entry point
    """``python -m flowerctl.gateway``: the process :func:`start_gateway` runs."""
    p = argparse.ArgumentParser(prog="flowerctl.gateway", description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, help="public HOST:PORT")
    p.add_argument("--upstream", required=True, help="the SuperLink's loopback HOST:PORT")
    p.add_argument("--refusal-log", type=Path, required=True)
    p.add_argument("--ca", type=Path, default=None, help="omit all three for plain HTTP")
    p.add_argument("--cert", type=Path, default=None)
    p.add_argument("--key", type=Path, default=None)
    args = p.parse_args(argv)
    tls = None
    if args.ca or args.cert or args.key:
        if not (args.ca and args.cert and args.key):
            p.error("give --ca, --cert and --key together (or none for plain HTTP)")
        tls = TlsPaths(args.ca, Path(), args.cert, args.key)
    configure_logging()
    serve(args.listen, args.upstream, tls, args.refusal_log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
