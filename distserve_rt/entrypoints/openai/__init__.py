"""OpenAI-compatible HTTP server: `build_app(engine)` over any `EngineClient`."""

from distserve_rt.entrypoints.openai.api_server import build_app

__all__ = ["build_app"]
