"""Fixtures for the HTTP server tests: a fake engine, an app over it, an async client.

The app is imported inside its fixture: the CLI tests beside the server's need no fastapi
(the GPU machine has none), and the server's own test modules skip without it."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.entrypoints.fake_engine import FakeEngine


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


def make_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
async def client(engine):
    from distserve_rt.entrypoints.openai import build_app

    async with make_client(build_app(engine)) as c:
        yield c


def parse_sse(text: str) -> list:
    """The events of an SSE body: decoded JSON objects, and the string "[DONE]"."""
    events = []
    for block in text.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
