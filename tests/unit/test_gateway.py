"""The gateway's rules: what passes, what is refused and logged, and what passes unchanged."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse

from flowerctl.gateway import FLEET_PATHS, Gateway, allowed, configure_logging

SIGNED = {  # Flower's node-auth headers: they must reach the SuperLink byte for byte
    "flwr-public-key": "QUJD+/==",
    "flwr-signature": "c2lnbmF0dXJl",
    "flwr-timestamp": "2026-11-30T10:00:00.000001+00:00",
}


def test_every_fleet_route_and_health_pass_and_nothing_else():
    assert "/v1/fleet/push-messages" in FLEET_PATHS and len(FLEET_PATHS) >= 10
    for path in FLEET_PATHS:
        assert allowed("POST", path.encode(), b"")
        assert not allowed("GET", path.encode(), b"")
        assert not allowed("POST", path.encode(), b"x=1")
    assert allowed("GET", b"/health", b"") and allowed("HEAD", b"/health", b"")
    for raw in (
        b"/docs",
        b"/openapi.json",
        b"/v1/control/list-nodes",
        b"/v1/runtime/acquire-task",
        b"/v1/fleet/../control/list-nodes",
        b"/v1/fleet/%2e%2e/control/list-nodes",
        b"/v1/fleet/push-messages/",
        b"//v1/fleet/push-messages",
        b"/V1/FLEET/PUSH-MESSAGES",
        b"/health/",
    ):
        assert not allowed("POST", raw, b"") and not allowed("GET", raw, b""), raw


async def _echo(scope, receive, send):
    """Stands in for the SuperLink: answers with what it received."""
    request = Request(scope, receive)
    body = await request.body()
    headers = {k.decode(): v.decode() for k, v in scope["headers"]}
    reply = {"path": scope["path"], "headers": headers, "size": len(body)}
    status = 401 if scope["path"] == "/v1/fleet/pull-messages" else 200  # a bad node signature
    await JSONResponse(reply, status, headers={"x-upstream": "yes"})(scope, receive, send)


def _through(gateway: Gateway, method: str, path: str, **kwargs) -> httpx.Response:
    async def go() -> httpx.Response:
        gateway.client = httpx.AsyncClient(
            base_url="https://superlink", transport=httpx.ASGITransport(app=_echo)
        )
        transport = httpx.ASGITransport(app=gateway, client=("10.0.0.7", 4242))
        async with httpx.AsyncClient(base_url="https://gateway", transport=transport) as c:
            try:
                return await c.request(method, path, **kwargs)
            finally:
                await gateway.client.aclose()

    return asyncio.run(go())


@pytest.fixture
def gateway(tmp_path):
    refusals = logging.getLogger(f"test.gateway.{tmp_path.name}")
    handler = logging.FileHandler(tmp_path / "refused.log")
    refusals.addHandler(handler)
    yield Gateway("superlink", None, refusals), tmp_path / "refused.log"
    refusals.removeHandler(handler)
    handler.close()


def test_a_fleet_call_passes_with_its_signature_and_body_unchanged(gateway):
    gw, log = gateway
    body = bytes(range(256)) * 40_000  # ~10 MB, like a model's weights
    headers = {**SIGNED, "x-forwarded-for": "1.2.3.4", "content-type": "application/protobuf"}
    resp = _through(gw, "POST", "/v1/fleet/push-object", content=body, headers=headers)
    assert resp.status_code == 200 and resp.headers["x-upstream"] == "yes"
    seen = resp.json()
    assert seen["path"] == "/v1/fleet/push-object" and seen["size"] == len(body)
    for name, value in SIGNED.items():
        assert seen["headers"][name] == value
    assert seen["headers"]["content-type"] == "application/protobuf"
    # the caller's own claim of an address is dropped; the real one is sent
    assert seen["headers"]["x-forwarded-for"] == "10.0.0.7"
    assert not log.read_text()


def test_a_refusal_is_a_403_and_one_log_line_naming_method_path_and_caller(gateway):
    gw, log = gateway
    for path in ("/v1/control/list-nodes", "/v1/runtime/acquire-task?x=%0Aforged"):
        resp = _through(gw, "POST", path)
        assert resp.status_code == 403 and resp.text == "forbidden\n"
    lines = log.read_text().splitlines()
    assert len(lines) == 2, lines
    assert lines[0] == "refused #1: POST '/v1/control/list-nodes' from 10.0.0.7:4242"
    assert lines[1].startswith("refused #2: POST '/v1/runtime/acquire-task?x=")


def test_an_upstream_refusal_is_logged_with_the_caller_and_passed_calls_are_not(
    gateway, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw, _ = gateway
    for name in ("httpx", "httpcore"):  # restored after the test
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
    monkeypatch.setattr(logging.getLogger(), "handlers", list(logging.getLogger().handlers))
    configure_logging()
    with caplog.at_level(logging.INFO):
        assert _through(gw, "POST", "/v1/fleet/pull-messages").status_code == 401
        assert _through(gw, "POST", "/v1/fleet/push-object", content=b"x").status_code == 200
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "POST /v1/fleet/pull-messages from 10.0.0.7: the SuperLink answered HTTP 401"
    ], lines
