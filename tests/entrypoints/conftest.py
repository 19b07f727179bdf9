"""Fixtures for the HTTP server tests: a fake engine, an app over it, an async client."""

from __future__ import annotations

import json

import httpx
import pytest

from distserve_rt.entrypoints.openai import build_app
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
