"""A client that goes away mid-request gets its engine request aborted.

The app is driven as raw ASGI so the test decides exactly when the client disconnects,
under both ways Starlette learns of it: an ``http.disconnect`` message (ASGI spec < 2.4,
what uvicorn speaks) and a failing ``send`` (spec 2.4)."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

# The HTTP server's dependencies: absent on the GPU machine, where these tests skip.
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from starlette.requests import ClientDisconnect

from distserve_rt.entrypoints.openai import build_app

pytestmark = pytest.mark.anyio


async def drive(app, path: str, body: dict, spec_version: str, disconnect: asyncio.Event):
    """Runs one request; after `disconnect` is set the client is gone. Returns the bodies
    the app sent."""
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]
    sent: list[bytes] = []

    async def receive():
        if messages:
            return messages.pop(0)
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if disconnect.is_set() and spec_version == "2.4":
            raise OSError("connection closed")
        if message["type"] == "http.response.body" and message.get("body"):
            sent.append(message["body"])
            disconnect.set()  # the client leaves right after its first chunk

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
        "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
        "client": ("127.0.0.1", 5000), "server": ("test", 80),
    }  # fmt: skip
    # Spec 2.4: Starlette reports the failed send as the client's disconnect.
    with contextlib.suppress(ClientDisconnect):
        await asyncio.wait_for(app(scope, receive, send), timeout=5)
    return sent


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_stream_disconnect_aborts_the_engine_request(engine, spec_version, path):
    engine.token_delay_s = 0.005
    app = build_app(engine)
    if path == "/v1/completions":
        body = {"prompt": "hi", "max_tokens": 100, "stream": True}
    else:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100,
                "stream": True}  # fmt: skip
    sent = await drive(app, path, body, spec_version, asyncio.Event())
    assert sent and sent[0].startswith(b"data: ")
    (request_id,) = engine.requests
    assert engine.aborted == [request_id]
    assert not engine.running
    assert app.state.serving.limiter.num_active == 0
    metrics = app.state.serving.metrics
    assert metrics.requests.labels(finish_reason="abort")._value.get() == 1


async def test_non_streaming_disconnect_aborts_the_engine_request(engine):
    engine.token_delay_s = 0.005
    app = build_app(engine)
    disconnect = asyncio.Event()

    async def leave_once_running():
        while not engine.running:
            await asyncio.sleep(0.001)
        disconnect.set()

    leaver = asyncio.create_task(leave_once_running())
    await drive(app, "/v1/completions", {"prompt": "hi", "max_tokens": 100}, "2.3", disconnect)
    await leaver
    (request_id,) = engine.requests
    assert engine.aborted == [request_id] and not engine.running
